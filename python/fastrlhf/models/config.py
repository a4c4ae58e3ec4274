"""The architecture of a Llama-family model, and its ``config.json`` form.

:class:`CausalLMConfig` holds what the model needs; :func:`config_from_hf_dict` and
:func:`config_to_hf_dict` convert to and from a Hugging Face ``config.json`` dict (transformers 4
and 5 spellings). Nothing here builds a model or touches weights (``checkpoint.py`` reads and
writes directories, ``hf.py`` converts ``transformers`` model objects).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch

ModelType = Literal["llama", "mistral", "qwen2"]

# The one table of supported model types: ``model_type`` -> the prefix of Hugging Face's class
# names (``LlamaForCausalLM``, ``Qwen2ForSequenceClassification``, ...).
MODEL_TYPES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def hf_architecture(model_type: str, head: str = "ForCausalLM") -> str:
    """The Hugging Face class name of ``model_type`` with ``head`` (``"ForCausalLM"``,
    ``"ForSequenceClassification"``, ``"ForTokenClassification"``)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {model_type!r}")
    return MODEL_TYPES[model_type] + head


@dataclass
class CausalLMConfig:
    """Architecture of a :class:`~fastrlhf.models.CausalLM`. Field names follow Hugging Face's
    ``LlamaConfig``, so ``config.json`` keys map one to one.

    Args:
        vocab_size: number of token ids.
        hidden_size: width C of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads H.
        num_key_value_heads: key/value heads (GQA); None means ``num_attention_heads``.
        head_dim: per-head width D (even, <= 256); None means ``hidden_size // num_attention_heads``.
        max_position_embeddings: the longest sequence the model accepts (forward and generate check it).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None (plain RoPE) or Llama 3's ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}``.
        tie_word_embeddings: the LM head shares the embedding matrix.
        attention_bias: bias on the q, k, v and o projections (Llama's flag).
        qkv_bias: bias on q, k, v only (Qwen2).
        mlp_bias: bias on the MLP projections.
        initializer_range: std of the normal init of new weights.
        model_type: the Hugging Face architecture written by ``save_pretrained`` / ``to_hf``.
        bos_token_id, eos_token_id, pad_token_id: special ids kept for the round trip (``generate`` reads
            ``eos_token_id`` and ``pad_token_id`` as defaults).
        extra: other ``config.json`` keys, kept so that a loaded checkpoint saves back unchanged.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    model_type: ModelType = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"CausalLMConfig: hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CausalLMConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"CausalLMConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2 or self.head_dim > 256:
            raise ValueError(f"CausalLMConfig: head_dim must be even and <= 256, got {self.head_dim}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"CausalLMConfig: model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ValueError(f"CausalLMConfig: rope_scaling type {kind!r} is not supported (default, llama3)")
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if kind == "llama3" and not need <= set(self.rope_scaling):
                raise ValueError(f"CausalLMConfig: llama3 rope_scaling needs {sorted(need)}, "
                                 f"got {sorted(self.rope_scaling)}")

    @property
    def num_parameters_estimate(self) -> int:
        C, I, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        attn = C * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * C * I + 2 * C
        return V * C * (1 if self.tie_word_embeddings else 2) + L * per_layer + C

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CausalLMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- config.json <-> CausalLMConfig ---------------------------------------------------------

_MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
           "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "initializer_range",
           "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures", "hidden_act",
           "torch_dtype", "dtype", "transformers_version", "attention_dropout", "pretraining_tp", "use_cache"}


def config_from_hf_dict(d: dict, *, source: str = "config.json") -> CausalLMConfig:
    """A Hugging Face ``config.json`` dict (transformers 4 or 5 spelling) -> CausalLMConfig.

    Args:
        d: the parsed ``config.json``.
        source: where ``d`` came from, named in errors (a path).
    """
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"from_hf: {source}: model_type {model_type!r} is not supported "
                         f"(supported: {list(MODEL_TYPES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"from_hf: {source}: hidden_act {d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"from_hf: {source}: pretraining_tp > 1 checkpoints are not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"from_hf: {source} lacks the required key(s) {missing} (a {model_type} config.json has "
                         f"all of {list(required)})")
    window = d.get("sliding_window") if (model_type == "mistral" or d.get("use_sliding_window")) else None
    if window is not None and window < d.get("max_position_embeddings", 0):
        warnings.warn(f"from_hf: sliding-window attention ({window}) is not implemented; sequences longer than "
                      "the window will differ from the original model", stacklevel=3)
    rope = d.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope and not ("rope_theta" in rope or "rope_type" in rope):
        raise ValueError(f"from_hf: {source}: per-layer-type rope_parameters are not supported")
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
    """CausalLMConfig -> a ``config.json`` dict that transformers 4 and 5 both read.

    Args:
        c: the config.
        dtype: the weights' dtype, written as ``torch_dtype``.
    """
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
        architectures=[hf_architecture(c.model_type)],
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
