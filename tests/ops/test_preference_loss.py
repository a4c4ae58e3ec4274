"""fastrlhf.ops.preference_loss: kernel vs reference (loss, stats, both gradients) for every loss
type, with and without references / margins / label smoothing; hand-worked values (TRL's DPO and
reward-model formulas); micro-batch invariance with a normalizer; stability at large margins;
gradcheck; low precision; opcheck; torch.compile; the module face and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastrlhf.ops import PreferenceLoss, preference_loss
from fastrlhf.ops.preference_loss import STAT_NAMES

from helpers import DEVICES, LOW_PRECISION, assert_close, runs_at_thread_counts

LOSS_TYPES = ["sigmoid", "ipo", "hinge"]


def inputs(B=9, *, dtype=torch.float64, device="cpu", seed=0, refs=True, margin=False):
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    c, r = -torch.rand(B, **f) * 40, -torch.rand(B, **f) * 40  # summed log-probs of a few dozen tokens
    rc, rr = c + torch.randn(B, **f), r + torch.randn(B, **f)
    m = torch.rand(B, **f) if margin else None
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return dict(chosen=cast(c), rejected=cast(r), ref_chosen=cast(rc) if refs else None,
                ref_rejected=cast(rr) if refs else None, margin=cast(m))


def run(inp, impl, **kw):
    c = inp["chosen"].detach().clone().requires_grad_()
    r = inp["rejected"].detach().clone().requires_grad_()
    loss, stats = preference_loss(c, r, inp["ref_chosen"], inp["ref_rejected"], margin=inp["margin"], impl=impl, **kw)
    loss.backward()
    return loss.detach(), stats, c.grad, r.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("refs", [True, False])
@pytest.mark.parametrize("margin", [False, True])
def test_kernel_matches_reference_fp64(device, loss_type, refs, margin):
    inp = inputs(device=device, refs=refs, margin=margin)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0)
    k, r = run(inp, "kernel", **kw), run(inp, "reference", **kw)
    assert_close(k[0], r[0], what="loss")
    for name in STAT_NAMES:
        assert_close(k[1][name], r[1][name], what=name)
    assert_close(k[2], r[2], what="grad chosen")
    assert_close(k[3], r[3], what="grad rejected")
    torch.testing.assert_close(k[3], -k[2], rtol=0, atol=0)


def test_hand_worked_dpo_and_reward_model_formulas():
    """TRL's DPO sigmoid loss and its reward-model loss, written out."""
    c, r = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.2])
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.5, -2.5])
    beta, eps = 0.5, 0.2
    logits = beta * ((c - rc) - (r - rr))  # h = [1.5, 0.2] -> [0.75, 0.1]
    want = (-(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    for impl in ("kernel", "reference"):
        loss, st = preference_loss(c, r, rc, rr, beta=beta, label_smoothing=eps, impl=impl)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
        assert st["accuracy"].item() == 1.0
        assert math.isclose(st["reward_margin"].item(), beta * (1.5 + 0.2) / 2, rel_tol=1e-6)
        assert math.isclose(st["rewards_chosen"].item(), beta * (1.0 + 0.5) / 2, rel_tol=1e-6)
    # reward model: -logsigmoid(r_chosen - r_rejected - margin)
    sc, sr, m = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5]), torch.tensor([0.5, 0.0, 1.0])
    want = -F.logsigmoid(sc - sr - m).mean()
    for impl in ("kernel", "reference"):
        loss, st = preference_loss(sc, sr, beta=1.0, margin=m, impl=impl)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
        assert math.isclose(st["accuracy"].item(), 1 / 3, rel_tol=1e-6)  # ties (h = 0) do not count


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ipo_and_hinge_closed_forms(loss_type):
    h = torch.tensor([-2.0, 0.0, 1.0, 6.0], dtype=torch.float64)
    zero = torch.zeros_like(h)
    beta = 0.25
    loss, _ = preference_loss(h, zero, beta=beta, loss_type=loss_type, impl="kernel")
    if loss_type == "ipo":
        want = ((h - 1 / (2 * beta)) ** 2).mean()
    elif loss_type == "hinge":
        want = torch.relu(1 - beta * h).mean()
    else:
        want = -F.logsigmoid(beta * h).mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_stable_for_large_margins(impl):
    c = torch.tensor([1000.0, -1000.0, 0.0], requires_grad=True)
    r = torch.zeros(3, requires_grad=True)
    loss, _ = preference_loss(c, r, beta=1.0, impl=impl)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isclose(loss.item(), (1000.0 + math.log(2)) / 3, rel_tol=1e-5)
    torch.testing.assert_close(c.grad, torch.tensor([0.0, -1 / 3, -1 / 6]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_add_up_with_a_global_normalizer(impl, loss_type):
    inp = inputs(B=10, seed=3, margin=True)
    full = run(inp, impl, beta=0.1, loss_type=loss_type)
    c = inp["chosen"].clone().requires_grad_()
    r = inp["rejected"].clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 3), slice(3, 4), slice(4, 10)):
        loss, _ = preference_loss(c[sl], r[sl], inp["ref_chosen"][sl], inp["ref_rejected"][sl], beta=0.1,
                                  loss_type=loss_type, margin=inp["margin"][sl], normalizer=10, impl=impl)
        loss.backward()
        total += loss.item()
    assert math.isclose(total, full[0].item(), rel_tol=1e-12)
    torch.testing.assert_close(c.grad, full[2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_fp64(loss_type):
    inp = inputs(B=5, seed=1, margin=True)
    c = inp["chosen"].clone().requires_grad_()
    r = inp["rejected"].clone().requires_grad_()
    f = lambda a, b: preference_loss(a, b, inp["ref_chosen"], inp["ref_rejected"], beta=0.3,  # noqa: E731
                                     loss_type=loss_type, margin=inp["margin"], impl="kernel")[0]
    assert torch.autograd.gradcheck(f, (c, r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_vs_fp64_reference(device, dtype):
    inp = inputs(B=33, dtype=dtype, device=device, seed=4, margin=True)
    k = run(inp, "kernel", beta=0.1)
    r = run({n: None if v is None else v.double() for n, v in inp.items()}, "reference", beta=0.1)
    assert k[0].dtype == torch.float32 and k[2].dtype == dtype
    assert_close(k[0], r[0], torch.float32, what="loss")
    assert_close(k[2], r[2], dtype, what="grad")


def test_empty_batch_gives_zero_loss():
    e = torch.zeros(0, requires_grad=True)
    for impl in ("kernel", "reference"):
        loss, st = preference_loss(e, e.detach(), impl=impl)
        assert loss.item() == 0.0 and st["accuracy"].item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bitwise_deterministic_across_threads_and_blocks(loss_type):
    """5000 pairs: several 1024-pair blocks and a partial one; fixed block order, so the same bits
    run to run and with 1 or 2 threads; the blocked sums agree with the reference."""
    inp = inputs(B=5000, dtype=torch.float32, seed=5)
    a, b, c = runs_at_thread_counts(lambda: run(inp, "kernel", loss_type=loss_type))
    for x in (b, c):
        assert torch.equal(a[0], x[0]) and torch.equal(a[2], x[2])
        assert all(torch.equal(a[1][k], x[1][k]) for k in STAT_NAMES)
    r = run(inp, "reference", loss_type=loss_type)
    assert_close(a[0], r[0], what="loss")
    for name in STAT_NAMES:
        assert_close(a[1][name], r[1][name], what=name)
    assert_close(a[2], r[2], what="grad chosen")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = torch.ops.fastrlhf.preference_loss.default
    inp = inputs(B=6, device=device, margin=True)
    c = inp["chosen"].clone().requires_grad_()
    torch.library.opcheck(op, (c, inp["rejected"], inp["ref_chosen"], inp["ref_rejected"], inp["margin"], 0.1, 0,
                               0.1, 0.0))
    torch.library.opcheck(op, (c, inp["rejected"], None, None, None, 1.0, 2, 0.0, 12.0))


def test_torch_compile_fullgraph():
    inp = inputs(B=8, dtype=torch.float32, margin=True)

    def f(c, r):
        loss, st = preference_loss(c, r, inp["ref_chosen"], inp["ref_rejected"], beta=0.2, margin=inp["margin"])
        return loss, st["accuracy"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (compiled, f):
        c = inp["chosen"].clone().requires_grad_()
        loss, acc = fn(c, inp["rejected"])
        loss.backward()
        outs.append((loss.detach(), acc, c.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_module_face():
    m = PreferenceLoss(beta=0.2, loss_type="ipo")
    inp = inputs(B=4)
    loss, _ = m(inp["chosen"], inp["rejected"], inp["ref_chosen"], inp["ref_rejected"])
    want, _ = preference_loss(inp["chosen"], inp["rejected"], inp["ref_chosen"], inp["ref_rejected"], beta=0.2,
                              loss_type="ipo")
    assert torch.equal(loss, want) and "loss_type='ipo'" in repr(m)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(beta=0.0), ValueError, "beta must be > 0"),
    (dict(loss_type="kto"), ValueError, "loss_type must be one of"),
    (dict(label_smoothing=0.7), ValueError, "label_smoothing must be in"),
    (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing applies to loss_type='sigmoid'"),
    (dict(normalizer=-1.0), ValueError, "normalizer must be > 0"),
    (dict(ref_chosen=torch.zeros(3)), ValueError, "pass both ref_chosen and ref_rejected"),
    (dict(rejected=torch.zeros(4)), ValueError, r"rejected must have shape \(3,\)"),
    (dict(chosen=torch.zeros(3, 1), rejected=torch.zeros(3, 1)), ValueError, "chosen must have 1 dims"),
    (dict(margin=torch.zeros(2)), ValueError, r"margin must have shape \(3,\)"),
    (dict(ref_chosen=torch.zeros(3, requires_grad=True), ref_rejected=torch.zeros(3)), RuntimeError,
     "ref_chosen requires grad"),
])
def test_bad_input_names_the_argument(kw, exc, match):
    args = dict(chosen=torch.zeros(3, requires_grad=True), rejected=torch.zeros(3))
    args.update(kw)
    with pytest.raises(exc, match=match):
        preference_loss(args.pop("chosen"), args.pop("rejected"), **args)
