"""A Llama-family causal language model (Llama, Mistral, Qwen2): RMSNorm, RoPE, SwiGLU MLP, GQA,
optional tied embeddings, built on ``fastrlhf.ops.attention`` (training, prefill) and
``fastrlhf.ops.decode_attention`` (generation against a preallocated :class:`KVCache`).

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so a
state dict moves between this model and ``transformers`` unchanged (see ``models/hf.py``).

Three ways to call :meth:`CausalLM.forward`:

* padded batch ``input_ids [B, T]`` with an optional ``attention_mask [B, T]`` holding one
  contiguous block of ones per row (left and/or right padding, as generation output has);
* packed sequences ``input_ids [N]`` with ``cu_seqlens [S + 1]`` (positions restart per sequence,
  padding costs nothing);
* with a ``cache``: the new tokens of each row, appended to the cache (prefill or decode).

Shapes: B batch, T time, C hidden size, H / Hkv query / key-value heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastrlhf import ops

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class CausalLMConfig:
    """Architecture of a :class:`CausalLM`. Field names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None (plain RoPE) or {"rope_type": "llama3", "factor", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o projections (Llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"  # the Hugging Face architecture written by save_pretrained / to_hf
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, kept for the round trip

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
            raise ValueError(f"CausalLMConfig: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ValueError(f"CausalLMConfig: rope_scaling type {kind!r} is not supported (default, llama3)")
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if kind == "llama3" and not need <= set(self.rope_scaling):
                raise ValueError(f"CausalLMConfig: llama3 rope_scaling needs {sorted(need)}, got {sorted(self.rope_scaling)}")

    @property
    def num_parameters_estimate(self) -> int:
        C, I, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        attn = C * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * C * I + 2 * C
        return V * C * (1 if self.tie_word_embeddings else 2) + L * per_layer + C

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CausalLMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in fp32 (as Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # (..., C) -> (..., C)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


DECODE_ROWS = 64  # at most this many rows: a decode-sized matmul (linear(), packed decode weights)


def decode_sized(x: torch.Tensor) -> bool:
    return x.numel() <= DECODE_ROWS * x.shape[-1]


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``. For a plain fp32 ``nn.Linear`` on the CPU with decode-sized ``x``, it
    computes ``(W @ x^T)^T`` instead: MKL's sgemm is much faster with the large dimension first
    (1.7x on the decode step of bench/generate.py on 2 cores). Same math; only rounding differs."""
    if type(layer) is nn.Linear and x.device.type == "cpu" and x.dtype == torch.float32 and decode_sized(x):
        y = (layer.weight @ x.reshape(-1, x.shape[-1]).t()).t()  # (rows, out), a transposed view
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return layer(x)


def pack_linears(*layers: nn.Module) -> nn.Linear | None:
    """One ``nn.Linear`` whose output is the concatenation of ``layers``' outputs (a copy of their
    weights, no grad), or None when any of them is not a plain ``nn.Linear`` (e.g. LoRA)."""
    if not all(type(m) is nn.Linear for m in layers):
        return None
    w = torch.cat([m.weight.detach() for m in layers])
    # built on the meta device: nn.Linear's random init of a weight replaced right away cost ~2 ms a layer
    packed = nn.Linear(w.shape[1], w.shape[0], bias=layers[0].bias is not None, device="meta", dtype=w.dtype)
    packed.weight = nn.Parameter(w, requires_grad=False)
    if packed.bias is not None:
        packed.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    return packed


def rope_inv_freq(config: CausalLMConfig) -> torch.Tensor:
    """Inverse frequencies ``[D / 2]`` (fp32) of RoPE, with Llama 3's frequency scaling if set."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    rs = config.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)  # long waves: stretched
        smooth = (old_len / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)  # in between: interpolated
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions ``[..., T]`` (int) -> cos, sin ``[..., T, D]`` in ``dtype`` (angles in fp32)."""
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., T, D): the rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x ``(B, h, T, D)`` rotated by cos/sin ``(B, 1, T, D)`` (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values of every layer, ``[B, Hkv, max_length, D]`` each, and the
    number of valid positions per row ``lengths [B]`` (int64). Rows are stored unpadded from
    position 0 (no left padding inside the cache), so ``decode_attention`` reads exactly
    ``lengths[b]`` keys for row b."""

    def __init__(self, config: CausalLMConfig, batch_size: int, max_length: int, *, dtype=torch.float32,
                 device=None):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (an index tensor), in that order: finished rows stop costing compute.

        Increasing ``rows`` (what generation passes: the rows still running) compact the cache in
        place: only the rows that move are copied, and only their first ``max(lengths)``
        positions; the cache becomes a view of the first ``len(rows)`` rows of its storage (no
        new allocation). Other orders gather into new tensors."""
        rows = rows.to(self.lengths.device)
        n = rows.numel()
        lengths = self.lengths.index_select(0, rows)
        if n > 1 and not bool((rows[1:] > rows[:-1]).all()):
            self.k = [k.index_select(0, rows) for k in self.k]
            self.v = [v.index_select(0, rows) for v in self.v]
        else:
            # row i moves from rows[i] >= i: a gather of the moved rows, then a write to [0, n)
            moved = (rows != torch.arange(n, device=rows.device)).nonzero().squeeze(1)
            used = int(lengths.max()) if n else 0
            if moved.numel() and used:
                src = rows.index_select(0, moved)
                for t in self.k + self.v:
                    t[moved, :, :used] = t[src, :, :used]
            self.k = [k[:n] for k in self.k]
            self.v = [v[:n] for v in self.v]
        self.lengths = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class _AttnLayout:
    """How every layer of one forward call runs attention (built once per call)."""

    mode: str  # "padded" | "varlen" | "prefill" | "decode"
    key_start: torch.Tensor | None = None  # [B] padded: first valid key (left padding)
    key_lengths: torch.Tensor | None = None  # [B] padded / prefill: end of valid keys
    cu_seqlens: torch.Tensor | None = None  # [S + 1] varlen
    max_seqlen: int | None = None
    cache: KVCache | None = None
    write_pos: torch.Tensor | None = None  # [B, Tn] decode: cache positions of the new tokens
    new_lengths: torch.Tensor | None = None  # [B] cache lengths after this call
    validate: bool = True  # check cu_seqlens in the first layer only


class Attention(nn.Module):
    def __init__(self, config: CausalLMConfig, layer_idx: int):
        super().__init__()
        C, D = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.layer_idx = (config.num_attention_heads,
                                                                      config.num_key_value_heads, D, layer_idx)
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * D, C, bias=config.attention_bias)
        self.packed_qkv: nn.Linear | None = None  # set by CausalLM.decode_weights() for the decode steps

    def forward(self, x, cos, sin, layout: _AttnLayout):
        D, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        if layout.mode == "varlen":
            N = x.shape[0]  # x (N, C), cos/sin (N, D)
            q = linear(self.q_proj, x).view(N, H, D)
            k = linear(self.k_proj, x).view(N, Hkv, D)
            v = linear(self.v_proj, x).view(N, Hkv, D)
            q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
            y = ops.attention(q, k, v, causal=True, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen,
                              validate=layout.validate)
            return linear(self.o_proj, y.reshape(N, H * D))  # (N, C)
        B, T, _ = x.shape
        if layout.mode == "decode" and self.packed_qkv is not None:  # one matmul, one rotation for q and k
            qkv = linear(self.packed_qkv, x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        else:
            q = linear(self.q_proj, x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = linear(self.k_proj, x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = linear(self.v_proj, x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layout.mode == "padded":
            y = ops.attention(q, k, v, causal=True, key_start=layout.key_start, key_lengths=layout.key_lengths,
                              validate=False)  # built from the mask by _mask_bounds: in range
        elif layout.mode == "prefill":  # empty cache: write positions [0, T), attend among the new keys
            kc, vc = layout.cache.k[self.layer_idx], layout.cache.v[self.layer_idx]
            kc[:, :, :T] = k
            vc[:, :, :T] = v
            y = ops.attention(q, k, v, causal=True, key_lengths=layout.key_lengths, validate=False)
        else:  # decode: append T new positions per row, attend to the whole valid cache
            kc, vc = layout.cache.k[self.layer_idx], layout.cache.v[self.layer_idx]
            # positions write_pos (B, T) of every kv head: scatter along time, index (B, Hkv, T, D)
            idx = layout.write_pos[:, None, :, None].expand(B, Hkv, T, D)
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
            y = ops.decode_attention(q, kc, vc, layout.new_lengths, validate=False)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return linear(self.o_proj, y)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)
        self.packed_gate_up: nn.Linear | None = None  # set by CausalLM.decode_weights()

    def forward(self, x):
        if self.packed_gate_up is not None and decode_sized(x):  # one matmul
            gate, up = linear(self.packed_gate_up, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: CausalLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layout: _AttnLayout):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# the model


def _mask_bounds(attention_mask: torch.Tensor, check: bool):
    """attention_mask ``[B, T]`` (one contiguous block of ones per row) -> (key_start, key_end) ``[B]``."""
    m = attention_mask.to(torch.bool)
    T = m.shape[1]
    start = m.to(torch.int8).argmax(1)  # first one (0 for an all-zero row)
    end = T - m.flip(1).to(torch.int8).argmax(1)  # one past the last one
    if check and not torch.compiler.is_compiling():
        count = m.sum(1)
        if bool(((end - start != count) & (count > 0)).any()):
            raise ValueError("CausalLM: attention_mask must hold one contiguous block of ones per row (left and/or "
                             "right padding); pack sequences with cu_seqlens instead")
    return start, end


class LlamaTrunk(nn.Module):
    """Embedding, decoder layers and the final norm: ``input_ids -> hidden`` (``CausalLM.model``;
    also the backbone of the value and reward models)."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states, ``[B, T, C]`` (``[N, C]`` packed).

        * ``input_ids [B, T]``, ``attention_mask [B, T]`` (optional): positions default to
          ``cumsum(mask) - 1`` (Hugging Face's convention for left padding); padded positions
          produce values that are to be ignored.
        * ``input_ids [N]`` with ``cu_seqlens [S + 1]``: packed sequences; output ``[N, ...]``.
        * ``cache``: ``input_ids [B, Tn]`` are appended to each row of the cache at
          ``cache.lengths``. With an ``attention_mask [B, Tn]`` (right padding only) the cache
          must be empty (prefill) and ``cache.lengths`` becomes the mask's row sums; without one
          all Tn tokens of every row are valid (decode, ``Tn`` small).
        """
        layout, positions = self._layout(input_ids, attention_mask, position_ids, cu_seqlens, cache)
        x = self.embed_tokens(input_ids)  # (B, T, C) or (N, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, T, D) or (N, D)
        if layout.mode != "varlen":
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layout, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout)
            layout.validate = False  # cu_seqlens checked once, by the first layer
        if cache is not None:
            cache.lengths = layout.new_lengths
        return self.norm(x)  # (B, T, C) or (N, C)

    def _layout(self, input_ids, attention_mask, position_ids, cu_seqlens, cache):
        dev = input_ids.device
        if cu_seqlens is not None:
            if input_ids.dim() != 1 or attention_mask is not None or cache is not None:
                raise ValueError("LlamaTrunk: packed input takes input_ids [N] with cu_seqlens and no "
                                 "attention_mask / cache")
            cu = cu_seqlens.to(device=dev, dtype=torch.long)
            lengths = cu[1:] - cu[:-1]
            if position_ids is None:  # restart at 0 in every sequence
                seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths,
                                                       output_size=input_ids.shape[0])
                position_ids = torch.arange(input_ids.shape[0], device=dev) - cu[seq_of_token]
            max_len = int(lengths.max()) if lengths.numel() and not torch.compiler.is_compiling() else None
            return _AttnLayout("varlen", cu_seqlens=cu, max_seqlen=max_len), position_ids
        if input_ids.dim() != 2:
            raise ValueError(f"LlamaTrunk: input_ids must be [B, T] (or [N] with cu_seqlens), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"LlamaTrunk: attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
        if cache is None:
            if attention_mask is None:
                pos = torch.arange(T, device=dev).expand(B, T) if position_ids is None else position_ids
                return _AttnLayout("padded"), pos
            start, end = _mask_bounds(attention_mask, check=True)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            return _AttnLayout("padded", key_start=start, key_lengths=end), position_ids
        if cache.batch_size != B:
            raise ValueError(f"LlamaTrunk: cache holds {cache.batch_size} rows, input_ids {B}")
        if attention_mask is not None:  # prefill of right-padded prompts into an empty cache
            start, end = _mask_bounds(attention_mask, check=True)
            if bool(((start != 0) & (end > 0)).any()) or bool((cache.lengths != 0).any()):
                raise ValueError("LlamaTrunk: with a cache, attention_mask is for prefilling right-padded prompts into "
                                 "an empty cache (generation right-aligns left-padded prompts itself)")
            if T > cache.max_length:
                raise ValueError(f"LlamaTrunk: {T} prompt positions exceed the cache length {cache.max_length}")
            pos = torch.arange(T, device=dev).expand(B, T) if position_ids is None else position_ids
            lens = attention_mask.long().sum(1)
            return _AttnLayout("prefill", key_lengths=lens, cache=cache, new_lengths=lens), pos
        write_pos = cache.lengths[:, None] + torch.arange(T, device=dev)  # (B, T)
        new_lengths = cache.lengths + T
        if not torch.compiler.is_compiling() and int(new_lengths.max()) > cache.max_length:
            raise ValueError(f"LlamaTrunk: the cache is full (max_length {cache.max_length})")
        pos = write_pos if position_ids is None else position_ids
        return _AttnLayout("decode", cache=cache, write_pos=write_pos, new_lengths=new_lengths), pos



class CausalLM(nn.Module):
    """Llama-style decoder-only LM. ``forward`` returns logits ``[..., V]`` or, with
    ``return_hidden=True``, the final-norm hidden states ``[..., C]`` (feed them to
    :meth:`token_logprobs` / ``ops.linear_token_logprobs`` to skip the logits)."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = config
        self.model = LlamaTrunk(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config: dict | None = None  # generation_config.json of a checkpoint: stop / pad defaults
        self.apply(self._init_weights)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.model.gradient_checkpointing = on

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    # ---- conveniences
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                n += p.numel()
        return n

    @contextmanager
    def decode_weights(self):
        """Within the block, decode steps on the CPU multiply by concatenated q/k/v and gate/up
        weights (fewer, larger matmuls; one rotation for q and k). The packed copies are built on
        entry from the current weights (so a training step between generations is seen) and freed
        on exit. A no-op on GPUs (cuBLAS gains little) and for LoRA-wrapped projections."""
        use = self.device.type == "cpu"
        for layer in self.model.layers if use else ():
            a, m = layer.self_attn, layer.mlp
            a.packed_qkv = pack_linears(a.q_proj, a.k_proj, a.v_proj)
            m.packed_gate_up = pack_linears(m.gate_proj, m.up_proj)
        try:
            yield self
        finally:
            for layer in self.model.layers:
                layer.self_attn.packed_qkv = None
                layer.mlp.packed_gate_up = None

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"CausalLM: cache length {max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., C]`` -> logits ``[..., V]``."""
        return linear(self.lm_head, hidden).contiguous()  # decode-sized: one copy here, not one per consumer

    # ---- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[N, V]`` packed), or the hidden states with ``return_hidden``.
        The three input forms (padded, packed, cached) are those of :meth:`LlamaTrunk.forward`."""
        hidden = self.model(input_ids, attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens, cache=cache)
        return hidden if return_hidden else self.logits(hidden)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       temperature: float = 1.0, return_entropy: bool = False, chunk_size: int | None = None):
        """Log-prob of every next token, ``[B, T - 1]`` fp32 (position t scores ``input_ids[:, t + 1]``
        given the prefix), from the hidden states through ``ops.linear_token_logprobs``: the
        ``[B, T, V]`` logits are never materialized. Entries whose target is padding are
        meaningless; mask them with ``attention_mask[:, 1:]``."""
        hidden = self(input_ids, attention_mask, return_hidden=True)  # (B, T, C)
        # a LoRA adapter on the LM head counts (LoRALinear.merged_weight)
        weight = self.lm_head.merged_weight() if hasattr(self.lm_head, "merged_weight") else self.lm_head.weight
        return ops.linear_token_logprobs(hidden[:, :-1], weight, input_ids[:, 1:],
                                         temperature=temperature, return_entropy=return_entropy,
                                         chunk_size=chunk_size)

    def token_loss(self, input_ids: torch.Tensor, loss_fn, attention_mask: torch.Tensor | None = None, *,
                   temperature: float = 1.0, chunk_rows: int | None = None) -> "ops.LinearTokenLossOutput":
        """A loss of the next-token log-probs known up front (PPO/GRPO, SFT), through
        ``ops.linear_token_loss``: ``loss_fn(logprobs [b, T - 1], entropy [b, T - 1], rows)`` is
        called on chunks of ``chunk_rows`` whole sequences (``rows`` slices the batch), must be a sum over
        sequences (use batch-wide normalizers), and the LM head's gradients are computed chunk by
        chunk in the forward: three matmuls instead of the four of ``token_logprobs`` + a loss.
        Returns ``(loss, logprobs, entropy)``, the last two ``[B, T - 1]`` and detached."""
        hidden = self(input_ids, attention_mask, return_hidden=True)  # (B, T, C)
        weight = self.lm_head.merged_weight() if hasattr(self.lm_head, "merged_weight") else self.lm_head.weight
        return ops.linear_token_loss(hidden[:, :-1], weight, input_ids[:, 1:], loss_fn, temperature=temperature,
                                     chunk_rows=chunk_rows)

    # ---- checkpoints (safetensors + config.json, loadable by transformers too)
    def save_pretrained(self, path, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` (Hugging Face keys) and ``model.safetensors``; LoRA adapters, if
        any, are merged into the saved weights (the model itself is left as it is)."""
        from fastrlhf.models.checkpoint import save_checkpoint
        save_checkpoint(self, path, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None) -> "CausalLM":
        """Load a directory written by :meth:`save_pretrained` or by ``transformers`` (Llama,
        Mistral, Qwen2; safetensors only, sharded or not)."""
        from fastrlhf.models.checkpoint import load_checkpoint
        return load_checkpoint(cls, path, dtype=dtype, device=device)

    @classmethod
    def from_hf(cls, model_or_path, *, dtype: torch.dtype | None = None, device=None) -> "CausalLM":
        """From a ``transformers`` Llama / Mistral / Qwen2 causal LM object or a local checkpoint
        directory (no network)."""
        from fastrlhf.models.hf import causal_lm_from_hf
        return causal_lm_from_hf(cls, model_or_path, dtype=dtype, device=device)

    def to_hf(self):
        """The equivalent ``transformers`` model (needs the ``hf`` extra)."""
        from fastrlhf.models.hf import causal_lm_to_hf
        return causal_lm_to_hf(self)
