"""Argument handling shared by policy_loss and value_loss: [B, T] tensors and aggregation."""

from __future__ import annotations

import torch

from fastrlhf.ops._common import as_bool_mask, check_finite_scalar, check_like, check_tensor

AGG_MODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}


def agg_code(op: str, agg: str) -> int:
    if agg not in AGG_MODES:
        raise ValueError(f"fastrlhf.ops.{op}: agg must be one of {list(AGG_MODES)}, got {agg!r}")
    return AGG_MODES[agg]


def check_bt(op: str, name: str, x, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(op, name, x)
    check_like(op, name, x, ref_name, ref)


def bt_mask(op: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    return as_bool_mask(op, "mask", mask, ref_name, ref)


def positive_or_none(op: str, name: str, value) -> float:
    """Optional positive scalar (a Python number) -> float, or 0.0 meaning 'not given'."""
    if value is None:
        return 0.0
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"fastrlhf.ops.{op}: {name} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    value = check_finite_scalar(op, name, value)
    if value <= 0:
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be > 0, got {value}")
    return value
