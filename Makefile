# fastrlhf: the two commands of README.md, plus helpers.
#   make test   create .venv if missing, install torch + build tools, build the extension, run pytest
#   make demo   the main job (until the trainers land: the RL-kernel and generation benchmarks, ~4 minutes)
#   make bench  every benchmark, one table (writes bench/results/)
#   make lint   ruff (lint + import order) and clang-format --dry-run: what .ci/run checks first
#   make fmt    apply both
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastrlhf-deps-$(TORCH_VERSION)-3
CXX_SOURCES = $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
BENCH_ARGS ?=  # e.g. BENCH_ARGS="--device cuda" on a GPU machine

.PHONY: all venv build test test-cuda demo bench lint fmt clean

all: test

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" "scikit-build-core>=0.10" ninja "cmake>=3.26" numpy "pytest>=8" "hypothesis>=6" \
		"safetensors>=0.4" "tokenizers>=0.19" "jinja2>=3.1" "transformers>=4.45" \
		"ruff==0.17.6" "clang-format==23.1.5" \
		"rich>=13" "starlette>=0.37" "uvicorn>=0.30" "selenium>=4.11" "pexpect>=4.8"
	touch $@

venv: $(STAMP)

# Incremental: scikit-build-core keeps its CMake build tree under build/.
build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import fastrlhf, json; print('fastrlhf build:', json.dumps(fastrlhf.build_info()))"

test: build
	$(PY) -m pytest -q

test-cuda: build
	$(PY) -m pytest -q -m cuda

demo: build
	@echo "fastrlhf demo: the RLHF loop (trainers) is not built yet; running the RL-kernel and generation"
	@echo "benchmarks instead (advantages, losses, sampling: kernel vs the PyTorch code trainers use;"
	@echo "generate vs Hugging Face transformers on the same weights; one table)."
	$(PY) bench/all.py --only gae,group_advantages,whiten,td_targets,losses,sample,generate $(BENCH_ARGS)

bench: build
	$(PY) bench/all.py --out bench/results $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build .pytest_cache .hypothesis
