"""Masked whitening, as PPO implementations whiten advantages (TRL / verl ``masked_whiten``).

Statistics over the valid elements only: ``mean``, and the variance with Bessel's correction
(``unbiased=True``, like TRL and verl; ``False`` like OpenRLHF). Output:
``(x - mean) / sqrt(var + eps)`` (plus ``mean`` again when ``shift_mean=False``) at valid
elements and 0 at masked ones. No valid element: all zeros; one valid element (unbiased): the
variance is taken as 0. Differentiable w.r.t. ``x``. NaN propagates to every valid output.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, as_bool_mask, check_finite_scalar, check_tensor, use_kernel
from fastrlhf.ops.reference._acc import acc_dtype


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``x [...]`` (``mask`` bool of x's shape) ``-> whitened [...]`` in x's dtype.

    Args:
        x: float tensor of any shape (e.g. ``[B, T]`` advantages); differentiable.
        mask: bool (or 0/1 numbers) of ``x``'s shape, the valid elements that enter the statistics.
            Default: all valid.
        shift_mean: if True the output has mean 0; if False the mean is added back after scaling
            (only the variance is normalized).
        unbiased: Bessel's correction (``n - 1``) in the variance (TRL, verl); False divides by
            ``n`` (OpenRLHF).
        eps: added to the variance before the square root (>= 0).
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``x``'s shape and dtype: ``(x - mean) / sqrt(var + eps)`` at valid elements, 0 at masked
        ones. Statistics accumulate in fp32 (fp64 for fp64).
    """
    op = "whiten"
    check_tensor(op, "x", x)
    mask = as_bool_mask(op, "mask", mask, "x", x)
    eps = check_finite_scalar(op, "eps", eps, low=0.0)
    if use_kernel(op, impl, x.device, x.dtype):
        out, _, _ = torch.ops.fastrlhf.whiten.default(x, mask, shift_mean, unbiased, eps)
        return out
    return reference.whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)


class Whiten(nn.Module):
    """Module face of :func:`whiten`: ``forward(x, mask=None) -> whitened``.

    Args:
        shift_mean, unbiased, eps, impl: as in :func:`whiten`.
    """

    def __init__(self, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8,
                 impl: Impl = "auto"):
        super().__init__()
        self.shift_mean, self.unbiased, self.eps, self.impl = shift_mean, unbiased, eps, impl

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return whiten(x, mask, shift_mean=self.shift_mean, unbiased=self.unbiased, eps=self.eps,
                      impl=self.impl)

    def extra_repr(self) -> str:
        return f"shift_mean={self.shift_mean}, unbiased={self.unbiased}, eps={self.eps}"


def _whiten_backward_math(grad, x, mask, mean, rstd, shift_mean, unbiased):
    """dL/dx of whiten given dL/dout; [...] tensors, mean/rstd 0-dim (accumulator dtype).

    With xhat = (x - mean) * rstd over the n valid elements and d = n - unbiased:
        dx = rstd * (g - mean(g)) - rstd * xhat * sum(g * xhat) / d  (+ mean(g) if not shift_mean)
    and 0 at masked elements (the second term is absent when d <= 0, where var is defined as 0).
    """
    acc = mean.dtype
    valid = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
    m = valid.to(acc)
    g = grad.to(acc) * m
    xhat = (x.to(acc) - mean) * rstd * m
    n = m.sum()
    d = n - (1.0 if unbiased else 0.0)
    mean_g = g.sum() / n.clamp(min=1)
    s = (g * xhat).sum()
    var_term = torch.where(d > 0, s / d.clamp(min=1), torch.zeros_like(s))
    dx = rstd * (g - mean_g) - rstd * xhat * var_term
    if not shift_mean:
        dx = dx + mean_g
    return torch.where(valid, dx, torch.zeros_like(dx)).to(x.dtype)


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::whiten")
    def _whiten_fake(x, mask, shift_mean, unbiased, eps):
        acc = acc_dtype(x.dtype)
        return x.new_empty(x.shape), x.new_empty((), dtype=acc), x.new_empty((), dtype=acc)

    def _whiten_setup_context(ctx, inputs, output):
        x, mask, shift_mean, unbiased, _eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, mask, mean, rstd)
        ctx.shift_mean, ctx.unbiased = shift_mean, unbiased
        ctx.mark_non_differentiable(mean, rstd)

    def _whiten_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, mask, mean, rstd = ctx.saved_tensors
        dx = _whiten_backward_math(grad_out, x, mask, mean, rstd, ctx.shift_mean, ctx.unbiased)
        return dx, None, None, None, None

    torch.library.register_autograd(
        "fastrlhf::whiten", _whiten_backward, setup_context=_whiten_setup_context
    )
