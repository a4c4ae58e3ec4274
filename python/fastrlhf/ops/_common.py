"""Shared plumbing for ``fastrlhf.ops``: choosing kernel vs reference, argument validation,
and the guard for ops that are not differentiable."""

from __future__ import annotations

import os
from typing import Literal

import torch

from fastrlhf import _ext

Impl = Literal["auto", "kernel", "reference"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def force_reference() -> bool:
    """``FASTRLHF_FORCE_REFERENCE=1`` sends every op (even ``impl="kernel"``) to its reference."""
    return os.environ.get("FASTRLHF_FORCE_REFERENCE", "0") not in ("", "0")


def kernel_supports(device: torch.device, dtype: torch.dtype | None = None, *, cuda_kernel: bool = True) -> bool:
    """Whether the compiled extension has a kernel for this device (and dtype); ops without a
    CUDA kernel yet pass ``cuda_kernel=False``."""
    if not _ext.extension_available():
        return False
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_kernel and _ext.cuda_compiled()
    return False


def use_kernel(op: str, impl: str, device: torch.device, dtype: torch.dtype | None = None, *,
               cuda_kernel: bool = True) -> bool:
    """Resolve ``impl`` for one call: True -> compiled kernel, False -> reference."""
    if impl not in ("auto", "kernel", "reference"):
        raise ValueError(f"fastrlhf.ops.{op}: impl must be 'auto', 'kernel' or 'reference', got {impl!r}")
    if impl == "reference" or force_reference():
        return False
    supported = kernel_supports(device, dtype, cuda_kernel=cuda_kernel)
    if impl == "kernel" and not supported:
        why = (
            f"the extension is not loaded ({_ext.extension_error()})"
            if not _ext.extension_available()
            else f"no kernel for device {device.type} / dtype {dtype}"
        )
        raise RuntimeError(f"fastrlhf.ops.{op}: impl='kernel' requested but {why}")
    return supported


# ---- validation ---------------------------------------------------------------------------


def check_tensor(op: str, name: str, x, *, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastrlhf.ops.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastrlhf.ops.{op}: {name} must be a floating tensor (float32, float64, float16 or "
            f"bfloat16), got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"fastrlhf.ops.{op}: {name} must have {ndim} dims, got shape {tuple(x.shape)}")


def check_like(op: str, name: str, x, ref_name: str, ref: torch.Tensor, *, shape=None) -> None:
    """x must be a tensor on ref's device with the given shape (default: ref's shape)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastrlhf.ops.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    want = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(x.shape) != want:
        raise ValueError(
            f"fastrlhf.ops.{op}: {name} must have shape {want} (from {ref_name}), got {tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(
            f"fastrlhf.ops.{op}: {name} is on {x.device} but {ref_name} is on {ref.device}"
        )


def as_bool_mask(op: str, name: str, m, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """Optional mask/flag tensor shaped like ``ref`` -> bool tensor (non-zero is True)."""
    if m is None:
        return None
    check_like(op, name, m, ref_name, ref)
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return m != 0
    raise TypeError(f"fastrlhf.ops.{op}: {name} must be bool (or 0/1 numbers), got {m.dtype}")


def check_index(op: str, name: str, x, ref_name: str, ref: torch.Tensor, *, shape) -> torch.Tensor:
    """Integer index tensor of the given shape on ref's device -> int64."""
    check_like(op, name, x, ref_name, ref, shape=shape)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"fastrlhf.ops.{op}: {name} must be an integer tensor, got {x.dtype}")
    return x.long()


def check_finite_scalar(op: str, name: str, value: float, *, low=None, high=None) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def forbid_grad(op: str, *, differentiable: str | None = None, **tensors) -> None:
    """Refuse silently-detached gradients: if autograd would need a gradient this op does not
    provide, raise and say what to do. ``differentiable`` names the inputs that do get gradients
    (for losses); without it the whole op computes training *targets* and has no backward."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            if differentiable:
                raise RuntimeError(
                    f"fastrlhf.ops.{op}: {name} requires grad, but it is a constant of this loss "
                    f"(gradients flow only to {differentiable}); pass {name}.detach()"
                )
            raise RuntimeError(
                f"fastrlhf.ops.{op} is not differentiable but {name} requires grad; pass "
                f"{name}.detach() (targets are computed without gradients) or call it under "
                "torch.no_grad()"
            )


def common_float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype
