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

The architecture is :class:`~fastrlhf.models.config.CausalLMConfig`; how a call runs attention
(padded / packed / prefill / decode) is decided once per call in ``models/_layout.py``; the CPU
decode fast path (``linear``, packed q/k/v and gate/up weights) lives in ``models/_decode.py``.

Shapes: B batch, T time, C hidden size, H / Hkv query / key-value heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastrlhf import ops
from fastrlhf.models import checkpoint as ckpt
from fastrlhf.models._decode import decode_sized, linear, packed_decode_weights
from fastrlhf.models._layout import AttnLayout, attention_layout
from fastrlhf.models.cache import KVCache
from fastrlhf.models.config import CausalLMConfig

__all__ = ["CausalLM", "CausalLMConfig", "KVCache", "LlamaTrunk", "RMSNorm", "rope_inv_freq"]


# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in fp32 (as Hugging Face's LlamaRMSNorm).

    ``forward(x [..., dim]) -> [..., dim]``: normalized in fp32, cast back to ``x``'s dtype, then
    scaled by ``weight``.

    Args:
        dim: the size of the normalized last dimension (``weight`` is ``[dim]``, initialized to ones).
        eps: added to the mean square before the square root.
    """

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

    def forward(self, x, cos, sin, layout: AttnLayout):
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

    def forward(self, x, cos, sin, layout: AttnLayout):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# the model


class LlamaTrunk(nn.Module):
    """Embedding, decoder layers and the final norm: ``input_ids -> hidden`` (``CausalLM.model``;
    also the backbone of the value and reward models).

    Args:
        config: the architecture (vocabulary, sizes, layers, RoPE, norm eps).
    """

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

        Args:
            input_ids: token ids, ``[B, T]`` int (``[N]`` with ``cu_seqlens``), each in ``[0, vocab_size)``.
            attention_mask: ``[B, T]``, 1 on valid tokens (one contiguous block per row).
            position_ids: RoPE positions; default as above.
            cu_seqlens: ``[S + 1]`` sequence boundaries of packed input.
            cache: a :class:`KVCache` to append to (generation).
        """
        check_input_ids(input_ids, self.config.vocab_size, check_range=cache is None or attention_mask is not None)
        layout, positions = attention_layout(input_ids, attention_mask, position_ids, cu_seqlens, cache,
                                             max_positions=self.config.max_position_embeddings)
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

    def post_load(self) -> None:
        """Re-create the non-persistent RoPE buffer after a meta-device build + load (checkpoints)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)


def check_input_ids(input_ids, vocab_size: int, *, check_range: bool = True) -> None:
    """Refuse what is not an integer tensor of token ids in ``[0, vocab_size)`` (ids out of range
    would fail deep inside the embedding with a bare IndexError). ``check_range=False`` skips the
    value check (decode steps feed the sampler's own tokens; the check would sync a GPU)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"CausalLM: input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__} "
                        "(use torch.tensor(ids) or the tokenizer's output)")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"CausalLM: input_ids must be an integer tensor, got {input_ids.dtype}")
    if check_range and input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"CausalLM: input_ids hold token id {bad}, outside the vocabulary [0, {vocab_size}) "
                             "(a tokenizer for another model, or an unset pad id?)")


def _next_token_pairs(hidden, input_ids, cu_seqlens, start: int):
    """(hidden states of the scored positions, their targets): position t scores token t + 1."""
    if cu_seqlens is not None:
        if start:
            raise ValueError("CausalLM: start applies to padded batches, not packed input")
        return hidden[:-1], input_ids[1:]
    T = input_ids.shape[1]
    if not 0 <= start < T - 1 and T > 1:
        raise ValueError(f"CausalLM: start must be in [0, {T - 1}), got {start}")
    return hidden[:, start:-1], input_ids[:, start + 1:]


