"""Pairwise preference losses over sequence-level scores, fused forward and backward: DPO and its
variants on policy / reference log-probs, and the Bradley-Terry loss of reward models.

Per pair i, with ``h = (chosen - ref_chosen) - (rejected - ref_rejected)`` (refs default to 0)
and ``z = beta h - margin``:

============  ================================================  ===============================
loss_type     per-pair loss                                     used by
============  ================================================  ===============================
``sigmoid``   ``-(1 - eps) log s(z) - eps log s(-z)``           DPO (Rafailov et al. 2023),
                                                                cDPO label smoothing ``eps``;
                                                                reward models: ``beta=1``,
                                                                scores as chosen / rejected
``ipo``       ``(h - margin - 1 / (2 beta))^2``                 IPO (Azar et al. 2023)
``hinge``     ``max(0, 1 - z)``                                 SLiC (Zhao et al. 2023)
============  ================================================  ===============================

summed and divided by ``normalizer`` (default: the number of pairs; pass the global count when
a batch is split into micro-batches or ranks). ``stats`` (0-dim, means over the pairs):
``rewards_chosen = beta (chosen - ref_chosen)``, ``rewards_rejected``, ``reward_margin = beta h``
and ``accuracy`` (the fraction with ``h > 0``). Differentiable w.r.t. ``chosen`` and
``rejected``; the references and ``margin`` are constants. NaN / Inf propagate to the loss.
Math in ``csrc/kernels/preference_loss.h``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    Impl,
    check_choice,
    check_finite_scalar,
    check_like,
    check_tensor,
    common_float_dtype,
    forbid_grad,
    positive_or_none,
    use_kernel,
)
from fastrlhf.ops.reference._acc import acc_dtype

PreferenceLossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES = {"sigmoid": 0, "ipo": 1, "hinge": 2}
STAT_NAMES = ("rewards_chosen", "rewards_rejected", "reward_margin", "accuracy")


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: PreferenceLossType = "sigmoid",
    label_smoothing: float = 0.0,
    margin: torch.Tensor | None = None,
    normalizer: float | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pairwise loss of DPO / IPO / hinge, or of a Bradley-Terry reward model (see the module doc).

    Args:
        chosen: ``[B]`` the preferred answers' scores: summed policy log-probs (DPO) or reward-model
            scores (differentiable).
        rejected: ``[B]`` the other answers' scores (differentiable).
        ref_chosen: ``[B]`` reference-policy log-probs of the chosen answers (DPO), or None (0).
        ref_rejected: ``[B]`` the same for the rejected answers, or None (0).
        beta: the inverse temperature of the implicit reward (DPO's beta; 1 for reward models), > 0.
        loss_type: ``sigmoid`` (DPO, Bradley-Terry), ``ipo`` or ``hinge``.
        label_smoothing: cDPO's probability that a label is flipped, in [0, 0.5] (``sigmoid`` only).
        margin: ``[B]`` a per-pair margin (a reward model's preference strength), or None.
        normalizer: divide the summed loss by this (default B): the global pair count under
            gradient accumulation.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``(loss [], stats)`` with ``rewards_chosen``, ``rewards_rejected``, ``reward_margin``, ``accuracy``.
    """
    op = "preference_loss"
    check_tensor(op, "chosen", chosen, ndim=1)
    check_tensor(op, "rejected", rejected)
    check_like(op, "rejected", rejected, "chosen", chosen)
    for name, t in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected), ("margin", margin)):
        if t is not None:
            check_tensor(op, name, t)
            check_like(op, name, t, "chosen", chosen)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError(f"fastrlhf.ops.{op}: pass both ref_chosen and ref_rejected, or neither")
    beta = check_finite_scalar(op, "beta", beta)
    if beta <= 0:
        raise ValueError(f"fastrlhf.ops.{op}: beta must be > 0, got {beta}")
    code = LOSS_TYPES[check_choice(op, "loss_type", loss_type, LOSS_TYPES)]
    label_smoothing = check_finite_scalar(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"fastrlhf.ops.{op}: label_smoothing applies to loss_type='sigmoid' only")
    normalizer_f = positive_or_none(op, "normalizer", normalizer)
    forbid_grad(op, differentiable="chosen and rejected", ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                margin=margin)
    dtype = common_float_dtype(chosen, rejected, ref_chosen, ref_rejected, margin)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    chosen, rejected, ref_chosen, ref_rejected, margin = map(cast, (chosen, rejected, ref_chosen, ref_rejected,
                                                                    margin))
    if use_kernel(op, impl, chosen.device, dtype):
        loss, stats = torch.ops.fastrlhf.preference_loss.default(
            chosen, rejected, ref_chosen, ref_rejected, margin, beta, code, label_smoothing, normalizer_f)
        return loss, dict(zip(STAT_NAMES, stats.unbind(0)))
    return reference.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                     label_smoothing=label_smoothing, margin=margin, normalizer=normalizer)


class PreferenceLoss(nn.Module):
    """Module face of :func:`preference_loss`: ``forward(chosen, rejected, ref_chosen=None,
    ref_rejected=None, margin=None, normalizer=None) -> (loss, stats)``.

    Args:
        beta, loss_type, label_smoothing, impl: as in :func:`preference_loss`.
    """

    def __init__(self, beta: float = 0.1, loss_type: PreferenceLossType = "sigmoid", label_smoothing: float = 0.0,
                 impl: Impl = "auto"):
        super().__init__()
        self.beta, self.loss_type, self.label_smoothing, self.impl = beta, loss_type, label_smoothing, impl

    def forward(self, chosen, rejected, ref_chosen=None, ref_rejected=None, margin=None, normalizer=None):
        return preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                               label_smoothing=self.label_smoothing, margin=margin, normalizer=normalizer,
                               impl=self.impl)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::preference_loss")
    def _fake(chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type, label_smoothing, normalizer):
        torch._check(chosen.dim() == 1, lambda: "chosen must be [B]")
        acc = acc_dtype(chosen.dtype)
        return chosen.new_empty((), dtype=acc), chosen.new_empty((len(STAT_NAMES),), dtype=acc)

    @torch.library.register_fake("fastrlhf::preference_loss_backward")
    def _backward_fake(grad_loss, chosen, rejected, ref_chosen, ref_rejected, margin, beta, loss_type,
                       label_smoothing, normalizer):
        return chosen.new_empty(chosen.shape)

    def _setup_context(ctx, inputs, output):
        chosen, rejected, ref_chosen, ref_rejected, margin, *scalars = inputs
        ctx.save_for_backward(chosen, rejected, ref_chosen, ref_rejected, margin)
        ctx.scalars = scalars  # beta, loss_type, label_smoothing, normalizer
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_loss, _grad_stats):
        g = torch.ops.fastrlhf.preference_loss_backward.default(grad_loss, *ctx.saved_tensors, *ctx.scalars)
        return (g, -g) + (None,) * 7  # d loss / d rejected = -d loss / d chosen

    torch.library.register_autograd("fastrlhf::preference_loss", _backward, setup_context=_setup_context)
