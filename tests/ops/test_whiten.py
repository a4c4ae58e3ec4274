"""fastrlhf.ops.whiten: kernel vs reference over every mask pattern, TRL's masked_whiten,
gradients (gradcheck through the kernel's registered autograd), opcheck, torch.compile,
determinism and bad input."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import Whiten, whiten

from helpers import DEVICES, LOW_PRECISION, MASK_KINDS, assert_close, make_mask

OPTIONS = [dict(shift_mean=s, unbiased=u) for s in (True, False) for u in (True, False)]


def one_valid_mask(B, T, device="cpu"):
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    m[B // 2, T // 3] = True
    return m


def sample_inputs(device, dtype, *, requires_grad=False, seed=0):
    """Yields (x, mask, kwargs): every mask kind (plus a single valid element), 1-D to 3-D
    shapes, shift_mean / unbiased variants. Feeds correctness, gradient, opcheck and compile."""
    g = torch.Generator().manual_seed(seed)
    cases = [((6, 11), kind) for kind in MASK_KINDS] + [((6, 11), "one_valid"), ((17,), "none"), ((2, 3, 5), "holes")]
    for i, (shape, kind) in enumerate(cases):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
        if kind == "one_valid":
            mask = one_valid_mask(*shape, device=device)
        elif len(shape) == 2:
            mask = make_mask(kind, *shape, generator=g, device=device)
        else:
            mask = None if kind == "none" else (torch.rand(*shape, generator=g) < 0.7).to(device)
        x.requires_grad_(requires_grad)
        yield x, mask, OPTIONS[i % len(OPTIONS)]


# ---- kernel vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS + ["one_valid"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"shift{int(o['shift_mean'])}-unb{int(o['unbiased'])}")
def test_kernel_matches_reference_fp64(device, mask_kind, opts):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 40, generator=g, dtype=torch.float64) * 3 - 1).to(device)
    if mask_kind == "one_valid":
        mask = one_valid_mask(8, 40, device)
    else:
        mask = make_mask(mask_kind, 8, 40, generator=g, device=device)
    k = whiten(x, mask, **opts, impl="kernel")
    r = whiten(x, mask, **opts, impl="reference")
    assert_close(k, r)
    if mask is not None:
        assert (k[~mask] == 0).all()
        valid = mask
    else:
        valid = torch.ones_like(x, dtype=torch.bool)
    n = int(valid.sum())
    if opts["shift_mean"] and n > 1:  # whitened valid elements: mean 0, variance ~1
        y = k[valid]
        assert abs(y.mean().item()) < 1e-9
        assert abs(y.var(unbiased=opts["unbiased"]).item() - 1) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_kernel_matches_reference(device):
    for x, mask, opts in sample_inputs(device, torch.float64):
        assert_close(whiten(x, mask, **opts, impl="kernel"), whiten(x, mask, **opts, impl="reference"),
                     what=f"{tuple(x.shape)} {opts}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_vs_fp64_reference(device, dtype):
    for x, mask, opts in sample_inputs(device, dtype, seed=2):
        k = whiten(x, mask, **opts, impl="kernel")
        assert k.dtype == dtype
        assert_close(k, whiten(x.double(), mask, **opts, impl="reference"), dtype, what=f"{tuple(x.shape)} {opts}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "holes"])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_large_n_fp32_vs_fp64_reference(device, mask_kind, shift_mean):
    """300_000 elements: several 32768-element chunks, combined in chunk order; an offset mean
    checks the two-pass variance."""
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(300, 1000, generator=g, dtype=torch.float64) * 2 + 10
    mask = make_mask(mask_kind, 300, 1000, generator=g)
    x = x64.float().to(device)
    mask = mask.to(device) if mask is not None else None
    k = whiten(x, mask, shift_mean=shift_mean, impl="kernel")
    r = whiten(x.double(), mask, shift_mean=shift_mean, impl="reference")
    assert_close(k, r, torch.float32)
    # the op's own statistics
    _, mean, rstd = torch.ops.fastrlhf.whiten.default(x, mask, True, True, 1e-8)
    v = x.double()[mask] if mask is not None else x.double().reshape(-1)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert_close(mean, v.mean(), torch.float32)
    assert_close(rstd, 1 / torch.sqrt(v.var() + 1e-8), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_masked_gives_zeros(device, impl, dtype):
    x = torch.randn(4, 9, dtype=dtype, device=device)
    for opts in OPTIONS:
        out = whiten(x, torch.zeros(4, 9, dtype=torch.bool, device=device), **opts, impl=impl)
        assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_one_valid_element(impl):
    """unbiased: variance taken as 0, so the element whitens to 0 (or to itself without the
    mean shift); biased: the same (its deviation from the mean is 0). No NaN."""
    x = torch.randn(5, 7, dtype=torch.float64)
    m = one_valid_mask(5, 7)
    for opts in OPTIONS:
        out = whiten(x, m, **opts, impl=impl)
        want = torch.zeros_like(x)
        if not opts["shift_mean"]:
            want[m] = x[m]
        assert_close(out, want, what=str(opts))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_empty(impl):
    out = whiten(torch.zeros(0, 5), impl=impl)
    assert out.shape == (0, 5)


def test_non_contiguous_input():
    x = torch.randn(12, 20, dtype=torch.float64)
    mask = torch.rand(20, 12) < 0.6
    k = whiten(x.T, mask, impl="kernel")
    r = whiten(x.T.contiguous(), mask.contiguous(), impl="reference")
    assert_close(k, r)


# ---- TRL ----------------------------------------------------------------------------------


def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mask_kind", ["none", "left", "right", "holes", "ragged"])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_matches_trl_masked_whiten(impl, mask_kind, shift_mean):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 30, generator=g, dtype=torch.float64) + 2
    mask = make_mask(mask_kind, 8, 30, generator=g)
    valid = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
    want = trl_masked_whiten(x, valid.double(), shift_mean=shift_mean)
    out = whiten(x, mask, shift_mean=shift_mean, impl=impl)
    assert_close(out[valid], want[valid])


# ---- NaN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nan_at_valid_element_propagates(impl):
    x = torch.randn(3, 8, dtype=torch.float64)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) < 0.7
    mask[1, 2] = True
    x[1, 2] = float("nan")
    out = whiten(x, mask, impl=impl)
    assert torch.isnan(out[mask]).all()
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_masked_elements_are_ignored_even_nan(impl, bad):
    """Statistics are over the valid elements only: a NaN/Inf under the mask (e.g. padding)
    must not change any output."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = make_mask("right", 4, 10, generator=g)
    base = whiten(x, mask, impl=impl)
    poisoned = whiten(x.masked_fill(~mask, bad), mask, impl=impl)
    assert_close(poisoned, base)


