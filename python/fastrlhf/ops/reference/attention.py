"""Reference attention: softmax(Q K^T * scale + mask) V written with matmuls, in the accumulator
dtype, for the padded and varlen layouts, and KV-cache decode. Differentiable."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def _attend(q, k, v, visible, scale):
    """q [H, Tq, D], k/v [Hkv, Tk, D], visible [Tq, Tk] bool -> [H, Tq, D] (rows with no visible
    key give 0)."""
    H, Hkv = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // Hkv, dim=0)  # (H, Tk, D): GQA by reading kv head h // group
    v = v.repeat_interleave(H // Hkv, dim=0)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (H, Tq, Tk)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros_like(p))  # all-masked rows: 0, not NaN
    return torch.matmul(p, v)


def _in_range(x, k_begin, k_end):
    """x [Hkv, Tk, D] with rows outside [k_begin, k_end) zeroed: padding may hold anything (even
    NaN) and must not reach the output through 0 * NaN."""
    j = torch.arange(x.shape[1], device=x.device)[None, :, None]
    return torch.where((j >= k_begin) & (j < k_end), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _visible(Tq, Tk, k_begin, k_end, causal, offset, device):
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    vis = ((j >= k_begin) & (j < k_end)).expand(Tq, Tk)
    if causal:
        vis = vis & (j <= i + offset)
    return vis


def attention(q, k, v, *, causal=True, scale=None, cu_seqlens=None, key_lengths=None, key_start=None):
    acc = acc_dtype(q.dtype)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    if cu_seqlens is None:  # padded [B, H, T, D]
        B, _, Tq, _ = q.shape
        Tk = k.shape[2]
        if B == 0:  # empty, but still a function of q, k and v for autograd
            return q * 0 + (k.sum() + v.sum()) * 0
        outs = []
        for b in range(B):
            kb = int(key_start[b]) if key_start is not None else 0
            ke = int(key_lengths[b]) if key_lengths is not None else Tk
            vis = _visible(Tq, Tk, kb, ke, causal, Tk - Tq, q.device)
            kk, vv = _in_range(ka[b], kb, ke), _in_range(va[b], kb, ke)
            outs.append(_attend(qa[b], kk, vv, vis, scale))
        return torch.stack(outs).to(q.dtype)
    # varlen [total, H, D]
    cu = [int(x) for x in cu_seqlens.tolist()]
    if q.shape[0] == 0:  # empty, but still a function of q, k and v for autograd
        return q * 0 + (k.sum() + v.sum()) * 0
    out = torch.zeros_like(qa)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        vis = _visible(e - s, e - s, 0, e - s, causal, 0, q.device)
        o = _attend(qa[s:e].transpose(0, 1), ka[s:e].transpose(0, 1), va[s:e].transpose(0, 1), vis, scale)
        out = out.index_copy(0, torch.arange(s, e, device=q.device), o.transpose(0, 1))
    return out.to(q.dtype)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None):
    """q [B, H, Tq, D]: the newest Tq positions of each row, already written to the caches."""
    acc = acc_dtype(q.dtype)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    B, _, Tq, _ = q.shape
    Tmax = k_cache.shape[2]
    if B == 0:
        return q * 0 + (k_cache.sum() + v_cache.sum()) * 0
    outs = []
    for b in range(B):
        n = int(cache_seqlens[b])
        vis = _visible(Tq, Tmax, 0, n, True, n - Tq, q.device)
        kk, vv = _in_range(k_cache[b].to(acc), 0, n), _in_range(v_cache[b].to(acc), 0, n)
        outs.append(_attend(q[b].to(acc), kk, vv, vis, scale))
    return torch.stack(outs).to(q.dtype)
