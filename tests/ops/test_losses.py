"""fastrlhf.ops.kl_penalty / policy_loss / value_loss: kernel vs reference (loss, every stat,
gradients) over every aggregation, KL estimator, entropy / dual-clip option and mask pattern;
hand-worked examples; micro-batch invariance with a global normalizer; gradcheck; low
precision; explained variance; opcheck; torch.compile; module faces and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastrlhf.ops import KLPenalty, PPOLoss, ValueLoss, kl_penalty, policy_loss, value_loss
from fastrlhf.ops.policy_loss import STAT_NAMES
from fastrlhf.ops.value_loss import STAT_NAMES as VALUE_STAT_NAMES
from conftest import DEVICES, LOW_PRECISION, MASK_KINDS, TOLERANCES, assert_close, make_mask

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
ESTIMATORS = ["k1", "k2", "k3", "abs"]
AGG_CODE = {a: i for i, a in enumerate(AGGS)}
EST_CODE = {e: i for i, e in enumerate(ESTIMATORS)}


def to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


# ==== kl_penalty ===========================================================================

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
        (lambda a, b: torch.ops.fastrlhf.kl_penalty.default(a, b, 4), RuntimeError, "estimator"),
        (lambda a, b: torch.ops.fastrlhf.kl_penalty.default(a, b[:2], 0), RuntimeError, "ref_logprobs"),
    ],
)
def test_kl_bad_input_names_the_argument(call, exc, match):
    lp, ref = kl_inputs((3, 4), special=False)
    with pytest.raises(exc, match=match):
        call(lp, ref)


# ==== policy_loss ==========================================================================


def policy_inputs(B, T, *, dtype=torch.float64, device="cpu", mask_kind="holes", seed=0):
    """old log-probs in (-3, 0); log-ratios ~ N(0, 0.5^2) so that both clips and a dual clip
    of 2 bind on some tokens; advantages ~ N(0, 1); ref log-probs near logprobs; entropies in
    (0, 2)."""
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, **f) * 3 - 0.01
    lp = old + 0.5 * torch.randn(B, T, **f)
    adv = torch.randn(B, T, **f)
    ref = lp + 0.4 * torch.randn(B, T, **f)
    ent = torch.rand(B, T, **f) * 2
    mask = make_mask(mask_kind, B, T, generator=g)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return dict(logprobs=cast(lp), old_logprobs=cast(old), advantages=cast(adv), mask=mask.to(device),
                ref_logprobs=cast(ref), entropy=cast(ent))


def policy_run(inp, *, impl, use_ref=False, use_entropy=False, **kw):
    """-> (loss, stats, grad_logprobs, grad_entropy) with the loss backpropagated."""
    lp = inp["logprobs"].detach().clone().requires_grad_()
    ent = inp["entropy"].detach().clone().requires_grad_() if use_entropy else None
    ref = inp["ref_logprobs"] if use_ref else None
    loss, stats = policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], ref_logprobs=ref,
                              entropy=ent, impl=impl, **kw)
    loss.backward()
    return loss.detach(), stats, lp.grad, (ent.grad if ent is not None else None)


def assert_policy_close(k, r, dtype=None, *, grad_dtype=None, what=""):
    k_loss, k_stats, k_glp, k_gent = k
    r_loss, r_stats, r_glp, r_gent = r
    assert_close(k_loss, r_loss, dtype, what=f"{what} loss")
    assert set(k_stats) == set(STAT_NAMES) and set(r_stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert k_stats[name].dim() == 0, name
        assert_close(k_stats[name], r_stats[name], dtype, what=f"{what} stats[{name!r}]")
    gd = grad_dtype or dtype
    scale = max(r_glp.abs().max().item(), 1e-30) if r_glp.numel() else 1.0
    tol = TOLERANCES[gd or torch.float64]
    assert_close(k_glp, r_glp, gd, atol=tol["atol"] * scale, what=f"{what} grad_logprobs")
    if r_gent is None:
        assert k_gent is None
    else:
        assert_close(k_gent, r_gent, gd, what=f"{what} grad_entropy")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("use_entropy", [False, True], ids=["noent", "ent"])
@pytest.mark.parametrize("dual_clip", [None, 2.0], ids=["nodual", "dual"])
def test_policy_loss_kernel_matches_reference_fp64(agg, kl, use_entropy, dual_clip):
    """Asymmetric clip (0.2, 0.28) throughout; every mask kind, including all-masked rows."""
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
    if kl is not None:
        kw.update(kl_coef=0.1, kl_estimator=kl)
    if use_entropy:
        kw.update(entropy_coef=0.01)
    seen = dict.fromkeys(("clipfrac_low", "clipfrac_high", "dual_clipfrac"), 0.0)
    for i, kind in enumerate(MASK_KINDS):
        inp = policy_inputs(6, 9, mask_kind=kind, seed=i)
        k = policy_run(inp, impl="kernel", use_ref=kl is not None, use_entropy=use_entropy, **kw)
        r = policy_run(inp, impl="reference", use_ref=kl is not None, use_entropy=use_entropy, **kw)
        assert k[0].dtype == torch.float64 and k[2].dtype == torch.float64
        assert_policy_close(k, r, what=kind)
        assert torch.isfinite(k[0])
        assert (k[2][~inp["mask"]] == 0).all()  # masked tokens get no gradient
        if use_entropy:
            assert (k[3][~inp["mask"]] == 0).all()
        for name in seen:
            seen[name] = max(seen[name], k[1][name].item())
    # the data does exercise both clips (and the dual clip when on)
    assert seen["clipfrac_low"] > 0 and seen["clipfrac_high"] > 0
    assert (seen["dual_clipfrac"] > 0) == (dual_clip is not None)


@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("use_entropy", [False, True], ids=["noent", "ent"])
@pytest.mark.parametrize("dual_clip", [None, 2.0], ids=["nodual", "dual"])
def test_policy_loss_fp32_kernel_matches_fp64_reference(kl, use_entropy, dual_clip):
    """fp32 (the dtype of log-probs in practice) runs its own loops, specialized on the KL
    estimator and on the optional terms: each specialization vs the fp64 reference on the same
    fp32 inputs, every aggregation and mask kind. fp32 loss / stats within the fp32 tolerance;
    gradients within it relative to max |gradient|."""
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    if kl is not None:
        kw.update(kl_coef=0.1, kl_estimator=kl)
    if use_entropy:
        kw.update(entropy_coef=0.01)
    for i, kind in enumerate(MASK_KINDS):
        inp = policy_inputs(5, 37, dtype=torch.float32, mask_kind=kind, seed=20 + i)  # T: not a multiple of 8/16
        inp64 = {n: to64(v) for n, v in inp.items()}
        for agg in AGGS:
            k = policy_run(inp, impl="kernel", use_ref=kl is not None, use_entropy=use_entropy, agg=agg, **kw)
            r = policy_run(inp64, impl="reference", use_ref=kl is not None, use_entropy=use_entropy, agg=agg, **kw)
            assert k[0].dtype == torch.float32 and k[2].dtype == torch.float32
            assert_policy_close(k, r, torch.float32, what=f"{kind} {agg}")


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("norm_length", [None, 4.0, 30.0])
def test_policy_loss_seq_mean_token_sum_norm_length(impl, norm_length):
    """Dr. GRPO: sum over valid tokens of each sequence / L (default T), averaged over non-empty
    sequences; checked against a direct loop."""
    inp = policy_inputs(5, 8, mask_kind="ragged", seed=4)
    loss, _, glp, _ = policy_run(inp, impl=impl, agg="seq-mean-token-sum-norm", norm_length=norm_length)
    ratio = (inp["logprobs"] - inp["old_logprobs"]).exp()
    a = inp["advantages"]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    L = 8 if norm_length is None else norm_length
    m = inp["mask"]
    n_seq = int((m.sum(-1) > 0).sum())
    want = sum(pg[b][m[b]].sum() / L for b in range(5)) / n_seq
    assert_close(loss, torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_policy_loss_all_masked_batch(agg, impl):
    """No valid token: loss 0 (not NaN), every stat 0, zero gradients."""
    inp = policy_inputs(3, 5, seed=1)
    inp["mask"] = torch.zeros(3, 5, dtype=torch.bool)
    loss, stats, glp, gent = policy_run(inp, impl=impl, agg=agg, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01,
                                        use_ref=True, use_entropy=True)
    assert loss.item() == 0.0
    for name in STAT_NAMES:
        assert stats[name].item() == 0.0, name
    assert (glp == 0).all() and (gent == 0).all()


def test_policy_loss_all_masked_rows_weigh_nothing():
    """Empty sequences do not count in the seq-mean denominators: dropping them changes nothing."""
    inp = policy_inputs(6, 7, mask_kind="all_masked_rows", seed=2)
    keep = inp["mask"].any(-1)
    assert (~keep).any() and keep.any()
    sub = {k: v[keep] for k, v in inp.items()}
    for agg in AGGS:
        full = policy_run(inp, impl="kernel", agg=agg)
        part = policy_run(sub, impl="kernel", agg=agg)
        assert_close(full[0], part[0], what=agg)
        assert_close(full[2][keep], part[2], what=agg)
        assert (full[2][~keep] == 0).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_policy_loss_hand_worked(impl):
    """B = 1, T = 2, token-mean (weight 1/2 per token), clip_low 0.2, clip_high 0.3: the ratio
    range is [0.8, 1.3]."""
    f64 = dict(dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.0]], **f64)

    def run(ratios, advs, **kw):
        inp = dict(logprobs=old + torch.tensor([ratios], **f64).log(), old_logprobs=old,
                   advantages=torch.tensor([advs], **f64), mask=torch.ones(1, 2, dtype=torch.bool),
                   ref_logprobs=old, entropy=torch.zeros(1, 2, **f64))
        return policy_run(inp, impl=impl, clip_low=0.2, clip_high=0.3, **kw)

    def close(x, want):
        assert_close(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                     rtol=1e-12, atol=1e-12)

    # (a) both clips bind.
    #   token 0: a = +2, r = 1.5 > 1.3: pg = max(-2*1.5, -2*1.3) = max(-3.0, -2.6) = -2.6 (high clip)
    #   token 1: a = -1, r = 0.5 < 0.8: pg = max( 1*0.5,  1*0.8) = max( 0.5,  0.8) =  0.8 (low clip)
    #   loss = (-2.6 + 0.8) / 2 = -0.9; clipfrac_low = clipfrac_high = 1/2, clipfrac = 1
    #   gradients: 0 on both (the clipped branch is constant)
    #   ratio_mean = 1.0, ratio_max = 1.5
    #   approx_kl = mean((r - 1) - log r) = ((0.5 - log 1.5) + (-0.5 - log 0.5)) / 2
    loss, st, g, _ = run([1.5, 0.5], [2.0, -1.0])
    close(loss, -0.9)
    close(st["pg_loss"], -0.9)
    close(st["clipfrac_low"], 0.5)
    close(st["clipfrac_high"], 0.5)
    close(st["clipfrac"], 1.0)
    close(st["dual_clipfrac"], 0.0)
    close(st["ratio_mean"], 1.0)
    close(st["ratio_max"], 1.5)
    close(st["approx_kl"], ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    close(g, [[0.0, 0.0]])

    # (b) inside the range, and the pessimistic side that a clip never helps.
    #   token 0: a = +2, r = 1.1: pg = -2.2,  d pg / d logp = -a r = -2.2
    #   token 1: a = +2, r = 0.5 < 0.8: pg = max(-1.0, -1.6) = -1.0 (unclipped), d/dlogp = -1.0
    #   loss = (-2.2 - 1.0) / 2 = -1.6; no clip counted; gradients halved: [-1.1, -0.5]
    loss, st, g, _ = run([1.1, 0.5], [2.0, 2.0])
    close(loss, -1.6)
    close(st["clipfrac"], 0.0)
    close(g, [[-1.1, -0.5]])

    # (c) dual clip 3 (negative advantages only).
    #   token 0: a = -1, r = 4: pg = max(4, 1.3) = 4 > 3 = -a * dual_clip -> pg = 3, gradient 0
    #   token 1: a = -1, r = 2: pg = max(2, 1.3) = 2 < 3: unchanged, d/dlogp = -a r = 2
    #   loss = (3 + 2) / 2 = 2.5; dual_clipfrac = 1/2; gradients [0, 1.0]
    #   no clip counted: r > 1 - clip_low and a < 0 (the upper clip applies to a > 0 only)
    loss, st, g, _ = run([4.0, 2.0], [-1.0, -1.0], dual_clip=3.0)
    close(loss, 2.5)
    close(st["dual_clipfrac"], 0.5)
    close(st["clipfrac"], 0.0)
    close(g, [[0.0, 1.0]])
    #   without the dual clip: loss = (4 + 2) / 2 = 3.0, gradients [2.0, 1.0]
    loss, st, g, _ = run([4.0, 2.0], [-1.0, -1.0])
    close(loss, 3.0)
    close(st["dual_clipfrac"], 0.0)
    close(g, [[2.0, 1.0]])
    #   a positive advantage is never dual-clipped: a = +1, r = 4: pg = max(-4, -1.3) = -1.3
    loss, st, g, _ = run([4.0, 1.0], [1.0, 1.0], dual_clip=3.0)
    close(loss, (-1.3 - 1.0) / 2)
    close(st["dual_clipfrac"], 0.0)
    close(st["clipfrac_high"], 0.5)

    # (d) KL in the loss (k1, coef 0.5) and an entropy bonus (coef 0.1), r = 1, a = 0:
    #   pg = 0; kl = logp - ref = log 1.2 on token 0 (ref = old, logp = old + log 1.2), 0 on token 1
    #   loss = (0.5 * log 1.2 - 0.1 * (1.0 + 3.0)) / 2
    inp = dict(logprobs=old + torch.tensor([[math.log(1.2), 0.0]], **f64), old_logprobs=old,
               advantages=torch.zeros(1, 2, **f64), mask=torch.ones(1, 2, dtype=torch.bool), ref_logprobs=old,
               entropy=torch.tensor([[1.0, 3.0]], **f64))
    loss, st, g, ge = policy_run(inp, impl=impl, use_ref=True, use_entropy=True, kl_coef=0.5, kl_estimator="k1",
                                 entropy_coef=0.1)
    close(loss, (0.5 * math.log(1.2) - 0.4) / 2)
    close(st["kl"], math.log(1.2) / 2)
    close(st["entropy"], 2.0)
    close(st["pg_loss"], 0.0)
    close(g, [[0.25, 0.25]])  # kl_coef * d k1 / d logp / 2
    close(ge, [[-0.05, -0.05]])  # -entropy_coef / 2


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_policy_loss_advantages_per_sequence_broadcast(impl):
    inp = policy_inputs(4, 6, seed=3)
    adv_b = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = dict(inp, advantages=adv_b[:, None].expand(4, 6).contiguous())
    per_seq = dict(inp, advantages=adv_b)
    for agg in AGGS:
        a = policy_run(per_seq, impl=impl, agg=agg, dual_clip=2.0)
        b = policy_run(full, impl=impl, agg=agg, dual_clip=2.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]), agg
        for name in STAT_NAMES:
            assert torch.equal(a[1][name], b[1][name]), name
    # a square batch (B == T): [B] still means one advantage per sequence
    sq = policy_inputs(5, 5, seed=4)
    adv5 = torch.arange(5, dtype=torch.float64) - 2.0
    a = policy_run(dict(sq, advantages=adv5), impl=impl)
    b = policy_run(dict(sq, advantages=adv5[:, None].expand(5, 5)), impl=impl)
    assert torch.equal(a[0], b[0])


def _global_normalizer(mask, agg):
    if agg == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_policy_loss_micro_batch_invariance(agg, impl):
    """8 sequences split into 4 micro-batches of 2, each given the global normalizer: the summed
    losses and the accumulated gradients equal the full-batch ones (one micro-batch is empty)."""
    inp = policy_inputs(8, 10, mask_kind="ragged", seed=6)
    inp["mask"][2:4] = False  # micro-batch 1 has no valid token
    inp["mask"][6, :3] = True  # and the rest some
    kw = dict(agg=agg, clip_high=0.28, dual_clip=2.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
              use_ref=True, use_entropy=True)
    full = policy_run(inp, impl=impl, **kw)
    norm = _global_normalizer(inp["mask"], agg)
    assert_close(policy_run(inp, impl=impl, normalizer=norm, **kw)[0], full[0], what="normalizer = own count")

    lp = inp["logprobs"].clone().requires_grad_()
    ent = inp["entropy"].clone().requires_grad_()
    total = 0.0
    for i in range(4):
        rows = slice(2 * i, 2 * i + 2)
        loss, _ = policy_loss(lp[rows], inp["old_logprobs"][rows], inp["advantages"][rows], inp["mask"][rows],
                              ref_logprobs=inp["ref_logprobs"][rows], entropy=ent[rows], normalizer=norm, impl=impl,
                              **{k: v for k, v in kw.items() if not k.startswith("use_")})
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full[0], what="sum of micro-batch losses")
    assert_close(lp.grad, full[2], what="accumulated grad_logprobs")
    assert_close(ent.grad, full[3], what="accumulated grad_entropy")


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_gradcheck_fp64(agg):
    inp = policy_inputs(3, 5, mask_kind="holes", seed=AGG_CODE[agg])
    lp = inp["logprobs"].clone().requires_grad_()
    ent = inp["entropy"].clone().requires_grad_()

    def f(lp, ent):
        return policy_loss(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], clip_high=0.28, dual_clip=2.0,
                           ref_logprobs=inp["ref_logprobs"], kl_coef=0.1, kl_estimator="k3", entropy=ent,
                           entropy_coef=0.01, agg=agg, impl="kernel")[0]

    assert torch.autograd.gradcheck(f, (lp, ent))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_low_precision_vs_fp64_reference(device, dtype, agg):
    """Inputs rounded to dtype, the fp64 reference on the same values. loss and stats come out
    in fp32 (fp32 accumulation only: the fp32 tolerance, 1e-5, for every dtype); gradients in
    the input dtype: TOLERANCES[dtype], atol relative to max |gradient|."""
    inp = policy_inputs(7, 12, dtype=dtype, device=device, mask_kind="holes", seed=8)
    kw = dict(agg=agg, clip_high=0.28, dual_clip=2.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
              use_ref=True, use_entropy=True)
    k = policy_run(inp, impl="kernel", **kw)
    r = policy_run({n: to64(v) for n, v in inp.items()}, impl="reference", **kw)
    assert k[0].dtype == torch.float32 and all(s.dtype == torch.float32 for s in k[1].values())
    assert k[2].dtype == dtype and k[3].dtype == dtype
    assert_policy_close(k, r, torch.float32, grad_dtype=dtype)


# ==== value_loss ===========================================================================


def value_inputs(B, T, *, dtype=torch.float64, device="cpu", mask_kind="holes", seed=0):
    """returns ~ 1 + 2 N(0, 1); old values near the returns; new values within ~0.3 of the old
    ones, so that a clip of 0.2 binds on some tokens and not on others."""
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    ret = 1 + 2 * torch.randn(B, T, **f)
    old = ret + 0.7 * torch.randn(B, T, **f)
    v = old + 0.3 * torch.randn(B, T, **f)
    mask = make_mask(mask_kind, B, T, generator=g)
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return dict(values=cast(v), old_values=cast(old), returns=cast(ret), mask=mask.to(device))


def value_run(inp, *, impl, **kw):
    v = inp["values"].detach().clone().requires_grad_()
    loss, stats = value_loss(v, inp["old_values"], inp["returns"], inp["mask"], impl=impl, **kw)
    loss.backward()
    return loss.detach(), stats, v.grad


def assert_value_close(k, r, dtype=None, *, grad_dtype=None, what=""):
    assert_close(k[0], r[0], dtype, what=f"{what} loss")
    assert set(k[1]) == set(VALUE_STAT_NAMES)
    for name in VALUE_STAT_NAMES:
        assert k[1][name].dim() == 0
        assert_close(k[1][name], r[1][name], dtype, what=f"{what} stats[{name!r}]")
    gd = grad_dtype or dtype
    scale = max(r[2].abs().max().item(), 1e-30) if r[2].numel() else 1.0
    assert_close(k[2], r[2], gd, atol=TOLERANCES[gd or torch.float64]["atol"] * scale, what=f"{what} grad_values")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2, 1.0])
def test_value_loss_kernel_matches_reference_fp64(agg, clip):
    clipped_seen = 0.0
    for i, kind in enumerate(MASK_KINDS):
        inp = value_inputs(6, 9, mask_kind=kind, seed=i)
        k = value_run(inp, impl="kernel", clip=clip, agg=agg)
        r = value_run(inp, impl="reference", clip=clip, agg=agg)
        assert_value_close(k, r, what=kind)
        assert torch.isfinite(k[0]) and (k[2][~inp["mask"]] == 0).all()
        clipped_seen = max(clipped_seen, k[1]["clipfrac"].item())
    if clip is None:
        assert clipped_seen == 0.0
    elif clip == 0.2:  # |v - old| ~ 0.3: the clip binds on some tokens (never with clip = 1)
        assert clipped_seen > 0


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_value_loss_hand_worked(impl):
    """clip 0.2, token-mean over 3 tokens (weight 1/3):
    token 0: v 1.5, old 1.0, R 2.0: v_clip = 1.2; (v-R)^2 = 0.25 < (v_clip-R)^2 = 0.64
             -> 0.5 * 0.64 = 0.32, clipped, gradient 0 (|v - old| = 0.5 > 0.2)
    token 1: v 1.1, old 1.0, R 0.0: v_clip = v -> 0.5 * 1.21 = 0.605, gradient v - R = 1.1
    token 2: v 0.5, old 1.0, R 2.0: v_clip = 0.8; (v-R)^2 = 2.25 > 1.44 -> 1.125, gradient -1.5
    loss = (0.32 + 0.605 + 1.125) / 3; clipfrac = 1/3; gradients / 3."""
    f64 = dict(dtype=torch.float64)
    inp = dict(values=torch.tensor([[1.5, 1.1, 0.5]], **f64), old_values=torch.tensor([[1.0, 1.0, 1.0]], **f64),
               returns=torch.tensor([[2.0, 0.0, 2.0]], **f64), mask=torch.ones(1, 3, dtype=torch.bool))
    loss, st, g = value_run(inp, impl=impl, clip=0.2)
    assert math.isclose(loss.item(), (0.32 + 0.605 + 1.125) / 3, rel_tol=1e-12)
    assert math.isclose(st["clipfrac"].item(), 1 / 3, rel_tol=1e-12)
    assert_close(g, torch.tensor([[0.0, 1.1 / 3, -1.5 / 3]], **f64), rtol=1e-12, atol=1e-12)
    assert math.isclose(st["value_mean"].item(), 3.1 / 3, rel_tol=1e-12)
    assert math.isclose(st["return_mean"].item(), 4.0 / 3, rel_tol=1e-12)
    # clip=None: plain 0.5 (v - R)^2 = (0.125 + 0.605 + 1.125) / 3, gradients (v - R) / 3
    loss, st, g = value_run(inp, impl=impl, clip=None)
    assert math.isclose(loss.item(), (0.125 + 0.605 + 1.125) / 3, rel_tol=1e-12)
    assert st["clipfrac"].item() == 0.0
    assert_close(g, torch.tensor([[-0.5 / 3, 1.1 / 3, -1.5 / 3]], **f64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mask_kind", ["none", "holes", "ragged"])
def test_explained_variance_matches_numpy(impl, mask_kind):
    """1 - Var(R - v) / Var(R) over valid tokens, population variances (np.var, as CleanRL)."""
    inp = value_inputs(5, 12, mask_kind=mask_kind, seed=10)
    _, st, _ = value_run(inp, impl=impl)
    m = inp["mask"].numpy()
    R, v = inp["returns"].numpy()[m], inp["values"].numpy()[m]
    want = 1.0 - np.var(R - v) / np.var(R)
    assert math.isclose(st["explained_variance"].item(), want, rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(st["value_mean"].item(), v.mean(), rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(st["return_mean"].item(), R.mean(), rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("const", [0.0, 2.0, 0.1, -1.0 / 3.0])
@pytest.mark.parametrize("shape", [(4, 50), (1, 7)])
def test_explained_variance_nan_for_constant_returns(impl, const, shape):
    """Var(R) = 0 -> NaN (documented; CleanRL: np.nan if np.var(y) == 0). The op must not turn
    a rounding residue (of E[R^2] - E[R]^2, or of a mean that rounds away from the constant, as
    np.var's does for -1/3) into a finite explained variance of -1e16."""
    B, T = shape
    R = torch.full(shape, const, dtype=torch.float64)
    v = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, st, _ = value_run(dict(values=v, old_values=v.clone(), returns=R, mask=torch.ones(shape, dtype=torch.bool)),
                         impl=impl)
    ev = st["explained_variance"].item()
    assert math.isnan(ev), f"explained_variance {ev!r} for returns constant at {const!r}"


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0, 3000.0])
def test_explained_variance_fp32_returns_with_large_mean(offset):
    """fp32 returns offset + N(0, 1) (undiscounted returns of long episodes reach 1e3), values
    within 0.5 of them: explained variance ~ 0.75. It stays within 1e-3 of its exact value on
    the same fp32 inputs (np.var in fp64), and certainly finite: Var(R) ~ 1 is not 0. A two-pass
    or shifted variance is exact to ~1e-6 here; E[R^2] - E[R]^2 with R^2 ~ 1e6 summed in fp32
    loses everything."""
    g = torch.Generator().manual_seed(0)
    R = (offset + torch.randn(8, 64, generator=g, dtype=torch.float64)).float()
    v = (R.double() + 0.5 * torch.randn(8, 64, generator=g, dtype=torch.float64)).float()
    _, st, _ = value_run(dict(values=v, old_values=v.clone(), returns=R, mask=torch.ones(8, 64, dtype=torch.bool)),
                         impl="kernel")
    r64, v64 = R.double().numpy(), v.double().numpy()
    want = 1.0 - np.var(r64 - v64) / np.var(r64)
    got = st["explained_variance"].item()
    assert math.isfinite(got) and abs(got - want) < 1e-3, f"explained_variance {got!r}, exact {want!r}"


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_value_loss_all_masked_batch(impl):
    inp = value_inputs(3, 4, seed=2)
    inp["mask"] = torch.zeros(3, 4, dtype=torch.bool)
    for agg in AGGS:
        loss, st, g = value_run(inp, impl=impl, agg=agg)
        assert loss.item() == 0.0 and (g == 0).all(), agg
        assert st["clipfrac"].item() == 0.0 and st["value_mean"].item() == 0.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_gradcheck_fp64(agg, clip):
    inp = value_inputs(3, 5, seed=AGG_CODE[agg])
    v = inp["values"].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, inp["old_values"], inp["returns"], inp["mask"], clip=clip, agg=agg,
                             impl="kernel")[0], (v,))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_value_loss_micro_batch_invariance(agg, impl):
    inp = value_inputs(8, 10, mask_kind="ragged", seed=6)
    inp["mask"][2:4] = False
    inp["mask"][6, :3] = True
    full = value_run(inp, impl=impl, agg=agg)
    norm = _global_normalizer(inp["mask"], agg)
    v = inp["values"].clone().requires_grad_()
    total = 0.0
    for i in range(4):
        rows = slice(2 * i, 2 * i + 2)
        loss, _ = value_loss(v[rows], inp["old_values"][rows], inp["returns"][rows], inp["mask"][rows], agg=agg,
                             normalizer=norm, impl=impl)
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full[0], what="sum of micro-batch losses")
    assert_close(v.grad, full[2], what="accumulated grad_values")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_low_precision_vs_fp64_reference(device, dtype, clip):
    inp = value_inputs(7, 12, dtype=dtype, device=device, seed=9)
    k = value_run(inp, impl="kernel", clip=clip, agg="seq-mean-token-mean")
    r = value_run({n: to64(x) for n, x in inp.items()}, impl="reference", clip=clip, agg="seq-mean-token-mean")
    assert k[0].dtype == torch.float32 and k[2].dtype == dtype
    assert_value_close(k, r, torch.float32, grad_dtype=dtype)


