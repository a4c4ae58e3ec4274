"""Per-dtype tolerances and ``assert_close``: one table for every op test."""

from __future__ import annotations

import torch

# ---- tolerances ---------------------------------------------------------------------------

# Kernel vs reference (or low-precision kernel vs an fp64 reference on the same, already rounded,
# inputs). Low-precision outputs carry one rounding of the storage dtype on top of fp32
# accumulation: bf16 has 8 significant bits (half-ulp 2e-3), fp16 has 11 (half-ulp 2.4e-4).
#
# ``atol`` here is a *relative* floor: assert_close multiplies it by the largest |expected| of
# each row (the last dim), so the bound is ``atol * max|expected_row| + rtol * |expected|``.
# Rounding and fp32 accumulation errors scale with the magnitudes involved; a fixed floor of 2e-2
# would accept anything (zeros included) for a tensor whose entries are all ~1e-4, such as the
# gradient of a log-softmax over a large vocabulary.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def magnitude(expected: torch.Tensor, scale: str | float = "row") -> torch.Tensor:
    """What :func:`assert_close` multiplies ``atol`` by (fp64, CPU, broadcastable to
    ``expected``; NaN / Inf ignored): ``"row"``, the largest |expected| over the last dim (a 0-d
    tensor is its own row); ``"tensor"``, the largest |expected| of the whole tensor; a number,
    that number (``1.0``: ``atol`` is absolute)."""
    e = expected.detach().to("cpu", torch.float64).nan_to_num(0.0, posinf=0.0, neginf=0.0).abs()
    if not isinstance(scale, str):
        return torch.tensor(float(scale), dtype=torch.float64)
    if e.numel() == 0 or e.dim() == 0:
        return e
    if scale == "row":
        return e.amax(dim=-1, keepdim=True)
    if scale == "tensor":
        return e.max()
    raise ValueError(f"assert_close: scale must be 'row', 'tensor' or a number, got {scale!r}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 *, rtol: float | None = None, atol: float | None = None, scale: str | float | None = None,
                 what: str = "") -> None:
    """``|actual - expected| <= atol * S + rtol * |expected|`` elementwise; NaN must match NaN.
    Compares in fp64, on the CPU. On failure, reports the worst element, its index and the
    inputs' dtypes.

    ``dtype`` picks the row of ``TOLERANCES`` (default: actual's dtype) that gives ``rtol`` and
    ``atol`` unless they are passed. ``S`` (see :func:`magnitude`):

    * default, with the table's ``atol``: ``scale="row"``, the largest |expected| of the row
      (last dim). The floor follows the row's magnitude, so a small-magnitude tensor is held to
      its own scale (an all-zero gradient fails against a gradient of ~1e-4 entries) and the
      bound stays rtol-dominated near each row's large entries. An all-zero expected row must
      then be matched exactly (up to the sign of 0).
    * ``scale="tensor"``: the largest |expected| of the whole tensor, for outputs with rows that
      vanish by cancellation (their rounding noise has the scale of the other rows, not 0).
    * an ``atol`` passed without ``scale`` is absolute (``S = 1``): comparisons against exact
      constants or zeros, or a floor a test states its reason for.
    """
    dtype = dtype or actual.dtype
    tol = TOLERANCES[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    if scale is None:
        scale = "row" if atol is None else 1.0
    atol = tol["atol"] if atol is None else atol
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what} shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    )
    floor = atol * magnitude(expected, scale)
    floor_desc = f"atol={atol:g}" + (f" x max|expected| of the {scale}" if isinstance(scale, str) else
                                     "" if scale == 1.0 else f" x {scale:g}")
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
    bound = (floor + rtol * e.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)).expand_as(err)
    bad = err > bound
    if bad.any():
        excess = torch.where(bad, err - bound, torch.zeros_like(err))
        flat = int(excess.reshape(-1).argmax())
        idx = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{what} not close ({dtype}: rtol={rtol:g}, {floor_desc}; actual {actual.dtype}, "
            f"expected {expected.dtype}): {int(bad.sum())} of {a.numel()} elements out of "
            f"tolerance; worst at index {idx}: actual {a[idx].item()!r} vs expected "
            f"{e[idx].item()!r} (|diff| {err[idx].item():.3e}, bound {bound[idx].item():.3e}); "
            f"max |diff| overall {err.max().item():.3e}"
        )


def assert_as_accurate_as(actual: torch.Tensor, baseline: torch.Tensor, expected: torch.Tensor, *,
                          factor: float = 2.0, atol: float = 1e-4, what: str = "") -> None:
    """``max|actual - expected| <= factor * max|baseline - expected| + atol * max(max|expected|, 1)``.

    FlashAttention's rule for low-precision kernels: ``expected`` is an fp64 reference and
    ``baseline`` PyTorch's own computation in the kernel's dtype, so the bound is the error the
    dtype itself costs, not a hand-set tolerance. NaN must match NaN (in all three).
    """
    a, b, e = (x.detach().to("cpu", torch.float64) for x in (actual, baseline, expected))
    assert a.shape == e.shape == b.shape, f"{what} shapes differ: {tuple(a.shape)}, {tuple(b.shape)}, {tuple(e.shape)}"
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan), f"{what}: NaN pattern of the result differs from the reference's"
    a, b, e = (torch.where(nan, 0.0, x) for x in (a, b, e))
    err, base = (a - e).abs().max().item(), (b - e).abs().max().item()
    bound = factor * base + atol * max(e.abs().max().item(), 1.0)
    assert err <= bound, (f"{what}: max |error| {err:.3e} vs the fp64 reference exceeds {factor:g} x PyTorch's own "
                          f"{actual.dtype} error {base:.3e} + {atol:g} x max(max|expected|, 1) (bound {bound:.3e})")


def runs_at_thread_counts(run):
    """``run()`` twice with 2 torch threads and once with 1 (the thread count restored after):
    ``(a, b, c)``, for tests that outputs are bitwise identical run to run and across threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = run(), run()
        torch.set_num_threads(1)
        c = run()
    finally:
        torch.set_num_threads(before)
    return a, b, c
