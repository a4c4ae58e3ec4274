"""Clipped value loss (PPO), fused forward and backward.

Per valid token, with ``v_clip = old_values + clip(values - old_values, -clip, clip)``::

    loss = 0.5 * max((values - returns)^2, (v_clip - returns)^2)      (clip=None: 0.5 (v - R)^2)

aggregated like :func:`~fastrlhf.ops.policy_loss` (``agg``, ``normalizer``, ``norm_length``).
``stats``: ``clipfrac`` (tokens where the clipped branch is larger), ``explained_variance``
(``1 - Var(R - v) / Var(R)`` over valid tokens; NaN when ``Var(R) = 0``, as CleanRL),
``value_mean``, ``return_mean``. Differentiable w.r.t. ``values`` only.
Math in ``csrc/kernels/value_loss.h``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    AggMode,
    Impl,
    agg_code,
    bt_mask,
    check_bt,
    check_finite_scalar,
    check_tensor,
    common_float_dtype,
    forbid_grad,
    positive_or_none,
    use_kernel,
)
from fastrlhf.ops.reference._acc import acc_dtype

STAT_NAMES = ("clipfrac", "explained_variance", "value_mean", "return_mean")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = 0.2,
    agg: AggMode = "token-mean",
    normalizer: float | None = None,
    norm_length: float | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss and its diagnostics (see the module doc).

    Args:
        values: ``[B, T]`` current value predictions (differentiable).
        old_values: ``[B, T]`` predictions at rollout time (the clip's centre; a constant).
        returns: ``[B, T]`` value targets (e.g. ``ops.gae``'s returns; a constant).
        mask: ``[B, T]`` bool (or 0/1), valid tokens. Default: all valid.
        clip: half-width of the clip around ``old_values``; None: plain ``0.5 (v - R)^2``.
        agg: aggregation over tokens, as in :func:`policy_loss`.
        normalizer: the batch-wide count (gradient accumulation / data parallelism), as in
            :func:`policy_loss`.
        norm_length: Dr. GRPO's constant length (``seq-mean-token-sum-norm``).
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``(loss [], stats)`` with ``clipfrac``, ``explained_variance``, ``value_mean``, ``return_mean``.
    """
    op = "value_loss"
    check_tensor(op, "values", values, ndim=2)
    check_bt(op, "old_values", old_values, "values", values)
    check_bt(op, "returns", returns, "values", values)
    mask = bt_mask(op, mask, "values", values)
    if clip is not None:
        clip = check_finite_scalar(op, "clip", clip)
        if clip <= 0:
            raise ValueError(f"fastrlhf.ops.{op}: clip must be > 0 (or None for no clipping), got {clip}")
    agg_i = agg_code(op, agg)
    normalizer_f = positive_or_none(op, "normalizer", normalizer)
    norm_length_f = positive_or_none(op, "norm_length", norm_length)
    forbid_grad(op, differentiable="values", old_values=old_values, returns=returns)
    dtype = common_float_dtype(values, old_values, returns)
    values, old_values, returns = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    if use_kernel(op, impl, values.device, dtype):
        loss, stats, _ = torch.ops.fastrlhf.value_loss.default(
            values, old_values, returns, mask, clip or 0.0, agg_i, normalizer_f, norm_length_f
        )
        return loss, dict(zip(STAT_NAMES, stats.unbind(0)))
    return reference.value_loss(values, old_values, returns, mask, clip=clip, agg=agg, normalizer=normalizer,
                                norm_length=norm_length)


class ValueLoss(nn.Module):
    """Module face of :func:`value_loss`.

    Args:
        clip, agg, norm_length, impl: as in :func:`value_loss`.
    """

    def __init__(self, clip: float | None = 0.2, agg: AggMode = "token-mean", norm_length: float | None = None,
                 impl: Impl = "auto"):
        super().__init__()
        self.clip, self.agg, self.norm_length, self.impl = clip, agg, norm_length, impl

    def forward(self, values, old_values, returns, mask=None, normalizer=None):
        return value_loss(values, old_values, returns, mask, clip=self.clip, agg=self.agg, normalizer=normalizer,
                          norm_length=self.norm_length, impl=self.impl)

    def extra_repr(self) -> str:
        return f"clip={self.clip}, agg={self.agg!r}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::value_loss")
    def _fake(values, old_values, returns, mask, clip, agg, normalizer, norm_length):
        torch._check(values.dim() == 2, lambda: "values must be [B, T]")
        acc = acc_dtype(values.dtype)
        return (values.new_empty((), dtype=acc), values.new_empty((len(STAT_NAMES),), dtype=acc),
                values.new_empty((values.shape[0],), dtype=acc))

    @torch.library.register_fake("fastrlhf::value_loss_backward")
    def _backward_fake(grad_loss, values, old_values, returns, mask, row_weight, clip):
        return values.new_empty(values.shape)

    def _setup_context(ctx, inputs, output):
        values, old_values, returns, mask, clip, _agg, _normalizer, _norm_length = inputs
        _, stats, row_weight = output
        ctx.save_for_backward(values, old_values, returns, mask, row_weight)
        ctx.clip = clip
        ctx.mark_non_differentiable(stats, row_weight)

    def _backward(ctx, grad_loss, _grad_stats, _grad_row_weight):
        values, old_values, returns, mask, row_weight = ctx.saved_tensors
        grad = torch.ops.fastrlhf.value_loss_backward.default(
            grad_loss, values, old_values, returns, mask, row_weight, ctx.clip
        )
        return (grad,) + (None,) * 7

    torch.library.register_autograd("fastrlhf::value_loss", _backward, setup_context=_setup_context)
