"""Reference pairwise preference loss (DPO, IPO, hinge, Bradley-Terry reward models), written
the way TRL writes ``dpo_loss`` and the reward trainer's loss (tensor ops, autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf.ops.reference._acc import acc_dtype


def preference_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta=0.1, loss_type="sigmoid",
                    label_smoothing=0.0, margin=None, normalizer=None):
    """-> (loss [], stats dict)."""
    acc = acc_dtype(chosen.dtype)
    c, r = chosen.to(acc), rejected.to(acc)
    rc = ref_chosen.to(acc) if ref_chosen is not None else torch.zeros_like(c)
    rr = ref_rejected.to(acc) if ref_rejected is not None else torch.zeros_like(r)
    h = (c - rc) - (r - rr)  # [B] implicit reward difference (log-ratio difference for DPO)
    m = margin.to(acc) if margin is not None else torch.zeros_like(h)
    z = beta * h - m
    if loss_type == "sigmoid":
        per_row = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        per_row = (h - m - 1 / (2 * beta)) ** 2
    else:  # hinge
        per_row = torch.relu(1 - z)
    n = float(h.shape[0]) if normalizer is None else float(normalizer)
    loss = per_row.sum() / n if h.shape[0] else per_row.sum()
    with torch.no_grad():
        count = max(h.shape[0], 1)
        stats = {
            "rewards_chosen": (beta * (c - rc)).sum() / count,
            "rewards_rejected": (beta * (r - rr)).sum() / count,
            "reward_margin": (beta * h).sum() / count,
            "accuracy": (h > 0).to(acc).sum() / count,
        }
    return loss, stats
