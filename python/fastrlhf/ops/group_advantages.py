"""Group-relative advantages for GRPO, Dr. GRPO and RLOO.

``scores`` holds ``n_groups * group_size`` sequence-level scores, each group's samples
consecutive (the layout of ``prompts.repeat_interleave(group_size)``). Math in
``csrc/kernels/group_advantages.h``:

* GRPO: ``(x - mean) / (std + eps)`` (``normalize="std"``, unbiased std like ``torch.std``)
* Dr. GRPO: ``x - mean`` (``normalize="none"``)
* RLOO: ``x - mean(others)`` (``leave_one_out=True, normalize="none"``); with ``"std"`` the
  leave-one-out advantage is divided by the group std as well.

A group of size 1 has std 0. Not differentiable. NaN scores propagate to their whole group.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_finite_scalar, check_tensor, forbid_grad, use_kernel


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    normalize: Literal["std", "none"] = "std",
    leave_one_out: bool = False,
    eps: float = 1e-6,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``scores [N] -> advantages [N]`` with consecutive groups of ``group_size``.

    Args:
        scores: ``[N]`` float, one score per sampled sequence, ``N = n_groups * group_size`` with
            each group's samples consecutive (not differentiable).
        group_size: samples per prompt (a positive int dividing ``N``).
        normalize: ``"std"`` divides by the group's unbiased std plus ``eps`` (GRPO); ``"none"``
            only subtracts the baseline (Dr. GRPO, RLOO).
        leave_one_out: baseline is the mean of the *other* samples in the group (RLOO; needs
            ``group_size >= 2``) instead of the whole group's mean.
        eps: added to the std before dividing (>= 0); used only with ``normalize="std"``.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``[N]`` advantages in ``scores``' dtype, in the same order as ``scores``.
    """
    op = "group_advantages"
    check_tensor(op, "scores", scores, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"fastrlhf.ops.{op}: group_size must be a positive int, got {group_size!r}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"fastrlhf.ops.{op}: group_size={group_size} does not divide the number of scores "
            f"{scores.shape[0]} (scores must hold n_groups * group_size entries)"
        )
    if normalize not in ("std", "none"):
        raise ValueError(f"fastrlhf.ops.{op}: normalize must be 'std' or 'none', got {normalize!r}")
    if leave_one_out and group_size < 2:
        raise ValueError(f"fastrlhf.ops.{op}: leave_one_out needs group_size >= 2, got {group_size}")
    eps = check_finite_scalar(op, "eps", eps, low=0.0)
    forbid_grad(op, scores=scores)
    if use_kernel(op, impl, scores.device, scores.dtype):
        return torch.ops.fastrlhf.group_advantages.default(
            scores, group_size, normalize == "std", leave_one_out, eps
        )
    return reference.group_advantages(
        scores, group_size, normalize=normalize, leave_one_out=leave_one_out, eps=eps
    )


class GroupAdvantages(nn.Module):
    """Module face of :func:`group_advantages`: ``forward(scores) -> advantages``.

    Args:
        group_size, normalize, leave_one_out, eps, impl: as in :func:`group_advantages`.
    """

    def __init__(self, group_size: int, normalize: Literal["std", "none"] = "std",
                 leave_one_out: bool = False, eps: float = 1e-6, impl: Impl = "auto"):
        super().__init__()
        self.group_size, self.normalize, self.leave_one_out = group_size, normalize, leave_one_out
        self.eps, self.impl = eps, impl

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return group_advantages(scores, self.group_size, normalize=self.normalize,
                                leave_one_out=self.leave_one_out, eps=self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"group_size={self.group_size}, normalize={self.normalize!r}, "
                f"leave_one_out={self.leave_one_out}, eps={self.eps}")


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::group_advantages")
    def _group_advantages_fake(scores, group_size, normalize_std, leave_one_out, eps):
        torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
        return scores.new_empty(scores.shape)