class CausalLM(nn.Module):
    """Llama-style decoder-only LM. ``forward`` returns logits ``[..., V]`` or, with
    ``return_hidden=True``, the final-norm hidden states ``[..., C]`` (feed them to
    :meth:`token_logprobs` / ``ops.linear_token_logprobs`` to skip the logits).

    Args:
        config: the architecture (a :class:`~fastrlhf.models.config.CausalLMConfig`); weights are drawn
            from a normal with std ``initializer_range``, and ``lm_head`` shares the embedding when
            ``tie_word_embeddings``. Use :meth:`from_pretrained` / :meth:`from_hf` to load weights.
    """

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
        """The number of parameter elements, a tied embedding / LM head counted once.

        Args:
            trainable_only: count only parameters with ``requires_grad`` (e.g. the LoRA adapters).

        Returns:
            The count, an int.
        """
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
        on exit. A no-op on GPUs (cuBLAS gains little) and for LoRA-wrapped projections
        (``generate`` folds adapters into plain weights first: :func:`~fastrlhf.models.lora_merged`)."""
        with packed_decode_weights(self.model.layers, self.device):
            yield self

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` in the model's dtype and device.

        Args:
            batch_size: rows.
            max_length: positions per row (at most ``max_position_embeddings``).
        """
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"CausalLM: cache length {max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., C]`` -> logits ``[..., V]``.

        Args:
            hidden: final-norm hidden states ``[..., C]`` (``forward(..., return_hidden=True)``), in the
                model's dtype.

        Returns:
            Contiguous logits ``[..., V]`` in the model's dtype (differentiable).
        """
        return linear(self.lm_head, hidden).contiguous()  # decode-sized: one copy here, not one per consumer

    # ---- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[N, V]`` packed), or the hidden states with ``return_hidden``.
        The three input forms (padded, packed, cached) are those of :meth:`LlamaTrunk.forward`."""
        hidden = self.model(input_ids, attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens, cache=cache)
        return hidden if return_hidden else self.logits(hidden)

    def lm_head_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The LM head's ``[V, C]`` weight as the fused ops take it: a LoRA adapter on the head merged
        in, cast (differentiably) to ``dtype`` when given (hidden states made under autocast)."""
        w = self.lm_head.merged_weight() if hasattr(self.lm_head, "merged_weight") else self.lm_head.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       cu_seqlens: torch.Tensor | None = None, temperature: float = 1.0,
                       return_entropy: bool = False, chunk_size: int | None = None, start: int = 0):
        """Log-prob of every next token, ``[B, T - 1]`` fp32 (position t scores ``input_ids[:, t + 1]``
        given the prefix), from the hidden states through ``ops.linear_token_logprobs``: the
        ``[B, T, V]`` logits are never materialized. Entries whose target is padding are
        meaningless; mask them with ``attention_mask[:, 1:]``.

        Args:
            input_ids: ``[B, T]`` token ids (``[N]`` packed with ``cu_seqlens``: the result is ``[N - 1]``,
                and positions that end a sequence score the next sequence's first token: mask them).
            attention_mask: ``[B, T]``, 1 on valid tokens (left or right padding).
            cu_seqlens: ``[S + 1]`` boundaries of packed sequences.
            temperature: score ``softmax(logits / temperature)`` (the sampling temperature of a rollout).
            return_entropy: also return the entropy of each position's distribution ``[B, T - 1]``.
            chunk_size: tokens per chunk of the fused LM head (default: the op's).
            start: score only positions ``start .. T - 2`` (the targets ``input_ids[:, start + 1:]``): the
                LM head skips the positions before, e.g. a prompt's (padded batches only). The result is
                ``[B, T - 1 - start]``.
        """
        hidden = self(input_ids, attention_mask, cu_seqlens=cu_seqlens, return_hidden=True)  # (B, T, C) / (N, C)
        h, targets = _next_token_pairs(hidden, input_ids, cu_seqlens, start)
        return ops.linear_token_logprobs(h, self.lm_head_weight(h.dtype), targets, temperature=temperature,
                                         return_entropy=return_entropy, chunk_size=chunk_size)

    def token_loss(self, input_ids: torch.Tensor, loss_fn, attention_mask: torch.Tensor | None = None, *,
                   cu_seqlens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                   temperature: float = 1.0, chunk_rows: int | None = None,
                   start: int = 0) -> ops.LinearTokenLossOutput:
        """A loss of the next-token log-probs known up front (PPO/GRPO, SFT), through
        ``ops.linear_token_loss``: ``loss_fn(logprobs [b, T - 1], entropy [b, T - 1], rows)`` is
        called on chunks of ``chunk_rows`` whole sequences (``rows`` slices the batch), must be a sum over
        sequences (use batch-wide normalizers), and the LM head's gradients are computed chunk by
        chunk in the forward: three matmuls instead of the four of ``token_logprobs`` + a loss.
        Returns ``(loss, logprobs, entropy)``, the last two ``[B, T - 1]`` and detached.

        Args:
            input_ids: ``[B, T]`` token ids (``[N]`` packed with ``cu_seqlens``: ``loss_fn`` then gets flat
                ``[n]`` chunks of the ``N - 1`` targets; mask the positions that end a sequence).
            loss_fn: ``(logprobs [b, T - 1], entropy [b, T - 1], rows: slice) -> loss []``, a sum over rows.
            attention_mask: ``[B, T]``, 1 on valid tokens.
            cu_seqlens: ``[S + 1]`` boundaries of packed sequences.
            hidden: the final hidden states of ``input_ids`` when the caller already has them (a value
                head on the same trunk); the forward is skipped.
            temperature: as in :meth:`token_logprobs`.
            chunk_rows: sequences (packed: tokens) per chunk (default: about 2^24 logits).
            start: as in :meth:`token_logprobs` (``loss_fn`` then gets ``[b, T - 1 - start]``).
        """
        if hidden is None:
            hidden = self(input_ids, attention_mask, cu_seqlens=cu_seqlens, return_hidden=True)  # (B, T, C)
        h, targets = _next_token_pairs(hidden, input_ids, cu_seqlens, start)
        return ops.linear_token_loss(h, self.lm_head_weight(h.dtype), targets, loss_fn, temperature=temperature,
                                     chunk_rows=chunk_rows)

    def post_load(self) -> None:
        """Re-tie the LM head to the embedding after a meta-device build + load (checkpoints)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- checkpoints (safetensors + config.json, loadable by transformers too)
    def save_pretrained(self, path, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` (Hugging Face keys) and ``model.safetensors``; LoRA adapters, if
        any, are merged into the saved weights (the model itself is left as it is).

        Args:
            path: the directory (created if missing).
            dtype: cast the saved weights (default: as they are).
        """
        ckpt.save_checkpoint(self, path, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None) -> CausalLM:
        """Load a directory written by :meth:`save_pretrained` or by ``transformers`` (Llama,
        Mistral, Qwen2; safetensors only, sharded or not).

        Args:
            path: the checkpoint directory.
            dtype: cast floating weights (default: the stored dtype).
            device: where to put the model (default CPU).
        """
        return ckpt.load_checkpoint(cls, path, dtype=dtype, device=device)

    @classmethod
    def from_hf(cls, model_or_path, *, dtype: torch.dtype | None = None, device=None) -> CausalLM:
        """From a ``transformers`` Llama / Mistral / Qwen2 causal LM object or a local checkpoint
        directory (no network).

        Args:
            model_or_path: a ``transformers`` model, or a directory.
            dtype: cast floating weights (default: the source's dtype).
            device: where to put the model (default: the source's device).
        """
        from fastrlhf.models.hf import causal_lm_from_hf  # hf.py converts model objects (needs transformers)

        return causal_lm_from_hf(cls, model_or_path, dtype=dtype, device=device)

    def to_hf(self):
        """The equivalent ``transformers`` model (needs the ``hf`` extra)."""
        from fastrlhf.models.hf import causal_lm_to_hf

        return causal_lm_to_hf(self)
