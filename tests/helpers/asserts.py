"""Per-dtype tolerances and ``assert_close``: one table for every op test."""

from __future__ import annotations

import torch

# ---- tolerances ---------------------------------------------------------------------------

# Kernel vs reference (or low-precision kernel vs an fp64 reference on the same, already rounded,
# inputs). Low-precision outputs carry one rounding of the storage dtype on top of fp32
# accumulation: bf16 has 8 significant bits (half-ulp 2e-3), fp16 has 11 (half-ulp 2.4e-4).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 *, rtol: float | None = None, atol: float | None = None, what: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise with the tolerances of
    ``dtype`` (default: actual's dtype); NaN must match NaN. Compares in fp64, on the CPU.
    On failure, reports the worst element, its index and the inputs' dtypes."""
    dtype = dtype or actual.dtype
    tol = TOLERANCES[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what} shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(
            f"{what} NaN pattern differs at index {idx}: actual {a[tuple(idx)].item()} vs "
            f"expected {e[tuple(idx)].item()} ({(nan_a != nan_e).sum().item()} elements differ)"
        )
    a, e = torch.where(nan_a, 0.0, a), torch.where(nan_e, 0.0, e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e)
    err = torch.where(inf_mismatch, float("inf"), (a - e).abs().nan_to_num(0.0))
    bound = atol + rtol * e.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    bad = err > bound
    if bad.any():
        excess = torch.where(bad, err - bound, torch.zeros_like(err))
        flat = int(excess.reshape(-1).argmax())
        idx = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{what} not close ({dtype}: rtol={rtol:g}, atol={atol:g}; actual {actual.dtype}, "
            f"expected {expected.dtype}): {int(bad.sum())} of {a.numel()} elements out of "
            f"tolerance; worst at index {idx}: actual {a[idx].item()!r} vs expected "
            f"{e[idx].item()!r} (|diff| {err[idx].item():.3e}); max |diff| overall "
            f"{err.max().item():.3e}"
        )
