"""fastrlhf.ops.kl_penalty: kernel vs reference for every estimator (values and both gradients),
k3's clamps, gradcheck, low precision, opcheck, the module face and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.ops import KLPenalty, kl_penalty

from helpers import DEVICES, LOW_PRECISION, assert_close
from helpers.losses import ESTIMATORS

EST_CODE = {e: i for i, e in enumerate(ESTIMATORS)}


# log-ratio d = logprobs - ref covering k3's clamp regions: |d| > 20 (log-ratio clamped) and
# k3 > 10 (d < -2.6 or d > 11: estimate clamped), plus the kink of abs at 0.
SPECIAL_D = [-30.0, -25.0, -20.5, -15.0, -5.0, -3.0, -2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 2.0, 3.0, 5.0, 10.0,
             12.0, 15.0, 19.0, 20.5, 25.0, 30.0]


def kl_inputs(shape=(4, 9), *, dtype=torch.float64, device="cpu", special=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 5
    d = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 2
    if special and d.numel() >= len(SPECIAL_D):
        d.view(-1)[: len(SPECIAL_D)] = torch.tensor(SPECIAL_D, dtype=torch.float64)
    return (ref + d).to(device, dtype), ref.to(device, dtype)


def kl_forward_backward(lp, ref, estimator, impl):
    lp = lp.detach().clone().requires_grad_()
    ref = ref.detach().clone().requires_grad_()
    out = kl_penalty(lp, ref, estimator=estimator, impl=impl)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (w * out).sum().backward()
    return out.detach(), lp.grad, ref.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(4, 9), (3, 4, 5), (7,), (), (0,)])
def test_kl_kernel_matches_reference_fp64(device, estimator, shape):
    lp, ref = kl_inputs(shape, device=device)
    k = kl_forward_backward(lp, ref, estimator, "kernel")
    r = kl_forward_backward(lp, ref, estimator, "reference")
    for name, a, b in zip(("kl", "grad_logprobs", "grad_ref"), k, r):
        assert a.shape == lp.shape and a.dtype == torch.float64, name
        assert_close(a, b, what=f"{estimator} {name}")
    assert torch.equal(k[2], -k[1])  # depends on d only


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_closed_forms_and_clamps(estimator):
    d = torch.tensor(SPECIAL_D, dtype=torch.float64)
    ref = torch.full_like(d, -1.0)
    kl, g_lp, _ = kl_forward_backward(ref + d, ref, estimator, "kernel")
    u = torch.randn(d.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = g_lp / u  # d kl / d logp
    dd = (ref + d) - ref  # the d the kernel sees
    if estimator == "k1":
        want, want_g = dd, torch.ones_like(d)
    elif estimator == "k2":
        want, want_g = 0.5 * dd * dd, dd
    elif estimator == "abs":
        want, want_g = dd.abs(), torch.sign(dd)
    else:
        lr = (-dd).clamp(-20, 20)
        raw = torch.exp(lr) - lr - 1
        want = raw.clamp(max=10.0)
        want_g = torch.where((raw > 10) | ((-dd).abs() > 20), 0.0, 1 - torch.exp(lr))
        # e.g. d = -5: exp(5) + -5 - 1 = 142.4 -> 10 with gradient 0; d = 0.5: e^-0.5 - 0.5
        assert kl[SPECIAL_D.index(-5.0)].item() == 10.0
        assert kl[SPECIAL_D.index(25.0)].item() == 10.0  # exp(-20) + 19 -> 10
        assert math.isclose(kl[SPECIAL_D.index(0.5)].item(), math.exp(-0.5) + 0.5 - 1, rel_tol=1e-12)
        assert (kl >= 0).all() and (kl <= 10).all()
    assert_close(kl, want, rtol=1e-12, atol=1e-12, what="kl")
    assert_close(g, want_g, rtol=1e-9, atol=1e-12, what="d kl / d logp")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_gradcheck_both_inputs(estimator):
    g = torch.Generator().manual_seed(EST_CODE[estimator])
    d = torch.randn(3, 5, generator=g, dtype=torch.float64)
    d = torch.where(d.abs() < 0.05, d + 0.3, d)  # away from abs's kink
    d[0, :4] = torch.tensor([-5.0, 15.0, 25.0, -25.0], dtype=torch.float64)  # k3 clamp regions
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    lp = (ref + d).requires_grad_()
    ref.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator=estimator, impl="kernel"), (lp, ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_low_precision_vs_fp64_reference(device, dtype, estimator):
    """Output in the input dtype: one rounding of it on top of fp32 math."""
    lp, ref = kl_inputs((6, 10), dtype=dtype, device=device, seed=1)
    k = kl_forward_backward(lp, ref, estimator, "kernel")
    r = kl_forward_backward(lp.double(), ref.double(), estimator, "reference")
    for name, a, b in zip(("kl", "grad_logprobs", "grad_ref"), k, r):
        assert a.dtype == dtype, name
        assert_close(a, b, dtype, what=f"{estimator} {name}")


def test_kl_mixed_dtypes_promote_and_non_contiguous():
    lp, ref = kl_inputs((5, 8), seed=2)
    out = kl_penalty(lp.float(), ref, estimator="k3")
    assert out.dtype == torch.float64
    assert_close(out, kl_penalty(lp.float().double(), ref, estimator="k3", impl="reference"))
    t = kl_penalty(lp.T, ref.T, estimator="k2", impl="kernel")  # non-contiguous views
    assert t.shape == (8, 5)
    assert_close(t, kl_penalty(lp, ref, estimator="k2", impl="reference").T)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_opcheck(device):
    for est in ESTIMATORS:
        lp, ref = kl_inputs((3, 8), device=device, seed=EST_CODE[est])
        torch.library.opcheck(torch.ops.fastrlhf.kl_penalty.default,
                              (lp.requires_grad_(), ref.requires_grad_(), EST_CODE[est]))
    lp, ref = kl_inputs((3, 8), device=device, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastrlhf.kl_penalty_backward.default, (torch.randn_like(lp), lp, ref, 2))


def test_kl_module_face():
    m = KLPenalty("k2")
    assert "estimator='k2'" in repr(m)
    lp, ref = kl_inputs((3, 9))
    assert_close(m(lp, ref), kl_penalty(lp, ref, estimator="k2", impl="reference"))
    assert_close(KLPenalty()(lp, ref), lp - ref)  # default k1


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda a, b: kl_penalty(a, b, estimator="k5"), ValueError, "estimator"),
        (lambda a, b: kl_penalty(a, b[:, :3]), ValueError, "ref_logprobs"),
        (lambda a, b: kl_penalty(a, b.T), ValueError, "ref_logprobs"),
        (lambda a, b: kl_penalty(a, b.to("meta")), ValueError, "ref_logprobs"),
        (lambda a, b: kl_penalty(a.long(), b), TypeError, "logprobs"),
        (lambda a, b: kl_penalty(a, b.long()), TypeError, "ref_logprobs"),
        (lambda a, b: kl_penalty(a, b.tolist()), TypeError, "ref_logprobs"),
        (lambda a, b: kl_penalty(a, b, impl="cuda"), ValueError, "impl"),
        (lambda a, b: torch.ops.fastrlhf.kl_penalty.default(a, b, 5), RuntimeError, "estimator"),
        (lambda a, b: torch.ops.fastrlhf.kl_penalty.default(a, b[:2], 0), RuntimeError, "ref_logprobs"),
    ],
)
def test_kl_bad_input_names_the_argument(call, exc, match):
    lp, ref = kl_inputs((3, 4), special=False)
    with pytest.raises(exc, match=match):
        call(lp, ref)




@pytest.mark.parametrize("device", DEVICES)
def test_k3_without_clamps_is_trls_formula(device):
    d = torch.tensor([-30.0, -5.0, -2.7, -1e-3, 0.0, 0.5, 3.0, 25.0], dtype=torch.float64, device=device)
    ref = torch.full_like(d, -1.0)
    lp = (ref + d).requires_grad_()
    for impl in ("kernel", "reference"):
        lp.grad = None
        out = kl_penalty(lp, ref, estimator="k3", k3_clamp=False, impl=impl)
        out.sum().backward()
        # d is computed from lp - ref (one rounding): compare in absolute terms near d = 0
        torch.testing.assert_close(out, torch.exp(-d) + d - 1, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lp.grad, 1 - torch.exp(-d), rtol=1e-12, atol=1e-15)
    clamped = kl_penalty(lp, ref, estimator="k3", impl="kernel")
    assert clamped[0].item() == 10.0 and clamped[1].item() == 10.0  # verl's cap binds below d ~ -2.6
    with pytest.raises(TypeError, match="k3_clamp must be True or False"):
        kl_penalty(lp, ref, estimator="k3", k3_clamp="no")
    assert kl_penalty(lp, ref, estimator="k1", k3_clamp=False).equal(kl_penalty(lp, ref, estimator="k1"))
