"""Value-based TD targets and the tabular Q-learning / SARSA update.

    q_learning:  y = r + gamma * (1 - done) * max_a' Q(s', a')
    sarsa:       y = r + gamma * (1 - done) * Q(s', a'_taken)
    q_update:    Q(s, a) <- Q(s, a) + alpha * (y - Q(s, a))

Shapes: ``rewards [...]``, ``next_q [..., A]``: a batch of tabular rows (``[B, A]``) or a
token-level Q head (``[B, T, A]``). At done steps y = r exactly and ``next_q`` is not read, so a
garbage (even NaN) terminal row is harmless; elsewhere NaN in ``next_q`` propagates. Actions
outside ``[0, A)`` raise (CPU) or trip a device-side check (CUDA), like ``torch.gather``.
Not differentiable: a DQN loss regresses Q(s, a) onto these *detached* targets.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import (
    Impl,
    as_bool_mask,
    check_finite_scalar,
    check_index,
    check_like,
    check_tensor,
    forbid_grad,
    use_kernel,
)


def td_targets(
    rewards: torch.Tensor,
    next_q: torch.Tensor,
    dones: torch.Tensor | None = None,
    *,
    gamma: float,
    method: Literal["q_learning", "sarsa"] = "q_learning",
    next_actions: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """TD targets ``[...]`` from rewards ``[...]`` and next-state Q values ``[..., A]``.

    Args:
        rewards: ``[...]`` float (``next_q``'s shape without the last dim), the step rewards.
        next_q: ``[..., A]`` float, Q values of the next state for each of the ``A`` actions.
            Not read at done steps.
        dones: ``[...]`` bool (or 0/1), episode ends after this step: the target is ``r`` (no
            bootstrap). Default: none.
        gamma: discount in [0, 1] (keyword, required).
        method: ``"q_learning"`` bootstraps from ``max_a' Q(s', a')``; ``"sarsa"`` from
            ``Q(s', next_actions)``.
        next_actions: ``[...]`` integer, the action taken in the next state, in ``[0, A)``;
            required with ``method="sarsa"``, refused with ``"q_learning"``.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``[...]`` targets in ``next_q``'s dtype (not differentiable).
    """
    op = "td_targets"
    check_tensor(op, "next_q", next_q)
    if next_q.dim() < 1 or next_q.shape[-1] < 1:
        raise ValueError(f"fastrlhf.ops.{op}: next_q must be [..., A] with A >= 1, got {tuple(next_q.shape)}")
    check_tensor(op, "rewards", rewards)
    check_like(op, "rewards", rewards, "next_q[..., 0]", next_q, shape=next_q.shape[:-1])
    dones = as_bool_mask(op, "dones", dones, "rewards", rewards)
    gamma = check_finite_scalar(op, "gamma", gamma, low=0.0, high=1.0)
    if method == "sarsa":
        if next_actions is None:
            raise ValueError(f"fastrlhf.ops.{op}: method='sarsa' needs next_actions")
        next_actions = check_index(op, "next_actions", next_actions, "rewards", rewards, shape=rewards.shape)
    elif method == "q_learning":
        if next_actions is not None:
            raise ValueError(f"fastrlhf.ops.{op}: next_actions is only used with method='sarsa'")
    else:
        raise ValueError(f"fastrlhf.ops.{op}: method must be 'q_learning' or 'sarsa', got {method!r}")
    forbid_grad(op, rewards=rewards, next_q=next_q)
    rewards = rewards.to(next_q.dtype)
    if use_kernel(op, impl, next_q.device, next_q.dtype):
        return torch.ops.fastrlhf.td_targets.default(rewards, next_q, dones, next_actions, gamma)
    return reference.td_targets(rewards, next_q, dones, gamma=gamma, next_actions=next_actions)


def q_update(
    q: torch.Tensor,
    actions: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Returns a copy of ``q [..., A]`` with ``Q[..., a] += alpha * (target - Q[..., a])`` for the
    taken ``actions [...]`` and ``targets [...]`` (e.g. from :func:`td_targets`). For a full table
    ``Q[S, A]``, pass ``Q[states]`` and write the result back with ``Q[states] = ...`` (states
    distinct) or apply updates sequentially.

    Args:
        q: ``[..., A]`` float, current Q values (not modified).
        actions: ``[...]`` integer, the action taken at each row, in ``[0, A)``.
        targets: ``[...]`` float, the regression targets ``y`` (cast to ``q``'s dtype).
        alpha: learning rate in [0, 1] (keyword, required); 0 leaves ``q`` unchanged, 1 sets
            ``Q[..., a] = target``.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        The updated copy of ``q``, same shape and dtype; only the taken actions' entries change.
    """
    op = "q_update"
    check_tensor(op, "q", q)
    if q.dim() < 1 or q.shape[-1] < 1:
        raise ValueError(f"fastrlhf.ops.{op}: q must be [..., A] with A >= 1, got {tuple(q.shape)}")
    actions = check_index(op, "actions", actions, "q[..., 0]", q, shape=q.shape[:-1])
    check_tensor(op, "targets", targets)
    check_like(op, "targets", targets, "q[..., 0]", q, shape=q.shape[:-1])
    alpha = check_finite_scalar(op, "alpha", alpha, low=0.0, high=1.0)
    forbid_grad(op, q=q, targets=targets)
    targets = targets.to(q.dtype)
    if use_kernel(op, impl, q.device, q.dtype):
        return torch.ops.fastrlhf.q_update.default(q, actions, targets, alpha)
    return reference.q_update(q, actions, targets, alpha=alpha)


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::td_targets")
    def _td_targets_fake(rewards, next_q, dones, next_actions, gamma):
        torch._check(rewards.shape == next_q.shape[:-1], lambda: "rewards must be next_q[..., 0]")
        return rewards.new_empty(rewards.shape)

    @torch.library.register_fake("fastrlhf::q_update")
    def _q_update_fake(q, actions, targets, alpha):
        torch._check(actions.shape == q.shape[:-1], lambda: "actions must be q[..., 0]")
        return q.new_empty(q.shape)
