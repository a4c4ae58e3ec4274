"""Generalized advantage estimation and discounted returns over ``[B, T]`` (one row per
sequence or environment), with masks, episode ends and bootstrap values.

Semantics (shared by kernel and reference; math in ``csrc/kernels/gae.h``):

* ``mask[b, t]`` marks valid steps, in any pattern (left/right padding, holes). Invalid steps
  are transparent: the recurrence passes through them (their reward, value and done flag are
  ignored) and their outputs are 0.
* A valid step bootstraps from the value of the next *valid* step in its row, or from
  ``last_values[b]`` (default 0) after the row's last valid step.
* ``dones[b, t]`` ends the episode after step t: no bootstrap and no advantage flows across.

Env-style buffers (CleanRL): CleanRL stores ``dones[t]`` = "obs t starts a new episode" (the
``next_done`` seen *before* step t) in ``[T, N]`` layout, plus ``next_value``/``next_done``
for the step after the buffer. The episode ends after step t when ``dones[t + 1]`` (or
``next_done`` for the last step), so::

    ends = torch.cat([dones[1:], next_done[None]]).T          # [N, T]
    adv, ret = fastrlhf.ops.gae(rewards.T, values.T, dones=ends,
                                gamma=0.99, lam=0.95, last_values=next_value.flatten())

Neither op is differentiable (advantages are targets); see ``forbid_grad``.
NaN/Inf in rewards or values propagate to the affected outputs (nothing is raised).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    Impl,
    as_bool_mask,
    check_finite_scalar,
    check_like,
    check_tensor,
    common_float_dtype,
    forbid_grad,
    use_kernel,
)


class GAEOutput(NamedTuple):
    advantages: torch.Tensor  # [B, T], 0 at invalid steps
    returns: torch.Tensor  # [B, T], advantages + values at valid steps (value targets), else 0


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    dones: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> GAEOutput:
    """Generalized advantage estimation.

    Args:
        rewards: ``[B, T]`` float. Per-step rewards (for RLHF: KL penalty per token plus the
            score at the last response token).
        values: ``[B, T]`` float. Value estimates V(s_t).
        mask: ``[B, T]`` bool (or 0/1 numbers), valid steps. Default: all valid.
        dones: ``[B, T]`` bool (or 0/1), episode ends after step t. Default: none.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].
        last_values: ``[B]`` bootstrap value after each row's last valid step. Default 0.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``GAEOutput(advantages, returns)``, both ``[B, T]`` in the promoted input dtype;
        ``A_t = delta_t + gamma * lam * A_{t+1}``, ``delta_t = r_t + gamma V_{t+1} - V_t``,
        returns = A + V at valid steps; 0 at invalid steps. Accumulates in fp32 (fp64 for fp64).
    """
    op = "gae"
    check_tensor(op, "rewards", rewards, ndim=2)
    check_tensor(op, "values", values)
    check_like(op, "values", values, "rewards", rewards)
    mask = as_bool_mask(op, "mask", mask, "rewards", rewards)
    dones = as_bool_mask(op, "dones", dones, "rewards", rewards)
    if last_values is not None:
        check_tensor(op, "last_values", last_values)
        check_like(op, "last_values", last_values, "rewards", rewards, shape=rewards.shape[:1])
    gamma = check_finite_scalar(op, "gamma", gamma, low=0.0, high=1.0)
    lam = check_finite_scalar(op, "lam", lam, low=0.0, high=1.0)
    forbid_grad(op, rewards=rewards, values=values, last_values=last_values)

    dtype = common_float_dtype(rewards, values, last_values)
    rewards, values = rewards.to(dtype), values.to(dtype)
    last_values = last_values.to(dtype) if last_values is not None else None
    if use_kernel(op, impl, rewards.device, dtype):
        adv, ret = torch.ops.fastrlhf.gae.default(rewards, values, mask, dones, last_values, gamma, lam)
    else:
        adv, ret = reference.gae(rewards, values, mask, dones, gamma=gamma, lam=lam, last_values=last_values)
    return GAEOutput(adv, ret)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    dones: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Discounted returns ``R_t = r_t + gamma * (1 - done_t) * R_{next valid step}`` (REINFORCE,
    REINFORCE++), ``[B, T] -> [B, T]``, 0 at invalid steps. Masks and dones as in :func:`gae`.

    Args:
        rewards: ``[B, T]`` float. Per-step rewards (not differentiable).
        mask: ``[B, T]`` bool (or 0/1 numbers), valid steps; invalid steps are skipped by the
            recurrence and get 0. Default: all valid.
        dones: ``[B, T]`` bool (or 0/1), episode ends after step t (nothing flows back across).
            Default: none.
        gamma: discount in [0, 1].
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``[B, T]`` returns in ``rewards``' dtype, 0 at invalid steps (no bootstrap after a row's
        last valid step: GAE with zero values and ``lam = 1``).
    """
    op = "discounted_returns"
    check_tensor(op, "rewards", rewards, ndim=2)
    mask = as_bool_mask(op, "mask", mask, "rewards", rewards)
    dones = as_bool_mask(op, "dones", dones, "rewards", rewards)
    gamma = check_finite_scalar(op, "gamma", gamma, low=0.0, high=1.0)
    forbid_grad(op, rewards=rewards)
    if use_kernel(op, impl, rewards.device, rewards.dtype):
        return torch.ops.fastrlhf.discounted_returns.default(rewards, mask, dones, gamma)
    return reference.discounted_returns(rewards, mask, dones, gamma=gamma)


class GAE(nn.Module):
    """Module face of :func:`gae` holding ``gamma`` and ``lam``:
    ``forward(rewards, values, mask=None, dones=None, last_values=None) -> GAEOutput``.

    Args:
        gamma, lam, impl: as in :func:`gae`.
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95, impl: Impl = "auto"):
        super().__init__()
        self.gamma, self.lam, self.impl = gamma, lam, impl

    def forward(self, rewards, values, mask=None, dones=None, last_values=None) -> GAEOutput:
        return gae(rewards, values, mask, dones, gamma=self.gamma, lam=self.lam,
                   last_values=last_values, impl=self.impl)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, lam={self.lam}, impl={self.impl!r}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::gae")
    def _gae_fake(rewards, values, mask, dones, last_values, gamma, lam):
        torch._check(rewards.dim() == 2, lambda: "rewards must be [B, T]")
        torch._check(values.shape == rewards.shape, lambda: "values must match rewards")
        return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)

    @torch.library.register_fake("fastrlhf::discounted_returns")
    def _discounted_returns_fake(rewards, mask, dones, gamma):
        torch._check(rewards.dim() == 2, lambda: "rewards must be [B, T]")
        return rewards.new_empty(rewards.shape)
