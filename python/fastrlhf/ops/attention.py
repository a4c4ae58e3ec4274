"""Fused attention for training (forward + backward, causal, padded and packed varlen, GQA) and
KV-cache decode.

``attention(q, k, v, *, causal=True, scale=None, cu_seqlens=None, max_seqlen=None,
key_lengths=None, key_start=None)``:

* padded layout, a drop-in for ``F.scaled_dot_product_attention``: ``q [B, H, Tq, D]``,
  ``k, v [B, Hkv, Tk, D]``. ``key_lengths [B]`` hides keys ``j >= key_lengths[b]`` (right
  padding); ``key_start [B]`` hides keys ``j < key_start[b]`` (left padding, as in batched
  generation). ``causal``: query i sees keys ``j <= i + (Tk - Tq)`` (top-left when Tq = Tk, the
  newest queries last when Tk > Tq, as FlashAttention).
* packed varlen layout (FlashAttention's): ``q [total, H, D]``, ``k, v [total, Hkv, D]`` and
  ``cu_seqlens [B + 1]`` (int) for self-attention over packed sequences; padded tokens cost
  nothing. ``max_seqlen`` is accepted for API compatibility.
* GQA / MQA: ``H`` divisible by ``Hkv``; query head h reads kv head ``h // (H // Hkv)``.
* A query that sees no key outputs 0. fp32 / bf16 / fp16 (fp32 accumulation), fp64.
  Differentiable w.r.t. q, k, v; the backward recomputes from the saved log-sum-exp and is its
  own op (``attention_backward``).

``decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None)``: ``q [B, H, Tq, D]``
holds the newest Tq tokens of each row, already written to the caches ``[B, Hkv, Tmax, D]`` at
positions ``cache_seqlens[b] - Tq .. cache_seqlens[b] - 1``; they attend causally among
themselves and to everything before. Decoding token by token with it matches ``attention``
over the whole sequence (the same kernel and the same per-row arithmetic).

Kernels: CPU (csrc/kernels/cpu/attention.cpp: tiled online softmax) and CUDA
(csrc/kernels/cuda/attention.cu):

* bf16 / fp16 with D in {32, 64, 96, 128} on sm_80+: FlashAttention-2 style tensor-core
  kernels (fp32 accumulation; the probabilities P and the score gradients dS are rounded to the
  storage dtype before their matmuls, as in FlashAttention, so they differ from the reference by
  about one rounding of that dtype, not only in the final output). The backward computes dQ and
  dK/dV in two passes (no atomics): deterministic.
* fp32, fp64 and other head dims: CUDA-core kernels, one warp per row, the CPU kernel's
  arithmetic in fp32 (fp64).
* ``decode_attention`` with Tq <= 16: split-KV (keys of each row cut into chunks across thread
  blocks, merged by log-sum-exp in a fixed order), fp32 accumulation for every dtype; larger Tq
  (prefill chunks) runs the forward kernel.

On CUDA the padded-layout ops build their per-row table on the device (no host sync in the op;
out-of-range ``key_lengths`` / ``key_start`` / ``cache_seqlens`` trap there, as torch's index
checks do, and are reported by the checks here first outside ``torch.compile``); the varlen
layout reads ``cu_seqlens`` on the host once per call.
"""

from __future__ import annotations

import torch

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_finite_scalar, check_tensor, use_kernel
from fastrlhf.ops.reference._acc import acc_dtype

_CUDA_KERNEL = True


def _int_vector(op, name, x, B, device):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be a [{B}] integer tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"fastrlhf.ops.{op}: {name} must be an integer tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"fastrlhf.ops.{op}: {name} is on {x.device} but q is on {device}")
    return x.long()


