"""tests/helpers/asserts.py: the floor of ``assert_close`` follows the magnitude of what it checks,
so a low-precision tensor of small entries (a log-softmax gradient over a large vocabulary) cannot
be matched by zeros, while the same tensor correctly rounded to its dtype passes."""

from __future__ import annotations

import pytest
import torch

from helpers import TOLERANCES, assert_close
from helpers.asserts import magnitude


def small_gradient(seed=0, N=6, V=4000, weight=1e-3):
    """fp64 d/dlogits of sum(u * log_softmax(logits)[token]) with small upstream weights u: rows
    of u (onehot - p), entries from ~1e-3 (the token) down to ~1e-9 (the tail of p)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, V, (N,), generator=g)
    u = weight * (1 + torch.rand(N, generator=g, dtype=torch.float64))
    p = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    return u[:, None] * (onehot - p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_gradient_fails_and_rounded_gradient_passes(dtype):
    want = small_gradient()
    assert want.abs().max() < 3e-3 and want.abs().median() < 1e-6  # every entry below the old 2e-2 floor
    rounded = want.to(dtype)
    assert_close(rounded, want, dtype, what="correctly rounded")
    with pytest.raises(AssertionError, match="not close"):
        assert_close(torch.zeros_like(rounded), want, dtype, what="zeros")
    # the hole this closes: the table's atol as an absolute floor (the old rule) accepted zeros
    assert_close(torch.zeros_like(rounded), want, dtype, atol=TOLERANCES[dtype]["atol"])


def test_small_entries_are_checked_against_their_row():
    """Zeroing every entry below 5% of its row's largest one, or scaling a row by 1.05, fails;
    the largest entries alone do not carry the check."""
    want = small_gradient(seed=1)
    rounded = want.to(torch.bfloat16)
    row_max = want.abs().amax(-1, keepdim=True)
    head_only = torch.where(want.abs() >= 0.05 * row_max, rounded, torch.zeros_like(rounded))
    with pytest.raises(AssertionError, match="not close"):
        assert_close(head_only, want, torch.bfloat16)
    scaled = rounded.clone()
    scaled[2] = (want[2] * 1.05).to(torch.bfloat16)
    with pytest.raises(AssertionError, match=r"worst at index \(2, "):
        assert_close(scaled, want, torch.bfloat16)


def test_rows_are_scaled_independently():
    """Default: each row (last dim) has its own floor, so a tiny row next to a large one is held to
    its own magnitude; scale="tensor" uses the whole tensor's."""
    want = torch.stack([torch.linspace(-1, 1, 8, dtype=torch.float64), torch.linspace(-1e-4, 1e-4, 8,
                                                                                      dtype=torch.float64)])
    got = want.clone()
    got[1] = 0.0
    with pytest.raises(AssertionError, match=r"worst at index \(1, "):
        assert_close(got.float(), want, torch.float32)
    assert_close(got.float(), want, torch.float32, atol=2e-4, scale="tensor")  # 2e-4 x max|want| = 2e-4
    assert torch.equal(magnitude(want), torch.tensor([[1.0], [1e-4]], dtype=torch.float64))
    assert magnitude(want, "tensor").item() == 1.0 and magnitude(want, 3.0).item() == 3.0


def test_explicit_atol_is_absolute_and_zero_rows_must_match():
    want = torch.tensor([[0.0, 0.0], [1e-12, -2e-12]], dtype=torch.float64)
    noise = torch.full_like(want, 1e-16)
    with pytest.raises(AssertionError, match=r"worst at index \(0, "):  # an all-zero row: no floor at all
        assert_close(want + noise, want)
    assert_close(want + noise, want, atol=1e-15)  # explicit: absolute
    assert_close(want + noise, want, scale=1.0)  # the table's atol (1e-10), absolute
    with pytest.raises(AssertionError):
        assert_close(want + noise, want, atol=1e-15, scale="row")  # 1e-15 x 2e-12 on row 1


def test_shapes_nan_inf_and_scalars():
    assert_close(torch.tensor(2.0), torch.tensor(2.0 + 1e-6, dtype=torch.float64))
    with pytest.raises(AssertionError):  # a 0-d tensor is its own row: (rtol + atol) x |expected|
        assert_close(torch.tensor(2.0), torch.tensor(2.0001, dtype=torch.float64))
    assert_close(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.float64))
    assert_close(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.float64))
    nan_inf = torch.tensor([[float("nan"), float("inf"), 1.0]], dtype=torch.float64)
    assert_close(nan_inf.float(), nan_inf)  # NaN / Inf are not part of the row's magnitude
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_close(torch.tensor([[0.0, float("inf"), 1.0]]), nan_inf)
    with pytest.raises(AssertionError, match="not close"):
        assert_close(torch.tensor([[float("nan"), -float("inf"), 1.0]]), nan_inf)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="scale must be"):
        assert_close(torch.zeros(2), torch.zeros(2), scale="col")
