"""Reference group-relative advantages (GRPO / Dr. GRPO / RLOO)."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def group_advantages(
    scores: torch.Tensor,  # [N], N = n_groups * group_size, groups consecutive
    group_size: int,
    *,
    normalize: str = "std",
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    G = group_size
    x = scores.to(acc_dtype(scores.dtype)).view(-1, G)  # (n_groups, G)
    if x.numel() == 0:
        return scores.clone()
    # advantages depend only on differences: shifting by the first sample keeps a constant
    # group exactly 0 even when its mean is not representable
    x = x - x[:, :1]
    if leave_one_out:
        baseline = (x.sum(dim=1, keepdim=True) - x) / (G - 1)  # mean of the other G-1 samples
    else:
        baseline = x.mean(dim=1, keepdim=True)
    adv = x - baseline
    if normalize == "std":
        std = x.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(x[:, :1])  # unbiased
        adv = adv / (std + eps)
    return adv.reshape(-1).to(scores.dtype)
