"""Hugging Face model objects <-> fastrlhf models (Llama / Mistral / Qwen2). Parameter names are
shared, so weights move as they are. ``transformers`` is needed only here
(``pip install fastrlhf[hf]``); config dicts are converted in ``config.py`` and checkpoint
directories are read and written by ``checkpoint.py`` with ``safetensors`` alone.
"""

from __future__ import annotations

from fastrlhf.models.checkpoint import build_and_load, load_checkpoint, tied_keys
from fastrlhf.models.config import config_from_hf_dict, config_to_hf_dict
from fastrlhf.models.lora import merged_state_dict


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastrlhf: Hugging Face model objects need transformers: pip install 'fastrlhf[hf]'") from e
    return transformers


def causal_lm_from_hf(cls, model_or_path, *, dtype=None, device=None):
    """``cls`` (a :class:`~fastrlhf.models.CausalLM`) from a transformers model object or a local
    checkpoint directory."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        return load_checkpoint(cls, model_or_path, dtype=dtype, device=device)
    hf = model_or_path
    if not hasattr(hf, "config") or not hasattr(hf, "state_dict"):
        raise TypeError(f"from_hf: expected a transformers model or a local directory, got {type(hf).__name__}")
    config = config_from_hf_dict(hf.config.to_dict(), source=f"{type(hf).__name__}.config")
    sd = hf.state_dict()
    first = next(iter(sd.values()))
    model = build_and_load(cls, config, sd, dtype=dtype or first.dtype, device=device or first.device, copy=True)
    gen = getattr(hf, "generation_config", None)
    if gen is not None and hasattr(gen, "to_diff_dict"):
        model.generation_config = {k: v for k, v in gen.to_diff_dict().items() if not k.startswith("_")}
    return model


def causal_lm_to_hf(model):
    """The equivalent ``transformers`` ``*ForCausalLM`` of ``model`` (LoRA adapters merged)."""
    transformers = _require_transformers()
    d = config_to_hf_dict(model.config, model.dtype)
    model_type = d.pop("model_type")
    d.pop("architectures")
    d.pop("torch_dtype")
    hf_config = transformers.AutoConfig.for_model(model_type, **d)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(device=model.device, dtype=model.dtype)
    tied = tied_keys(model)
    sd = {k: v.detach().clone() for k, v in merged_state_dict(model).items() if k not in tied}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weight names do not line up: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf.eval() if not model.training else hf
