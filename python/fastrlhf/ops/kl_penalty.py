"""Per-token KL estimates between the policy and a reference policy (Schulman's estimators).

With ``d = logprobs - ref_logprobs``: ``k1 = d``; ``k2 = d^2 / 2``; ``abs = |d|``;
``k3 = exp(-d) + d - 1`` (the "low-variance KL" of GRPO / verl, with verl's clamps by default:
the log-ratio to ``[-20, 20]`` and the estimate to at most 10; ``k3_clamp=False`` drops them, as
TRL). Differentiable w.r.t. both inputs.
Elementwise: any shape. Math in ``csrc/kernels/kl_penalty.h``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    KL_ESTIMATORS,
    Impl,
    KLEstimator,
    check_choice,
    check_like,
    check_tensor,
    common_float_dtype,
    use_kernel,
)

Estimator = KLEstimator  # the earlier name


K3_UNCLAMPED = 4  # the kernels' code of k3 without verl's clamps (csrc/kernels/kl_penalty.h)


def estimator_code(op: str, estimator: str, name: str = "estimator", *, k3_clamp: bool = True) -> int:
    """A KL estimator name (and, for k3, whether verl's clamps apply) -> the kernels' code."""
    code = KL_ESTIMATORS[check_choice(op, name, estimator, KL_ESTIMATORS)]
    if not isinstance(k3_clamp, bool):
        raise TypeError(f"fastrlhf.ops.{op}: k3_clamp must be True or False, got {k3_clamp!r}")
    return K3_UNCLAMPED if (estimator == "k3" and not k3_clamp) else code


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: KLEstimator = "k1",
    k3_clamp: bool = True,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-token KL estimate between the policy and a reference (see the module doc).

    Args:
        logprobs: ``[...]`` log-probs of the taken tokens under the policy.
        ref_logprobs: ``[...]`` the same tokens under the reference policy.
        estimator: ``k1`` (``d``), ``k2`` (``d^2 / 2``), ``k3`` (``exp(-d) + d - 1``, clamped as
            verl), ``abs`` (``|d|``), with ``d = logprobs - ref_logprobs``.
        k3_clamp: apply verl's clamps to k3 (log-ratio to [-20, 20], estimate at most 10 with zero
            gradient beyond: they bind whenever ``d < -2.6``); False computes k3 unclamped, as TRL.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``[...]`` in the promoted input dtype, differentiable w.r.t. both inputs.
    """
    op = "kl_penalty"
    check_tensor(op, "logprobs", logprobs)
    check_tensor(op, "ref_logprobs", ref_logprobs)
    check_like(op, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    code = estimator_code(op, estimator, k3_clamp=k3_clamp)
    dtype = common_float_dtype(logprobs, ref_logprobs)
    logprobs, ref_logprobs = logprobs.to(dtype), ref_logprobs.to(dtype)
    if use_kernel(op, impl, logprobs.device, dtype):
        return torch.ops.fastrlhf.kl_penalty.default(logprobs, ref_logprobs, code)
    return reference.kl_penalty(logprobs, ref_logprobs, estimator=estimator, k3_clamp=k3_clamp)


class KLPenalty(nn.Module):
    """Module face of :func:`kl_penalty`.

    Args:
        estimator, k3_clamp, impl: as in :func:`kl_penalty`.
    """

    def __init__(self, estimator: KLEstimator = "k1", k3_clamp: bool = True, impl: Impl = "auto"):
        super().__init__()
        self.estimator, self.k3_clamp, self.impl = estimator, k3_clamp, impl

    def forward(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        return kl_penalty(logprobs, ref_logprobs, estimator=self.estimator, k3_clamp=self.k3_clamp, impl=self.impl)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::kl_penalty")
    def _kl_fake(logprobs, ref_logprobs, estimator):
        return logprobs.new_empty(logprobs.shape)

    @torch.library.register_fake("fastrlhf::kl_penalty_backward")
    def _kl_backward_fake(grad, logprobs, ref_logprobs, estimator):
        return logprobs.new_empty(logprobs.shape)

    def _setup_context(ctx, inputs, output):
        logprobs, ref_logprobs, estimator = inputs
        ctx.save_for_backward(logprobs, ref_logprobs)
        ctx.estimator = estimator

    def _backward(ctx, grad):
        logprobs, ref_logprobs = ctx.saved_tensors
        g = torch.ops.fastrlhf.kl_penalty_backward.default(grad, logprobs, ref_logprobs, ctx.estimator)
        return g, (-g if ctx.needs_input_grad[1] else None), None

    torch.library.register_autograd("fastrlhf::kl_penalty", _backward, setup_context=_setup_context)
