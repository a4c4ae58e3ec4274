"""PPO / GRPO policy loss, fused forward and backward, with the diagnostics trainers log.

Per valid token, with ``r = exp(logprobs - old_logprobs)`` and advantage ``a``::

    pg   = max(-a r, -a clip(r, 1 - clip_low, 1 + clip_high))     # clip_high defaults to clip_low
    pg   = min(pg, -a dual_clip)            if a < 0 and dual_clip   # dual-clip PPO
    loss = pg + kl_coef * kl(logprobs, ref_logprobs) - entropy_coef * entropy

aggregated over valid tokens by ``agg``:

* ``token-mean``: sum / (valid tokens) (DAPO, OpenRLHF, TRL),
* ``seq-mean-token-mean``: mean over sequences of per-sequence token means (original GRPO),
* ``seq-mean-token-sum``: mean over sequences of per-sequence token sums,
* ``seq-mean-token-sum-norm``: Dr. GRPO: per-sequence sums / ``norm_length`` (a constant,
  default T), averaged over sequences. (verl's variant omits the 1/num_sequences factor.)

Gradient accumulation / data parallelism: pass ``normalizer`` = the global count (valid
tokens for token-mean; sequences for the seq-mean modes) over all micro-batches and ranks, and
the sum of the micro-batch gradients equals the full-batch gradient. Sequences without valid
tokens weigh 0, and an empty batch gives loss 0 (not NaN).

``stats`` come from the same pass (0-dim tensors, no host sync): ``pg_loss``, ``kl``,
``entropy``, ``clipfrac`` (= ``clipfrac_low + clipfrac_high``, tokens where a clip binds),
``dual_clipfrac``, ``approx_kl`` (mean of ``(r - 1) - log r``), ``ratio_mean``, ``ratio_max``;
all token means over valid tokens except ``pg_loss`` (aggregated like the loss).
Differentiable w.r.t. ``logprobs`` and ``entropy``; ``old_logprobs``, ``advantages`` and
``ref_logprobs`` are constants (passing ones that require grad raises).
Math in ``csrc/kernels/policy_loss.h``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    AggMode,
    Impl,
    KLEstimator,
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
from fastrlhf.ops.kl_penalty import estimator_code
from fastrlhf.ops.reference._acc import acc_dtype

STAT_NAMES = ("pg_loss", "kl", "entropy", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac",
              "approx_kl", "ratio_mean", "ratio_max")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    kl_k3_clamp: bool = True,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: AggMode = "token-mean",
    normalizer: float | None = None,
    norm_length: float | None = None,
    validate: bool = True,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss of PPO / GRPO and its diagnostics (see the module doc).

    Args:
        logprobs: ``[B, T]`` log-probs of the taken tokens under the current policy (differentiable).
        old_logprobs: ``[B, T]`` log-probs under the policy that sampled them (a constant).
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, broadcast over tokens).
        mask: ``[B, T]`` bool (or 0/1), valid tokens. Default: all valid.
        clip_low: PPO's epsilon: the ratio is clipped below at ``1 - clip_low`` (in [0, 1]).
        clip_high: upper clip ``1 + clip_high`` (DAPO's clip-higher); None means ``clip_low``.
        dual_clip: dual-clip PPO's ``c > 1``: for negative advantages the loss is capped at
            ``-a c`` (None: off).
        ref_logprobs: ``[B, T]`` reference-policy log-probs, needed when ``kl_coef != 0``.
        kl_coef: weight of the KL-to-reference term inside the loss (GRPO's beta).
        kl_estimator: the per-token KL estimate (see :func:`kl_penalty`).
        kl_k3_clamp: verl's clamps on k3 (see :func:`kl_penalty`'s ``k3_clamp``).
        entropy: ``[B, T]`` per-token entropies for the bonus (differentiable).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        agg: how tokens become a scalar: ``token-mean``, ``seq-mean-token-mean`` (GRPO),
            ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (Dr. GRPO).
        normalizer: the batch-wide count the sum is divided by (valid tokens for token-mean,
            sequences for the seq-mean modes) when the batch is split into micro-batches or
            ranks; None: this batch's own count.
        norm_length: Dr. GRPO's constant length (default T).
        validate: refuse non-finite ``logprobs``, ``old_logprobs``, ``advantages``, ``ref_logprobs`` or
            ``entropy`` at valid tokens (a ValueError naming the tensor and the token). This reads the
            values (a GPU sync); with ``validate=False`` such inputs are not checked and the loss and
            stats are meaningless (e.g. an ``old_logprobs`` of -inf gives an infinite ratio).
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        ``(loss [], stats)``: ``stats`` maps ``pg_loss, kl, entropy, clipfrac, clipfrac_low,
        clipfrac_high, dual_clipfrac, approx_kl, ratio_mean, ratio_max`` to 0-dim tensors.
    """
    op = "policy_loss"
    check_tensor(op, "logprobs", logprobs, ndim=2)
    check_bt(op, "old_logprobs", old_logprobs, "logprobs", logprobs)
    check_tensor(op, "advantages", advantages)
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages[:, None].expand_as(logprobs)
    check_bt(op, "advantages", advantages, "logprobs", logprobs)
    mask = bt_mask(op, mask, "logprobs", logprobs)
    if ref_logprobs is not None:
        check_bt(op, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    elif kl_coef != 0:
        raise ValueError(f"fastrlhf.ops.{op}: kl_coef={kl_coef} needs ref_logprobs")
    if entropy is not None:
        check_bt(op, "entropy", entropy, "logprobs", logprobs)
    clip_low = check_finite_scalar(op, "clip_low", clip_low, low=0.0, high=1.0)
    clip_high = clip_low if clip_high is None else check_finite_scalar(op, "clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = check_finite_scalar(op, "dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"fastrlhf.ops.{op}: dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    kl_coef = check_finite_scalar(op, "kl_coef", kl_coef)
    entropy_coef = check_finite_scalar(op, "entropy_coef", entropy_coef)
    est = estimator_code(op, kl_estimator, "kl_estimator", k3_clamp=kl_k3_clamp)
    agg_i = agg_code(op, agg)
    normalizer_f = positive_or_none(op, "normalizer", normalizer)
    norm_length_f = positive_or_none(op, "norm_length", norm_length)
    forbid_grad(op, differentiable="logprobs and entropy", old_logprobs=old_logprobs, advantages=advantages,
                ref_logprobs=ref_logprobs)
    if validate and not torch.compiler.is_compiling():
        check_finite_at(op, mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                        ref_logprobs=ref_logprobs, entropy=entropy)

    dtype = common_float_dtype(logprobs, old_logprobs, advantages, ref_logprobs, entropy)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    logprobs, old_logprobs, advantages = cast(logprobs), cast(old_logprobs), cast(advantages)
    ref_logprobs, entropy = cast(ref_logprobs), cast(entropy)
    if use_kernel(op, impl, logprobs.device, dtype):
        loss, stats, _ = torch.ops.fastrlhf.policy_loss.default(
            logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_low, clip_high,
            dual_clip or 0.0, kl_coef, est, entropy_coef, agg_i, normalizer_f, norm_length_f,
        )
        return loss, dict(zip(STAT_NAMES, stats.unbind(0)))
    return reference.policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_k3_clamp=kl_k3_clamp,
        entropy=entropy,
        entropy_coef=entropy_coef, agg=agg, normalizer=normalizer, norm_length=norm_length,
    )


def check_finite_at(op: str, mask: torch.Tensor, **tensors) -> None:
    """Every given ``[B, T]`` tensor is finite where ``mask`` is set; else a ValueError naming the
    tensor, the first bad token and its value."""
    for name, t in tensors.items():
        if t is None:
            continue
        bad = ~torch.isfinite(t) & mask
        if bool(bad.any()):
            b, j = bad.nonzero()[0].tolist()
            hint = (" (the policy that sampled this token gave it probability 0?)" if name == "old_logprobs"
                    else "")
            raise ValueError(f"fastrlhf.ops.{op}: {name}[{b}, {j}] = {t[b, j].item()} at a valid token; it must be "
                             f"finite{hint}. Pass validate=False to skip this check")


class PolicyLoss(nn.Module):
    """Module face of :func:`policy_loss` holding the clip / KL / entropy / aggregation settings:
    ``forward(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, entropy=None,
    normalizer=None) -> (loss, stats)``. GRPO is ``PolicyLoss(kl_coef=..., kl_estimator="k3",
    agg="seq-mean-token-mean")`` fed group advantages.

    Args:
        clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, agg, norm_length, impl:
            as in :func:`policy_loss`.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: KLEstimator = "k3", entropy_coef: float = 0.0,
                 agg: AggMode = "token-mean", norm_length: float | None = None, impl: Impl = "auto"):
        super().__init__()
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.kl_coef, self.kl_estimator, self.entropy_coef = kl_coef, kl_estimator, entropy_coef
        self.agg, self.norm_length, self.impl = agg, norm_length, impl

    def forward(self, logprobs, old_logprobs, advantages, mask=None, ref_logprobs=None, entropy=None,
                normalizer=None):
        return policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, ref_logprobs=ref_logprobs, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, entropy=entropy, entropy_coef=self.entropy_coef, agg=self.agg,
            normalizer=normalizer, norm_length=self.norm_length, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (f"clip=({self.clip_low}, {self.clip_high}), dual_clip={self.dual_clip}, kl_coef={self.kl_coef}, "
                f"kl_estimator={self.kl_estimator!r}, entropy_coef={self.entropy_coef}, agg={self.agg!r}")


PPOLoss = PolicyLoss  # the earlier name, kept as an alias


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::policy_loss")
    def _fake(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_low, clip_high, dual_clip,
              kl_coef, kl_estimator, entropy_coef, agg, normalizer, norm_length):
        torch._check(logprobs.dim() == 2, lambda: "logprobs must be [B, T]")
        acc = acc_dtype(logprobs.dtype)
        return (logprobs.new_empty((), dtype=acc), logprobs.new_empty((len(STAT_NAMES),), dtype=acc),
                logprobs.new_empty((logprobs.shape[0],), dtype=acc))

    @torch.library.register_fake("fastrlhf::policy_loss_backward")
    def _backward_fake(grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, row_weight, clip_low,
                       clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, has_entropy):
        return logprobs.new_empty(logprobs.shape), logprobs.new_empty(logprobs.shape if has_entropy else (0,))

    def _setup_context(ctx, inputs, output):
        (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_low, clip_high, dual_clip,
         kl_coef, kl_estimator, entropy_coef, _agg, _normalizer, _norm_length) = inputs
        _, stats, row_weight = output
        ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, ref_logprobs, row_weight)
        ctx.scalars = (clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef)
        ctx.has_entropy = entropy is not None
        ctx.mark_non_differentiable(stats, row_weight)

    def _backward(ctx, grad_loss, _grad_stats, _grad_row_weight):
        logprobs, old_logprobs, advantages, mask, ref_logprobs, row_weight = ctx.saved_tensors
        grad_lp, grad_ent = torch.ops.fastrlhf.policy_loss_backward.default(
            grad_loss, logprobs, old_logprobs, advantages, mask, ref_logprobs, row_weight, *ctx.scalars,
            ctx.has_entropy,
        )
        return (grad_lp, None, None, None, None, grad_ent if ctx.has_entropy else None) + (None,) * 9

    torch.library.register_autograd("fastrlhf::policy_loss", _backward, setup_context=_setup_context)
