"""Shared test helpers for fastrlhf.

* ``DEVICES``: ``"cpu"`` always, plus ``"cuda"`` (marked ``cuda``) that skips itself when there
  is no GPU or the extension was built without CUDA. Use ``@pytest.mark.parametrize("device",
  DEVICES)``.
* ``TOLERANCES`` / ``assert_close``: one table of per-dtype tolerances for every op test.
* ``make_mask`` / ``MASK_KINDS``: random ``[B, T]`` validity masks of every pattern the ops
  must handle (left / right padding, holes, all-masked rows, ragged spans).
* ``lm_head_inputs``: hidden states, an LM-head weight / bias and tokens for the LM-head ops.

Test modules import these with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path`` because ``tests/`` is not a package).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

import fastrlhf

# Property-based tests: no deadline (the first call of an op may compile/warm up), no example
# database written into the checkout.
settings.register_profile("fastrlhf", deadline=None, database=None, max_examples=60)
settings.load_profile("fastrlhf")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so the suite works from any rootdir
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture(autouse=True)
def _no_forced_reference(monkeypatch):
    """Tests decide kernel vs reference themselves: a FASTRLHF_FORCE_REFERENCE=1 left in the
    environment would silently turn every kernel-vs-reference test into reference-vs-reference."""
    monkeypatch.delenv("FASTRLHF_FORCE_REFERENCE", raising=False)


# ---- devices ------------------------------------------------------------------------------

CUDA_AVAILABLE = bool(torch.cuda.is_available() and fastrlhf.build_info().get("with_cuda", False))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU and a CUDA build of fastrlhf._C"),
        ],
    ),
]
devices = DEVICES  # the same list under the name used in the test plan

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


# ---- masks --------------------------------------------------------------------------------

MASK_KINDS = ["none", "left", "right", "holes", "all_masked_rows", "ragged"]


def make_mask(kind: str, B: int, T: int, *, generator: torch.Generator | None = None,
              device="cpu") -> torch.Tensor | None:
    """Random ``[B, T]`` bool validity mask of one kind (None for ``"none"``).

    left: each row valid on a random-length suffix (left padding, lengths 0..T);
    right: valid on a random-length prefix (right padding); holes: each step valid with p=0.7;
    all_masked_rows: holes, with every other row (and at least row 0) entirely masked;
    ragged: one valid contiguous span per row with random start and length (padding on both
    sides, empty spans included).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(1234)
    if kind == "none":
        return None
    t = torch.arange(T)[None, :]  # (1, T)
    if kind in ("left", "right"):
        lengths = torch.randint(0, T + 1, (B, 1), generator=g)
        if B > 1:  # make sure both extremes appear
            lengths[0, 0], lengths[-1, 0] = T, 0
        m = t >= (T - lengths) if kind == "left" else t < lengths
    elif kind == "holes":
        m = torch.rand(B, T, generator=g) < 0.7
    elif kind == "all_masked_rows":
        m = torch.rand(B, T, generator=g) < 0.7
        m[::2] = False
    elif kind == "ragged":
        start = torch.randint(0, T + 1, (B, 1), generator=g)
        length = (torch.rand(B, 1, generator=g) * (T + 1 - start)).long()
        m = (t >= start) & (t < start + length)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return m.to(device)


# ---- LM-head inputs (linear_token_logprobs, linear_token_loss) -------------------------------


def lm_head_inputs(lead, H, V, *, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """hidden ~ N(0, 1) [*lead, H], weight ~ N(0, 1/H) [V, H] (logits ~ N(0, 1)), bias ~ N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    hidden = torch.randn(*lead, H, **f64).to(device, dtype)
    weight = (torch.randn(V, H, **f64) * 2.0 / H**0.5).to(device, dtype)
    b = (torch.randn(V, **f64) * 0.5).to(device, dtype) if bias else None
    tokens = torch.randint(0, V, tuple(lead), generator=g).to(device)
    return dict(hidden=hidden, weight=weight, bias=b, tokens=tokens)
