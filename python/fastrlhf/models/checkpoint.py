"""Checkpoint directories: ``config.json`` (Hugging Face keys) + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Never pickle. A directory written here loads in transformers,
and a transformers Llama / Mistral / Qwen2 directory loads here.

This module knows directories and state dicts, not model internals: a module that holds
non-persistent buffers or tied weights re-creates them in its own ``post_load()`` hook, which
:func:`build_and_load` calls after assigning the loaded tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastrlhf.models.config import config_from_hf_dict, config_to_hf_dict
from fastrlhf.models.lora import merged_state_dict

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


def read_json(path: Path, what: str) -> dict:
    """A JSON file -> dict, with errors that name the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"fastrlhf: {path} is not valid JSON ({what}): {e}") from None


def read_config(path) -> dict:
    """``path/config.json`` -> dict."""
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"fastrlhf: {path / CONFIG} not found (expected a checkpoint directory)")
    return read_json(path / CONFIG, "a model config")


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"fastrlhf: cannot read {file} ({e}); the file is truncated or not safetensors") from None


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded)."""
    path = Path(path)
    if (path / WEIGHTS).exists():
        return _load_file(path / WEIGHTS)
    if (path / WEIGHTS_INDEX).exists():
        index = read_json(path / WEIGHTS_INDEX, "a sharded checkpoint's index")
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(_load_file(path / shard))
        return out
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"fastrlhf: {path} holds only pickle weights (.bin/.pt); fastrlhf reads safetensors only. "
                         "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"fastrlhf: no {WEIGHTS} or {WEIGHTS_INDEX} in {path}")


def write_safetensors(path, tensors: dict[str, torch.Tensor], *, metadata: dict | None = None) -> None:
    """Write ``tensors`` (detached, contiguous, on the CPU) to the file ``path``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names of parameters that alias another one (e.g. a tied LM head): safetensors
    stores no aliases, so these are neither saved nor expected on load."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def build_and_load(cls, config, state_dict: dict, *, dtype=None, device=None, strict: bool = True, copy: bool = False,
                   **kwargs):
    """``cls(config, **kwargs)`` built without initializing weights (meta device), then given the
    tensors of ``state_dict`` (cast to ``dtype``, moved to ``device``; ``copy=True``: never the
    caller's own storage, e.g. when the tensors belong to another live model). Every submodule's
    ``post_load()`` then re-creates its non-persistent buffers and ties."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config, **kwargs)
    tied = tied_keys(model)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_KEYS) and k not in tied}
    expected = set(model.state_dict().keys()) - tied
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"fastrlhf: checkpoint does not match {cls.__name__}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    params = {k: v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype, copy=copy)
              for k, v in sd.items() if k in expected}
    model.load_state_dict(params, strict=False, assign=True)
    for module in model.modules():
        if hasattr(module, "post_load"):
            module.post_load()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"fastrlhf: checkpoint leaves {leftover[:6]} uninitialized")
    return model


def save_checkpoint(model, path, *, dtype=None, config_updates: dict | None = None) -> None:
    """``model`` (a CausalLM or a value / reward model: ``.config`` and HF parameter names) to
    directory ``path``: merged weights (LoRA adapters folded in), config.json with
    ``config_updates`` applied, and generation_config.json when the model has one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = merged_state_dict(model)
    for key in tied_keys(model):
        sd.pop(key, None)  # shared with another parameter (safetensors stores no aliases)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    write_safetensors(path / WEIGHTS, sd)
    cfg = config_to_hf_dict(model.config, dtype or model.dtype)
    cfg.update(config_updates or {})
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if getattr(model, "generation_config", None):
        (path / GENERATION_CONFIG).write_text(json.dumps(model.generation_config, indent=2) + "\n")


def load_checkpoint(cls, path, *, dtype=None, device=None, check_config=None, **config_overrides):
    """``cls`` from directory ``path`` (ours or transformers'): ``check_config(config.json dict)``
    may reject it; ``config_overrides`` are set on the CausalLMConfig before building."""
    d = read_config(path)
    if check_config is not None:
        check_config(d)
    config = config_from_hf_dict(d, source=str(Path(path) / CONFIG))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    sd = read_safetensors(path)
    if dtype is None:
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    model = build_and_load(cls, config, sd, dtype=dtype, device=device)
    gen = Path(path) / GENERATION_CONFIG
    if gen.exists():  # sampling defaults, e.g. the chat end tokens of instruct models (generate reads them)
        model.generation_config = read_json(gen, "a generation config")
    return model