# ---- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "holes", "one_valid", "all_masked_rows"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"shift{int(o['shift_mean'])}-unb{int(o['unbiased'])}")
def test_gradcheck_kernel_path(mask_kind, opts):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = one_valid_mask(3, 5) if mask_kind == "one_valid" else make_mask(mask_kind, 3, 5, generator=g)
    assert torch.autograd.gradcheck(lambda t: whiten(t, mask, **opts, impl="kernel"), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_gradient_equals_reference_gradient(dtype):
    """The registered backward (kernel path) vs autograd through the reference, both against
    the fp64 reference gradient. (The fp32 *reference* gradient is not the oracle: with a single
    valid element and unbiased=True, rstd = 1/sqrt(eps) = 1e4 and autograd cancels two O(1e4)
    terms, losing ~1e-4 absolute; the kernel's closed form is exact there.)"""
    for x, mask, opts in sample_inputs("cpu", dtype, requires_grad=True, seed=5):
        grad_out = torch.randn_like(x)
        (gk,) = torch.autograd.grad(whiten(x, mask, **opts, impl="kernel"), x, grad_out)
        x64 = x.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(whiten(x64, mask, **opts, impl="reference"), x64, grad_out.double())
        assert gk.dtype == dtype
        assert_close(gk, g64, dtype, what=f"grad {tuple(x.shape)} {opts}")
        if mask is not None:
            assert (gk[~mask] == 0).all()


def test_gradient_flows_through_module_and_auto_impl():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = Whiten(shift_mean=False)(x)
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    whiten(x2, shift_mean=False, impl="reference").pow(2).sum().backward()
    assert_close(x.grad, x2.grad)


# ---- determinism, opcheck, compile --------------------------------------------------------


def test_bitwise_deterministic_across_calls_and_threads():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(300_000, generator=g) * 3 + 1
    mask = torch.rand(300_000, generator=g) < 0.8
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = torch.ops.fastrlhf.whiten.default(x, mask, True, True, 1e-8)
        b = torch.ops.fastrlhf.whiten.default(x, mask, True, True, 1e-8)
        torch.set_num_threads(1)
        c = torch.ops.fastrlhf.whiten.default(x, mask, True, True, 1e-8)
    finally:
        torch.set_num_threads(before)
    for other in (b, c):
        assert all(torch.equal(p, q) for p, q in zip(a, other))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for i, (x, mask, opts) in enumerate(sample_inputs(device, torch.float64, requires_grad=True)):
        if i % 3:  # every third case keeps this fast; covers none / holes / one_valid / 3-D
            continue
        args = (x, mask, opts["shift_mean"], opts["unbiased"], 1e-8)
        torch.library.opcheck(torch.ops.fastrlhf.whiten.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(x, mask):
        return whiten(x, mask, shift_mean=False) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, mask, _ = list(sample_inputs(device, torch.float32, requires_grad=True))[3]
    out_c = compiled(x, mask)
    out_e = f(x, mask)
    assert torch.equal(out_c, out_e)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    assert_close(gc, ge)


def test_module_face():
    m = Whiten(shift_mean=False, unbiased=False, eps=1e-5)
    assert "shift_mean=False" in repr(m) and "unbiased=False" in repr(m) and "eps=1e-05" in repr(m)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(m(x), whiten(x, shift_mean=False, unbiased=False, eps=1e-5, impl="reference"))


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x: whiten(x.tolist()), TypeError, "x"),
        (lambda x: whiten(x.long()), TypeError, "x"),
        (lambda x: whiten(x, torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask"),
        (lambda x: whiten(x, torch.ones(4, 3, dtype=torch.bool, device="meta")), ValueError, "mask"),
        (lambda x: whiten(x, torch.ones(4, 3, dtype=torch.complex64)), TypeError, "mask"),
        (lambda x: whiten(x, eps=-1e-8), ValueError, "eps"),
        (lambda x: whiten(x, eps=float("nan")), ValueError, "eps"),
        (lambda x: whiten(x, impl="kernels"), ValueError, "impl"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 3))


def test_kernel_op_rejects_bad_mask_directly():
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastrlhf.whiten.default(torch.randn(4, 3), torch.ones(4, 3), True, True, 1e-8)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastrlhf.whiten.default(torch.randn(4, 3), torch.ones(3, 4, dtype=torch.bool), True, True, 1e-8)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("value", [0.3, -7.1, 1e4, 1 / 3])
@pytest.mark.parametrize("n", [7, 1000, 100_003])  # one chunk, and several chunks of the CPU kernel
def test_equal_inputs_whiten_to_exactly_zero(impl, value, n):
    """fp32: a plain fp32 sum of equal values rounds, and whitening blew the rounding up into
    noise of ~2.4e-3; the kernel sums relative to a valid element (CUDA: in fp64)."""
    x = torch.full((n,), value, dtype=torch.float32)
    mask = torch.arange(n) % 3 != 1
    assert whiten(x, impl=impl).abs().max().item() == 0.0
    assert whiten(x, mask, impl=impl).abs().max().item() == 0.0
    assert whiten(x, mask, shift_mean=False, impl=impl)[mask].sub(value).abs().max().item() == 0.0
