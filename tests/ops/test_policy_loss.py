"""fastrlhf.ops.policy_loss: kernel vs reference (loss, every stat, gradients) over every
aggregation, KL estimator, entropy / dual-clip option and mask pattern; hand-worked examples;
micro-batch invariance with a global normalizer; gradcheck; low precision; determinism;
opcheck; torch.compile (with value_loss); the module face and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.ops import PolicyLoss, PPOLoss, policy_loss, value_loss
from fastrlhf.ops.policy_loss import STAT_NAMES

from helpers import DEVICES, LOW_PRECISION, MASK_KINDS, TOLERANCES, assert_close, runs_at_thread_counts
from helpers.losses import AGG_CODE, AGGS, global_normalizer, policy_inputs, policy_run, to64, value_inputs, value_run


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
    norm = global_normalizer(inp["mask"], agg)
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

    a, b, c = runs_at_thread_counts(run)
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


def test_policy_loss_module_face():
    assert PPOLoss is PolicyLoss  # the earlier name stays an alias
    m = PolicyLoss(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.01,
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




@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_fractional_masks_are_refused_not_read_as_true(value):
    """A mask marks valid tokens; a weight such as 0.5 was silently treated as True."""
    inp = _p()
    mask = inp["mask"].double()
    mask[0, 1] = value
    with pytest.raises(ValueError, match=f"mask must hold only 0 and 1 .*found {value}"):
        policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], mask)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        value_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], mask)
    int_mask = inp["mask"].long()
    int_mask[0, 1] = 2
    with pytest.raises(ValueError, match="found 2"):
        policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], int_mask)
    ok = inp["mask"].double()  # 0.0 / 1.0 numbers are fine
    torch.testing.assert_close(policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], ok)[0],
                               policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"])[0])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name,value", [("old_logprobs", -float("inf")), ("logprobs", float("nan")),
                                        ("advantages", float("inf"))])
def test_non_finite_inputs_at_valid_tokens_are_refused(impl, name, value):
    """An old log-prob of -inf gave approx_kl = -inf (kernel) / NaN (reference) and a ratio_max of
    1.65e38; such an input is now refused, naming the tensor and the token."""
    inp = _p()
    inp[name] = inp[name].clone()
    inp[name][1, 2] = value
    inp["mask"][1, 2] = True
    with pytest.raises(ValueError, match=rf"{name}\[1, 2\] = .* at a valid token; it must be finite"):
        policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], impl=impl)
    inp["mask"][1, 2] = False  # at a masked token it does not matter
    loss, st = policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], impl=impl)
    assert torch.isfinite(loss) and st["approx_kl"] >= 0


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_kl_k3_clamp_passes_through(impl):
    inp = _p()
    ref = inp["logprobs"] + 5.0  # d = -5: the clamped k3 is capped at 10, the unclamped one is e^5 - 6
    kw = dict(ref_logprobs=ref, kl_coef=1.0, kl_estimator="k3", impl=impl)
    _, clamped = policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], **kw)
    _, raw = policy_loss(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], kl_k3_clamp=False, **kw)
    assert clamped["kl"].item() == pytest.approx(10.0)
    assert raw["kl"].item() == pytest.approx(math.exp(5.0) - 6.0, rel=1e-5)