# ==== determinism =========================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_bitwise_deterministic_across_calls_and_threads(dtype):
    pinp = policy_inputs(37, 300, dtype=dtype, mask_kind="ragged", seed=11)
    vinp = value_inputs(37, 300, dtype=dtype, mask_kind="ragged", seed=11)
    kw = dict(agg="seq-mean-token-mean", dual_clip=2.0, kl_coef=0.1, entropy_coef=0.01, use_ref=True,
              use_entropy=True)

    def run():
        p = policy_run(pinp, impl="kernel", **kw)
        v = value_run(vinp, impl="kernel")
        return [p[0], *p[1].values(), p[2], p[3], v[0], *v[1].values(), v[2]]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = run(), run()
        torch.set_num_threads(1)
        c = run()
    finally:
        torch.set_num_threads(before)
    for other in (b, c):
        for i, (x, y) in enumerate(zip(a, other)):
            assert torch.equal(x, y) or (torch.isnan(x).all() and torch.isnan(y).all()), i


# ==== opcheck, torch.compile, module faces ================================================


def _policy_op_args(inp, *, ref=True, entropy=True, agg=0, normalizer=0.0, dual=2.0):
    return (inp["logprobs"].clone().requires_grad_(), inp["old_logprobs"], inp["advantages"], inp["mask"],
            inp["ref_logprobs"] if ref else None, inp["entropy"].clone().requires_grad_() if entropy else None,
            0.2, 0.28, dual, 0.1 if ref else 0.0, 2, 0.01, agg, normalizer, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_policy_loss(device):
    op = torch.ops.fastrlhf.policy_loss.default
    inp = policy_inputs(4, 6, device=device, mask_kind="all_masked_rows", seed=1)
    torch.library.opcheck(op, _policy_op_args(inp, agg=1))
    torch.library.opcheck(op, _policy_op_args(inp, ref=False, entropy=False, agg=3, dual=0.0))
    inp = policy_inputs(3, 5, device=device, seed=2)
    torch.library.opcheck(op, _policy_op_args(inp, agg=0, normalizer=40.0))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_value_loss(device):
    op = torch.ops.fastrlhf.value_loss.default
    for i, (clip, agg) in enumerate([(0.2, 0), (0.0, 1), (0.5, 3)]):
        inp = value_inputs(4, 6, device=device, mask_kind=MASK_KINDS[i + 2], seed=i)
        torch.library.opcheck(op, (inp["values"].requires_grad_(), inp["old_values"], inp["returns"], inp["mask"],
                                   clip, agg, 0.0, 0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    pinp = policy_inputs(4, 7, device=device, dtype=torch.float32, seed=3)
    vinp = value_inputs(4, 7, device=device, dtype=torch.float32, seed=3)

    def f(lp, ent, v):
        pl, pst = policy_loss(lp, pinp["old_logprobs"], pinp["advantages"], pinp["mask"], clip_high=0.28,
                              dual_clip=3.0, ref_logprobs=pinp["ref_logprobs"], kl_coef=0.05, entropy=ent,
                              entropy_coef=0.01, agg="seq-mean-token-mean")
        vl, vst = value_loss(v, vinp["old_values"], vinp["returns"], pinp["mask"], clip=0.2)
        return pl + 0.5 * vl, pst["clipfrac"], vst["explained_variance"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        lp = pinp["logprobs"].clone().requires_grad_()
        ent = pinp["entropy"].clone().requires_grad_()
        v = vinp["values"].clone().requires_grad_()
        loss, cf, ev = fn(lp, ent, v)
        loss.backward()
        results.append((loss.detach(), cf, ev, lp.grad, ent.grad, v.grad))
    for name, a, b in zip(("loss", "clipfrac", "explained_variance", "grad_logprobs", "grad_entropy", "grad_values"),
                          *results):
        assert a is not None and torch.equal(a, b), name


def test_ppo_loss_module_face():
    m = PPOLoss(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.01,
                agg="seq-mean-token-mean")
    assert isinstance(m, torch.nn.Module)
    r = repr(m)
    for s in ("clip=(0.2, 0.28)", "dual_clip=3.0", "kl_coef=0.05", "kl_estimator='k2'", "entropy_coef=0.01",
              "agg='seq-mean-token-mean'"):
        assert s in r, s
    inp = policy_inputs(4, 6, seed=5)
    loss, stats = m(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                    ref_logprobs=inp["ref_logprobs"], entropy=inp["entropy"], normalizer=3)
    want, want_stats = policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                                   clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logprobs=inp["ref_logprobs"],
                                   kl_coef=0.05, kl_estimator="k2", entropy=inp["entropy"], entropy_coef=0.01,
                                   agg="seq-mean-token-mean", normalizer=3, impl="reference")
    assert_close(loss, want)
    assert_close(stats["kl"], want_stats["kl"])
    with pytest.raises(ValueError, match="kl_coef"):  # module with kl_coef but no ref_logprobs
        m(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])


def test_value_loss_module_face():
    m = ValueLoss(clip=0.3, agg="seq-mean-token-sum")
    assert isinstance(m, torch.nn.Module)
    assert "clip=0.3" in repr(m) and "agg='seq-mean-token-sum'" in repr(m)
    inp = value_inputs(4, 6, seed=5)
    loss, stats = m(inp["values"], inp["old_values"], inp["returns"], inp["mask"], normalizer=4)
    want, want_stats = value_loss(inp["values"], inp["old_values"], inp["returns"], inp["mask"], clip=0.3,
                                  agg="seq-mean-token-sum", normalizer=4, impl="reference")
    assert_close(loss, want)
    assert_close(stats["clipfrac"], want_stats["clipfrac"])
    assert "clip=None" in repr(ValueLoss(clip=None))


# ==== bad input ===========================================================================


def _p():
    return policy_inputs(2, 5, seed=0)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(kl_coef=0.1), ValueError, "kl_coef"),  # no ref_logprobs
        (dict(dual_clip=1.0), ValueError, "dual_clip"),
        (dict(dual_clip=0.5), ValueError, "dual_clip"),
        (dict(dual_clip=float("inf")), ValueError, "dual_clip"),
        (dict(agg="mean"), ValueError, "agg"),
        (dict(ref_logprobs="ref", kl_coef=0.1, kl_estimator="k4"), ValueError, "kl_estimator"),
        (dict(logprobs=lambda t: t[0]), ValueError, "logprobs"),
        (dict(logprobs=lambda t: t.long()), TypeError, "logprobs"),
        (dict(old_logprobs=lambda t: t[:, :4]), ValueError, "old_logprobs"),
        (dict(old_logprobs=lambda t: t.T), ValueError, "old_logprobs"),
        (dict(advantages=lambda t: t[:, :4]), ValueError, "advantages"),
        (dict(advantages=lambda t: t[:, 0].repeat(2)), ValueError, "advantages"),  # [2B]
        (dict(advantages=lambda t: t.long()), TypeError, "advantages"),
        (dict(mask=lambda t: t[:, :4]), ValueError, "mask"),
        (dict(mask=lambda t: t.to(torch.complex64)), TypeError, "mask"),
        (dict(ref_logprobs=lambda t: t[:1]), ValueError, "ref_logprobs"),
        (dict(entropy=lambda t: t[:, 1:]), ValueError, "entropy"),
        (dict(normalizer=0), ValueError, "normalizer"),
        (dict(normalizer=-3.0), ValueError, "normalizer"),
        (dict(normalizer=float("nan")), ValueError, "normalizer"),
        (dict(normalizer=torch.tensor([1.0, 2.0])), ValueError, "normalizer"),
        (dict(norm_length=0.0), ValueError, "norm_length"),
        (dict(clip_low=1.5), ValueError, "clip_low"),
        (dict(clip_low=-0.1), ValueError, "clip_low"),
        (dict(clip_high=-0.1), ValueError, "clip_high"),
        (dict(kl_coef=float("nan"), ref_logprobs="ref"), ValueError, "kl_coef"),
        (dict(entropy_coef=float("inf")), ValueError, "entropy_coef"),
        (dict(impl="fast"), ValueError, "impl"),
    ],
)
def test_policy_loss_bad_input_names_the_argument(kw, exc, match):
    inp = _p()
    args = {n: inp[n] for n in ("logprobs", "old_logprobs", "advantages", "mask")}
    kwargs = {}
    for k, v in kw.items():
        if k in args:
            args[k] = v(args[k])
        elif v == "ref":
            kwargs[k] = inp["ref_logprobs"]
        elif callable(v):
            kwargs[k] = v(inp[k])
        else:
            kwargs[k] = v
    with pytest.raises(exc, match=match):
        policy_loss(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **kwargs)


