"""Reference GAE and discounted returns: the textbook reverse loop over time, batched over rows."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def gae(
    rewards: torch.Tensor,  # [B, T]
    values: torch.Tensor | None,  # [B, T] or None (== 0)
    mask: torch.Tensor | None = None,  # [B, T] bool
    dones: torch.Tensor | None = None,  # [B, T] bool
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: torch.Tensor | None = None,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    acc = acc_dtype(rewards.dtype)
    r = rewards.to(acc)
    v = values.to(acc) if values is not None else torch.zeros_like(r)
    valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=r.device)
    done = dones if dones is not None else torch.zeros(B, T, dtype=torch.bool, device=r.device)

    next_adv = torch.zeros(B, dtype=acc, device=r.device)  # advantage of the next valid step
    next_value = (  # value of the next valid step; after the last one, the bootstrap value
        last_values.to(acc) if last_values is not None else torch.zeros(B, dtype=acc, device=r.device)
    )
    adv = torch.zeros(B, T, dtype=acc, device=r.device)
    for t in reversed(range(T)):
        d = done[:, t]  # the episode ends after step t: nothing flows back across it
        delta = torch.where(d, r[:, t], r[:, t] + gamma * next_value) - v[:, t]
        a = torch.where(d, delta, delta + gamma * lam * next_adv)
        m = valid[:, t]
        adv[:, t] = torch.where(m, a, 0.0)
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(valid, adv + v, 0.0)
    return adv.to(rewards.dtype), returns.to(rewards.dtype)


def discounted_returns(
    rewards: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None = None,
    dones: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
) -> torch.Tensor:
    """R_t = r_t + gamma * (1 - done_t) * R_{next valid}: GAE with zero values and lam = 1."""
    returns, _ = gae(rewards, None, mask, dones, gamma=gamma, lam=1.0)
    return returns
