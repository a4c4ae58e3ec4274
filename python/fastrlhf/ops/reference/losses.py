"""Reference RL losses: KL estimators, the PPO/GRPO policy loss and the clipped value loss,
written the way popular trainers write them (tensor ops, autograd for gradients)."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               k3_clamp: bool = True) -> torch.Tensor:
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "abs":
        return d.abs()
    if not k3_clamp:  # as TRL
        return torch.exp(-d) + d - 1
    # k3 / low-variance KL with verl's clamps
    lr = (-d).clamp(-20.0, 20.0)
    return (lr.exp() - lr - 1).clamp(max=10.0)


def aggregate(token_loss, mask, agg: str, normalizer=None, norm_length=None):
    """token_loss, mask [B, T] -> scalar, as csrc/kernels/loss_agg.h (empty rows weigh 0)."""
    m = mask.to(token_loss.dtype)
    lens = m.sum(-1)  # (B,)
    row_sums = torch.where(mask, token_loss, torch.zeros_like(token_loss)).sum(-1)  # (B,)
    n_tok, n_seq = lens.sum(), (lens > 0).to(lens.dtype).sum()
    if agg == "token-mean":
        denom = n_tok if normalizer is None else torch.as_tensor(normalizer, dtype=lens.dtype)
        w = torch.full_like(lens, 1.0) / denom
    else:
        seq = n_seq if normalizer is None else torch.as_tensor(normalizer, dtype=lens.dtype)
        if agg == "seq-mean-token-mean":
            w = 1.0 / (lens * seq)
        elif agg == "seq-mean-token-sum":
            w = torch.full_like(lens, 1.0) / seq
        else:
            L = token_loss.shape[-1] if norm_length is None else norm_length
            w = torch.full_like(lens, 1.0) / (L * seq)
    w = torch.where((lens > 0) & torch.isfinite(w), w, torch.zeros_like(w))
    return (w * row_sums).sum()


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", kl_k3_clamp=True, entropy=None, entropy_coef=0.0,
                agg="token-mean", normalizer=None, norm_length=None):
    """-> (loss, stats dict) computed with eager tensor ops."""
    acc = acc_dtype(logprobs.dtype)
    lp, old, adv = logprobs.to(acc), old_logprobs.to(acc), advantages.to(acc)
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (pg3 < pg)
        pg = torch.where(dual, pg3, pg)
    token_loss = pg
    kl = torch.zeros_like(lp)
    if ref_logprobs is not None:
        kl = kl_penalty(lp, ref_logprobs.to(acc), estimator=kl_estimator, k3_clamp=kl_k3_clamp)
        token_loss = token_loss + kl_coef * kl
    ent = entropy.to(acc) if entropy is not None else torch.zeros_like(lp)
    if entropy is not None:
        token_loss = token_loss - entropy_coef * ent
    loss = aggregate(token_loss, mask, agg, normalizer, norm_length)
    with torch.no_grad():
        m = mask
        n = m.sum().clamp(min=1).to(acc)

        def mean(x):
            return torch.where(m, x.to(acc), torch.zeros((), dtype=acc)).sum() / n

        low = (adv < 0) & (ratio < 1 - clip_low)
        high = (adv > 0) & (ratio > 1 + clip_high)
        stats = {
            "pg_loss": aggregate(pg, mask, agg, normalizer, norm_length),
            "kl": mean(kl),
            "entropy": mean(ent),
            "clipfrac": mean(low | high),
            "clipfrac_low": mean(low),
            "clipfrac_high": mean(high),
            "dual_clipfrac": mean(dual),
            "approx_kl": mean((ratio - 1) - log_ratio),
            "ratio_mean": mean(ratio),
            "ratio_max": torch.where(m, ratio, torch.full_like(ratio, -float("inf"))).max()
            if m.any() else torch.zeros((), dtype=acc),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", normalizer=None, norm_length=None):
    acc = acc_dtype(values.dtype)
    v, old, ret = values.to(acc), old_values.to(acc), returns.to(acc)
    l1 = (v - ret) ** 2
    if clip is None:
        token_loss = 0.5 * l1
        clipped = torch.zeros_like(mask)
    else:
        v_clip = old + (v - old).clamp(-clip, clip)
        l2 = (v_clip - ret) ** 2
        token_loss = 0.5 * torch.maximum(l1, l2)
        clipped = ((v - old).abs() > clip) & (l2 > l1)  # where the clip binds and wins
    loss = aggregate(token_loss, mask, agg, normalizer, norm_length)
    with torch.no_grad():
        n = mask.sum().clamp(min=1).to(acc)
        z = torch.zeros((), dtype=acc)

        def mean(x):
            return torch.where(mask, x.to(acc), z).sum() / n

        res = ret - v

        def var(x):  # shifted by a valid sample, then two-pass: exactly 0 for constant data
            first = x[mask][:1]
            xs = x - (first if first.numel() else torch.zeros(1, dtype=x.dtype))
            return mean((xs - mean(xs)) ** 2)

        var_r, var_res = var(ret), var(res)
        stats = {
            "clipfrac": mean(clipped),
            "explained_variance": torch.where(var_r > 0, 1 - var_res / var_r, torch.full_like(var_r, float("nan"))),
            "value_mean": mean(v),
            "return_mean": mean(ret),
        }
    return loss, stats