def _check_heads(op, q, k, v, head_dim_axis, head_axis):
    check_tensor(op, "q", q)
    check_tensor(op, "k", k)
    check_tensor(op, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"fastrlhf.ops.{op}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fastrlhf.ops.{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"fastrlhf.ops.{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    D = q.shape[head_dim_axis]
    if k.shape[head_dim_axis] != D:
        raise ValueError(f"fastrlhf.ops.{op}: k head dim {k.shape[head_dim_axis]} != q head dim {D}")
    if not 1 <= D <= 256:
        raise ValueError(f"fastrlhf.ops.{op}: head dim D must be in [1, 256], got {D}")
    H, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"fastrlhf.ops.{op}: q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    return D


def attention(q, k, v, *, causal: bool = True, scale: float | None = None, cu_seqlens=None, max_seqlen=None,
              key_lengths=None, key_start=None, validate: bool = True, impl: Impl = "auto") -> torch.Tensor:
    """See the module docstring. Returns ``out`` shaped like ``q``. ``validate=False`` skips the
    value checks of ``key_lengths`` / ``key_start`` / ``cu_seqlens`` (they read the data: a GPU
    sync per call), for callers that build them correctly, e.g. once per model forward."""
    op = "attention"
    if cu_seqlens is None:
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k, torch.Tensor) and k.dim() == 4):
            raise ValueError(f"fastrlhf.ops.{op}: padded layout takes q [B, H, Tq, D] and k, v [B, Hkv, Tk, D]; "
                             "pass cu_seqlens for the packed [total, H, D] layout")
        D = _check_heads(op, q, k, v, 3, 1)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"fastrlhf.ops.{op}: k batch {k.shape[0]} != q batch {q.shape[0]}")
        B, Tk = q.shape[0], k.shape[2]
        key_lengths = _int_vector(op, "key_lengths", key_lengths, B, q.device)
        key_start = _int_vector(op, "key_start", key_start, B, q.device)
        if validate and not torch.compiler.is_compiling():  # value checks read the data
            for name, x in (("key_lengths", key_lengths), ("key_start", key_start)):
                if x is not None and ((x < 0) | (x > Tk)).any():
                    raise ValueError(f"fastrlhf.ops.{op}: {name} must be in [0, Tk] = [0, {Tk}]")
    else:
        if key_lengths is not None or key_start is not None:
            raise ValueError(f"fastrlhf.ops.{op}: key_lengths / key_start are for the padded layout; "
                             "cu_seqlens already gives every sequence's length")
        if not (isinstance(q, torch.Tensor) and q.dim() == 3 and isinstance(k, torch.Tensor) and k.dim() == 3):
            raise ValueError(f"fastrlhf.ops.{op}: varlen layout takes q [total, H, D] and k, v [total, Hkv, D]")
        D = _check_heads(op, q, k, v, 2, 1)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"fastrlhf.ops.{op}: varlen self-attention needs as many k tokens as q tokens")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"fastrlhf.ops.{op}: cu_seqlens must be a [B + 1] integer tensor")
        if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"fastrlhf.ops.{op}: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        cu = cu_seqlens.long()
        if validate and not torch.compiler.is_compiling():  # value checks read the data
            if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"fastrlhf.ops.{op}: cu_seqlens must start at 0, be non-decreasing and end at "
                                 f"the number of tokens {q.shape[0]}, got {cu.tolist()[:8]}")
            longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
            if max_seqlen is not None and int(max_seqlen) < longest:
                raise ValueError(f"fastrlhf.ops.{op}: max_seqlen {max_seqlen} is below the longest sequence "
                                 f"({longest})")
        cu_seqlens = cu
    scale = D**-0.5 if scale is None else check_finite_scalar(op, "scale", scale)
    if use_kernel(op, impl, q.device, q.dtype, cuda_kernel=_CUDA_KERNEL):
        out, _ = torch.ops.fastrlhf.attention.default(q, k, v, causal, scale, cu_seqlens, cu_seqlens, key_lengths,
                                                      key_start)
        return out
    return reference.attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, key_lengths=key_lengths,
                               key_start=key_start)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float | None = None, validate: bool = True,
                     impl: Impl = "auto") -> torch.Tensor:
    """See the module docstring. Returns ``out`` shaped like ``q``. ``validate=False`` skips the
    range check of ``cache_seqlens`` (it reads the values: a GPU sync per call; a decoding loop
    checks once per step instead)."""
    op = "decode_attention"
    if not (isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4):
        raise ValueError(f"fastrlhf.ops.{op}: takes q [B, H, Tq, D] and caches [B, Hkv, Tmax, D]")
    D = _check_heads(op, q, k_cache, v_cache, 3, 1)
    B, _, Tq, _ = q.shape
    if k_cache.shape[0] != B:
        raise ValueError(f"fastrlhf.ops.{op}: cache batch {k_cache.shape[0]} != q batch {B}")
    lens = _int_vector(op, "cache_seqlens", cache_seqlens, B, q.device)
    if lens is None:
        raise ValueError(f"fastrlhf.ops.{op}: cache_seqlens is required")
    if validate and not torch.compiler.is_compiling() and ((lens < Tq) | (lens > k_cache.shape[2])).any():
        raise ValueError(f"fastrlhf.ops.{op}: cache_seqlens must be in [Tq, Tmax] = [{Tq}, {k_cache.shape[2]}] "
                         "(they count the new tokens, already written to the caches)")
    scale = D**-0.5 if scale is None else check_finite_scalar(op, "scale", scale)
    if use_kernel(op, impl, q.device, q.dtype, cuda_kernel=_CUDA_KERNEL):
        return torch.ops.fastrlhf.decode_attention.default(q, k_cache, v_cache, lens, scale)
    return reference.decode_attention(q, k_cache, v_cache, lens, scale=scale)


if _ext.extension_available():

    def _lse_shape(q, cu_seqlens_q):
        return (q.shape[0], q.shape[1], q.shape[2]) if cu_seqlens_q is None else (q.shape[0], q.shape[1])

    @torch.library.register_fake("fastrlhf::attention")
    def _fake(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start):
        acc = acc_dtype(q.dtype)
        return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=acc)

    @torch.library.register_fake("fastrlhf::attention_backward")
    def _backward_fake(grad_out, q, k, v, out, lse, causal, scale, cu_seqlens_q, cu_seqlens_k, key_lengths, key_start):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fastrlhf::decode_attention")
    def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale):
        return q.new_empty(q.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, causal, scale, cu_q, cu_k, key_lengths, key_start = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, key_lengths, key_start)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_q, cu_k, key_lengths, key_start = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastrlhf.attention_backward.default(
            grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, cu_q, cu_k, key_lengths, key_start
        )
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd("fastrlhf::attention", _backward, setup_context=_setup_context)
