"""Hugging Face interop for Llama / Mistral / Qwen2: ``config.json`` <-> :class:`CausalLMConfig`,
and model objects both ways. Parameter names are shared, so weights move as they are.
``transformers`` is needed only for the model objects (``pip install fastrlhf[hf]``); reading and
writing checkpoint directories needs only ``safetensors``.
"""

from __future__ import annotations

import copy
import warnings

import torch

from fastrlhf.models.llama import MODEL_TYPES, CausalLMConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
           "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "initializer_range",
           "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures", "hidden_act",
           "torch_dtype", "dtype", "transformers_version", "attention_dropout", "pretraining_tp", "use_cache"}


def config_from_hf_dict(d: dict) -> CausalLMConfig:
    """A Hugging Face ``config.json`` dict (transformers 4 or 5 spelling) -> CausalLMConfig."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"from_hf: model_type {model_type!r} is not supported (supported: {MODEL_TYPES})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"from_hf: hidden_act {d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("from_hf: pretraining_tp > 1 checkpoints are not supported")
    window = d.get("sliding_window") if (model_type == "mistral" or d.get("use_sliding_window")) else None
    if window is not None and window < d.get("max_position_embeddings", 0):
        warnings.warn(f"from_hf: sliding-window attention ({window}) is not implemented; sequences longer than "
                      "the window will differ from the original model", stacklevel=3)
    rope = d.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope and not ("rope_theta" in rope or "rope_type" in rope):
        raise ValueError("from_hf: per-layer-type rope_parameters are not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return CausalLMConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)) and model_type == "llama",
        qkv_bias=model_type == "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama",
        initializer_range=d.get("initializer_range", 0.02),
        model_type=model_type,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        extra={k: v for k, v in d.items() if k not in _MAPPED and not k.startswith("_")},
    )


def config_to_hf_dict(c: CausalLMConfig, dtype: torch.dtype = torch.float32) -> dict:
    """CausalLMConfig -> a ``config.json`` dict that transformers 4 and 5 both read."""
    if c.model_type != "llama" and (c.attention_bias or c.mlp_bias):
        raise ValueError(f"to_hf: {c.model_type} has no attention_bias / mlp_bias; use model_type='llama'")
    if c.qkv_bias and c.model_type != "qwen2":
        raise ValueError("to_hf: qkv_bias (bias on q, k, v only) is Qwen2's architecture; use model_type='qwen2'")
    if c.model_type == "qwen2" and not c.qkv_bias:
        raise ValueError("to_hf: Qwen2 always has q/k/v biases; set qkv_bias=True")
    rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope_parameters = {**c.rope_scaling, "rope_theta": c.rope_theta}
    d = copy.deepcopy(c.extra)  # transformers edits the dicts it is given
    d.update(
        architectures=[ARCHITECTURES[c.model_type]],
        model_type=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling=copy.deepcopy(c.rope_scaling),
        rope_parameters=rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if c.model_type == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    elif c.model_type == "mistral":
        d.setdefault("sliding_window", None)  # the original window, if it came from one, travels in extra
    else:
        d.setdefault("use_sliding_window", False)
        d.setdefault("sliding_window", None)
    return d


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastrlhf: Hugging Face model objects need transformers: pip install 'fastrlhf[hf]'") from e
    return transformers


def causal_lm_from_hf(cls, model_or_path, *, dtype=None, device=None):
    from fastrlhf.models.checkpoint import build_and_load, load_checkpoint

    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        return load_checkpoint(cls, model_or_path, dtype=dtype, device=device)
    hf = model_or_path
    if not hasattr(hf, "config") or not hasattr(hf, "state_dict"):
        raise TypeError(f"from_hf: expected a transformers model or a local directory, got {type(hf).__name__}")
    config = config_from_hf_dict(hf.config.to_dict())
    sd = hf.state_dict()
    first = next(iter(sd.values()))
    model = build_and_load(cls, config, sd, dtype=dtype or first.dtype, device=device or first.device, copy=True)
    gen = getattr(hf, "generation_config", None)
    if gen is not None and hasattr(gen, "to_diff_dict"):
        model.generation_config = {k: v for k, v in gen.to_diff_dict().items() if not k.startswith("_")}
    return model


def causal_lm_to_hf(model):
    transformers = _require_transformers()
    from fastrlhf.models.lora import merged_state_dict

    d = config_to_hf_dict(model.config, model.dtype)
    model_type = d.pop("model_type")
    d.pop("architectures")
    d.pop("torch_dtype")
    hf_config = transformers.AutoConfig.for_model(model_type, **d)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(device=model.device, dtype=model.dtype)
    sd = {k: v.detach().clone() for k, v in merged_state_dict(model).items()}  # the HF model owns its weights
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weight names do not line up: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf.eval() if not model.training else hf