@pytest.mark.parametrize("name", ["old_logprobs", "advantages", "ref_logprobs"])
def test_policy_loss_constants_must_not_require_grad(name):
    inp = _p()
    inp[name] = inp[name].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{name}.*detach"):
        policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"],
                    ref_logprobs=inp["ref_logprobs"], kl_coef=0.1)
    # [B] advantages that require grad are refused too
    if name == "advantages":
        with pytest.raises(RuntimeError, match="advantages.*detach"):
            policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"][:, 0], inp["mask"])


def test_policy_loss_kernel_op_rejects_bad_arguments_directly():
    inp = _p()
    op = torch.ops.fastrlhf.policy_loss.default
    base = _policy_op_args(inp)
    with pytest.raises(RuntimeError, match="aggregation"):
        op(*base[:12], 7, *base[13:])
    with pytest.raises(RuntimeError, match="estimator"):
        op(*base[:10], 9, *base[11:])
    with pytest.raises(RuntimeError, match="old_logprobs"):
        op(base[0], base[1][:, :3], *base[2:])
    with pytest.raises(RuntimeError, match="mask"):
        op(*base[:3], base[3].float(), *base[4:])


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(clip=0.0), ValueError, "clip"),
        (dict(clip=-0.2), ValueError, "clip"),
        (dict(clip=float("nan")), ValueError, "clip"),
        (dict(agg="sum"), ValueError, "agg"),
        (dict(normalizer=0.0), ValueError, "normalizer"),
        (dict(normalizer=-1), ValueError, "normalizer"),
        (dict(norm_length=-1.0), ValueError, "norm_length"),
        (dict(values=lambda t: t[0]), ValueError, "values"),
        (dict(values=lambda t: t.int()), TypeError, "values"),
        (dict(old_values=lambda t: t[:, :3]), ValueError, "old_values"),
        (dict(returns=lambda t: t[:1]), ValueError, "returns"),
        (dict(returns=lambda t: t.to("meta")), ValueError, "returns"),
        (dict(mask=lambda t: t[:, :3]), ValueError, "mask"),
        (dict(impl="gpu"), ValueError, "impl"),
    ],
)
def test_value_loss_bad_input_names_the_argument(kw, exc, match):
    inp = value_inputs(2, 5)
    args = {n: inp[n] for n in ("values", "old_values", "returns", "mask")}
    kwargs = {}
    for k, v in kw.items():
        if k in args:
            args[k] = v(args[k])
        else:
            kwargs[k] = v
    with pytest.raises(exc, match=match):
        value_loss(args["values"], args["old_values"], args["returns"], args["mask"], **kwargs)


@pytest.mark.parametrize("name", ["old_values", "returns"])
def test_value_loss_constants_must_not_require_grad(name):
    inp = value_inputs(2, 5)
    inp[name] = inp[name].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{name}.*detach"):
        value_loss(inp["values"], inp["old_values"], inp["returns"], inp["mask"])


def test_value_loss_kernel_op_rejects_bad_arguments_directly():
    inp = value_inputs(2, 5)
    op = torch.ops.fastrlhf.value_loss.default
    with pytest.raises(RuntimeError, match="returns"):
        op(inp["values"], inp["old_values"], inp["returns"][:, :4], inp["mask"], 0.2, 0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="aggregation"):
        op(inp["values"], inp["old_values"], inp["returns"], inp["mask"], 0.2, 4, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="values"):
        op(inp["values"][0], inp["old_values"][0], inp["returns"][0], inp["mask"][0], 0.2, 0, 0.0, 0.0)
