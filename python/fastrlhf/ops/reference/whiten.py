"""Reference masked whitening (statistics over valid elements only)."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,  # bool, like x
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Differentiable through autograd (it is made of torch ops)."""
    xa = x.to(acc_dtype(x.dtype))
    valid = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
    zero = torch.zeros_like(xa)
    n = valid.sum().to(xa.dtype)
    # summed relative to the first valid element (as the kernel): equal inputs give their value as
    # the mean exactly, hence deviations of exactly 0 (a plain fp32 sum rounds)
    first = xa[valid][:1].detach()
    shift = first[0] if first.numel() else torch.zeros((), dtype=xa.dtype)
    mean = shift + torch.where(valid, xa - shift, zero).sum() / n.clamp(min=1)  # masked NaN/Inf never enter
    sq = torch.where(valid, (xa - mean) ** 2, zero).sum()
    denom = n - 1 if unbiased else n
    var = torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))
    y = (xa - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(valid, y, torch.zeros_like(y)).to(x.dtype)
