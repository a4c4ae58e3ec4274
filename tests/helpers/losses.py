"""Inputs and runners shared by the policy_loss / value_loss tests."""

from __future__ import annotations

import torch

from fastrlhf.ops import policy_loss, value_loss

from helpers.masks import make_mask

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
ESTIMATORS = ["k1", "k2", "k3", "abs"]
AGG_CODE = {a: i for i, a in enumerate(AGGS)}


def to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def policy_inputs(B, T, *, dtype=torch.float64, device="cpu", mask_kind="holes", seed=0):
    """old log-probs in (-3, 0); log-ratios ~ N(0, 0.5^2) so that both clips and a dual clip
    of 2 bind on some tokens; advantages ~ N(0, 1); ref log-probs near logprobs; entropies in
    (0, 2)."""
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, **f) * 3 - 0.01
    lp = old + 0.5 * torch.randn(B, T, **f)
    adv = torch.randn(B, T, **f)
    ref = lp + 0.4 * torch.randn(B, T, **f)
    ent = torch.rand(B, T, **f) * 2
    mask = make_mask(mask_kind, B, T, generator=g)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return dict(logprobs=cast(lp), old_logprobs=cast(old), advantages=cast(adv), mask=mask.to(device),
                ref_logprobs=cast(ref), entropy=cast(ent))


def policy_run(inp, *, impl, use_ref=False, use_entropy=False, **kw):
    """-> (loss, stats, grad_logprobs, grad_entropy) with the loss backpropagated."""
    lp = inp["logprobs"].detach().clone().requires_grad_()
    ent = inp["entropy"].detach().clone().requires_grad_() if use_entropy else None
    ref = inp["ref_logprobs"] if use_ref else None
    loss, stats = policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], ref_logprobs=ref,
                              entropy=ent, impl=impl, **kw)
    loss.backward()
    return loss.detach(), stats, lp.grad, (ent.grad if ent is not None else None)


def value_inputs(B, T, *, dtype=torch.float64, device="cpu", mask_kind="holes", seed=0):
    """returns ~ 1 + 2 N(0, 1); old values near the returns; new values within ~0.3 of the old
    ones, so that a clip of 0.2 binds on some tokens and not on others."""
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    ret = 1 + 2 * torch.randn(B, T, **f)
    old = ret + 0.7 * torch.randn(B, T, **f)
    v = old + 0.3 * torch.randn(B, T, **f)
    mask = make_mask(mask_kind, B, T, generator=g)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return dict(values=cast(v), old_values=cast(old), returns=cast(ret), mask=mask.to(device))


def value_run(inp, *, impl, **kw):
    v = inp["values"].detach().clone().requires_grad_()
    loss, stats = value_loss(v, inp["old_values"], inp["returns"], inp["mask"], impl=impl, **kw)
    loss.backward()
    return loss.detach(), stats, v.grad


def global_normalizer(mask, agg):
    """The normalizer of the whole batch: valid tokens (token-mean) or non-empty sequences."""
    if agg == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())
