"""Shared plumbing for ``fastrlhf.ops``: choosing kernel vs reference, the enum-like argument
types (``Literal``s the CLI reuses), argument validation shared by several ops, and the guard
for ops that are not differentiable."""

from __future__ import annotations

import os
from typing import Literal

import torch

from fastrlhf import _ext

Impl = Literal["auto", "kernel", "reference"]
"""Which implementation an op runs: ``auto`` (the kernel when the extension supports the device and
dtype, else the reference), ``kernel`` (or an error), ``reference``."""

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
"""How a ``[B, T]`` token loss becomes a scalar (``policy_loss``, ``value_loss``): see
:func:`~fastrlhf.ops.policy_loss`."""

AGG_MODES: dict[str, int] = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2,
                             "seq-mean-token-sum-norm": 3}  # name -> the kernels' code (csrc/kernels/loss_agg.h)

KLEstimator = Literal["k1", "k2", "k3", "abs"]
"""Schulman's per-token KL estimators (see :func:`~fastrlhf.ops.kl_penalty`)."""

KL_ESTIMATORS: dict[str, int] = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}  # name -> the kernels' code

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
    """Optional mask/flag tensor shaped like ``ref`` -> bool tensor. Numbers must be 0 or 1: a
    fractional weight such as 0.5 is refused, not silently read as True (pass bool masks to skip
    this check, which reads the values)."""
    if m is None:
        return None
    check_like(op, name, m, ref_name, ref)
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() or m.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        if not torch.compiler.is_compiling() and m.numel() and bool(((m != 0) & (m != 1)).any()):
            bad = m[(m != 0) & (m != 1)][0].item()
            raise ValueError(f"fastrlhf.ops.{op}: {name} must hold only 0 and 1 (or be bool), found {bad}; "
                             "a mask marks valid entries, it is not a weight")
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


def check_temperature(op: str, temperature: float) -> float:
    """A finite temperature > 0 -> float."""
    temperature = check_finite_scalar(op, "temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"fastrlhf.ops.{op}: temperature must be > 0, got {temperature}")
    return temperature


def check_choice(op: str, name: str, value: str, choices) -> str:
    """``value`` must be one of ``choices`` (a Literal's values)."""
    if value not in choices:
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be one of {list(choices)}, got {value!r}")
    return value


# ---- the LM-head ops (linear_token_logprobs, linear_token_loss) -----------------------------


def check_lm_head(op: str, hidden, weight, tokens, bias) -> torch.Tensor:
    """Validate ``hidden [..., H]``, ``weight [V, H]``, ``tokens [...]``, ``bias [V]`` (one device,
    one dtype) -> tokens as int64."""
    check_tensor(op, "hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"fastrlhf.ops.{op}: hidden must be [..., H], got {tuple(hidden.shape)}")
    check_tensor(op, "weight", weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fastrlhf.ops.{op}: weight must be [V, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"fastrlhf.ops.{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"fastrlhf.ops.{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias)
        check_like(op, "bias", bias, "weight[:, 0]", weight, shape=weight.shape[:1])
        if bias.dtype != hidden.dtype:
            raise TypeError(f"fastrlhf.ops.{op}: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    return check_index(op, "tokens", tokens, "hidden[..., 0]", hidden, shape=hidden.shape[:-1])


def check_chunk_size(op: str, chunk_size: int | None, *, name: str = "chunk_size") -> int:
    """A positive int, or None -> 0 (the implementation's default)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fastrlhf.ops.{op}: {name} must be a positive int, got {chunk_size!r}")
    return chunk_size


# ---- the [B, T] losses (policy_loss, value_loss) ---------------------------------------------


def agg_code(op: str, agg: str) -> int:
    """An aggregation mode name -> the kernels' code."""
    return AGG_MODES[check_choice(op, "agg", agg, AGG_MODES)]


def check_bt(op: str, name: str, x, ref_name: str, ref: torch.Tensor) -> None:
    """A floating tensor shaped and placed like ``ref``."""
    check_tensor(op, name, x)
    check_like(op, name, x, ref_name, ref)


def bt_mask(op: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """An optional ``[B, T]`` mask -> bool (None: all valid)."""
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
