"""Reference TD targets (Q-learning / SARSA) and the tabular Q update."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def td_targets(
    rewards: torch.Tensor,  # [...]
    next_q: torch.Tensor,  # [..., A]
    dones: torch.Tensor | None = None,  # [...] bool
    *,
    gamma: float,
    next_actions: torch.Tensor | None = None,  # [...] int64 (SARSA)
) -> torch.Tensor:
    acc = acc_dtype(next_q.dtype)
    q = next_q.to(acc)
    if next_actions is None:  # Q-learning: max_a' Q(s', a')
        nxt = q.max(dim=-1).values
    else:  # SARSA: Q(s', a') of the action actually taken next (not read at done steps)
        taken = next_actions if dones is None else torch.where(dones, 0, next_actions)
        nxt = q.gather(-1, taken.unsqueeze(-1)).squeeze(-1)
    r = rewards.to(acc)
    y = r + gamma * nxt
    if dones is not None:
        y = torch.where(dones, r, y)  # terminal: no bootstrap, next_q is ignored
    return y.to(next_q.dtype)


def q_update(
    q: torch.Tensor,  # [..., A]
    actions: torch.Tensor,  # [...] int64
    targets: torch.Tensor,  # [...]
    *,
    alpha: float,
) -> torch.Tensor:
    """Q(s, a) <- Q(s, a) + alpha * (target - Q(s, a)); returns the updated copy."""
    acc = acc_dtype(q.dtype)
    idx = actions.unsqueeze(-1)
    qa = q.gather(-1, idx).to(acc)
    new = qa + alpha * (targets.to(acc).unsqueeze(-1) - qa)
    return q.scatter(-1, idx, new.to(q.dtype))
