"""Checkpoint directories: ``config.json`` (Hugging Face keys) + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Never pickle. A directory written here loads in transformers,
and a transformers Llama / Mistral / Qwen2 directory loads here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


def read_config(path) -> dict:
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"fastrlhf: {path / CONFIG} not found (expected a checkpoint directory)")
    return json.loads((path / CONFIG).read_text())


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / WEIGHTS).exists():
        return load_file(str(path / WEIGHTS))
    if (path / WEIGHTS_INDEX).exists():
        index = json.loads((path / WEIGHTS_INDEX).read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(str(path / shard)))
        return out
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"fastrlhf: {path} holds only pickle weights (.bin/.pt); fastrlhf reads safetensors only. "
                         "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"fastrlhf: no {WEIGHTS} or {WEIGHTS_INDEX} in {path}")


def write_safetensors(path, tensors: dict[str, torch.Tensor], *, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})


def build_and_load(cls, config, state_dict: dict, *, dtype=None, device=None, strict: bool = True, copy: bool = False,
                   **kwargs):
    """``cls(config, **kwargs)`` built without initializing weights (meta device), then given the
    tensors of ``state_dict`` (cast to ``dtype``, moved to ``device``; ``copy=True``: never the
    caller's own storage, e.g. when the tensors belong to another live model)."""
    from fastrlhf.models.llama import rope_inv_freq

    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config, **kwargs)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_KEYS)}
    tied = getattr(config, "tie_word_embeddings", False)
    expected = set(model.state_dict().keys())
    if tied:
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"fastrlhf: checkpoint does not match {cls.__name__}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    params = {k: v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype, copy=copy)
              for k, v in sd.items() if k in expected}
    model.load_state_dict(params, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, buf in list(model.named_buffers()):  # non-persistent buffers: recompute
        if buf.is_meta and name.endswith("inv_freq"):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            owner.inv_freq = rope_inv_freq(config).to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"fastrlhf: checkpoint leaves {leftover[:6]} uninitialized")
    return model


def save_checkpoint(model, path, *, dtype=None, config_updates: dict | None = None) -> None:
    """``model`` (a CausalLM or a value / reward model: ``.config`` and HF parameter names) to
    directory ``path``: merged weights (LoRA adapters folded in), config.json with
    ``config_updates`` applied, and generation_config.json when the model has one."""
    from fastrlhf.models.hf import config_to_hf_dict
    from fastrlhf.models.lora import merged_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = merged_state_dict(model)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # shared with model.embed_tokens.weight (safetensors stores no aliases)
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
    from fastrlhf.models.hf import config_from_hf_dict

    d = read_config(path)
    if check_config is not None:
        check_config(d)
    config = config_from_hf_dict(d)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    sd = read_safetensors(path)
    if dtype is None:
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    model = build_and_load(cls, config, sd, dtype=dtype, device=device)
    gen = Path(path) / GENERATION_CONFIG
    if gen.exists():  # sampling defaults, e.g. the chat end tokens of instruct models (generate reads them)
        model.generation_config = json.loads(gen.read_text())
    return model
