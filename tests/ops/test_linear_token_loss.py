"""fastrlhf.ops.linear_token_loss: loss and gradients (hidden, weight, bias) equal the
materialized reference for every chunk size, with PPO / GRPO (seq-mean) / SFT losses, frozen
parts, upstream gradient scaling, no-grad calls, low precision, gradcheck, and the errors that
keep a wrong loss_fn from silently losing gradients."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import linear_token_loss, policy_loss

from helpers import DEVICES, assert_close, lm_head_inputs


def make_inputs(lead, H, V, **kw):
    """(hidden, weight, bias, tokens): conftest.lm_head_inputs as a tuple."""
    d = lm_head_inputs(lead, H, V, **kw)
    return d["hidden"], d["weight"], d["bias"], d["tokens"]


def ppo_loss_fn(lead, device, *, agg="token-mean", seed=1, entropy_coef=0.01):
    """A PPO/GRPO loss over [B, T] (or [N]) rows, separable over rows through its normalizer."""
    g = torch.Generator().manual_seed(seed)
    old = (torch.randn(lead, generator=g, dtype=torch.float64) - 3.0).to(device)
    adv = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(lead, generator=g) > 0.25).to(device)
    two_d = lambda t: t if t.dim() == 2 else t[:, None]  # noqa: E731  [N] rows -> [N, 1] sequences
    normalizer = mask.sum().item() if agg == "token-mean" else lead[0]

    def fn(lp, ent, rows):
        loss, _ = policy_loss(two_d(lp), two_d(old[rows]).to(lp.dtype), two_d(adv[rows]).to(lp.dtype),
                              two_d(mask[rows]), entropy=two_d(ent), entropy_coef=entropy_coef, agg=agg,
                              normalizer=max(normalizer, 1))
        return loss

    return fn


def run(hidden, weight, bias, tokens, loss_fn, *, grad_scale=1.0, requires=(True, True, True), **kw):
    """-> (loss, logprobs, entropy, grad_hidden, grad_weight, grad_bias) of grad_scale * loss."""
    leaves = []
    for t, r in zip((hidden, weight, bias), requires):
        leaves.append(None if t is None else t.detach().clone().requires_grad_(r))
    h, W, b = leaves
    out = linear_token_loss(h, W, tokens, loss_fn, bias=b, **kw)
    if out.loss.requires_grad:
        (out.loss * grad_scale).backward()
    grads = tuple(None if t is None or not t.requires_grad else t.grad for t in (h, W, b))
    return (out.loss.detach(), out.logprobs, out.entropy) + grads


NAMES = ("loss", "logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def assert_all_close(got, want, dtype=None, **tol):
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert_close(a, b, dtype, what=name, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_rows", [1, 2, 3, None, 100])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_ppo_loss_matches_reference_fp64(device, chunk_rows, agg):
    """[B, T, H] hidden, chunks of whole sequences: the PPO loss with its batch normalizer sums
    over chunks to the one-call reference, gradients included (bias and temperature too)."""
    lead = (5, 7)
    hidden, weight, bias, tokens = make_inputs(lead, 6, 37, device=device, seed=3)
    fn = ppo_loss_fn(lead, device, agg=agg)
    kw = dict(temperature=0.8, chunk_rows=chunk_rows)
    got = run(hidden, weight, bias, tokens, fn, impl="kernel", **kw)
    want = run(hidden, weight, bias, tokens, fn, impl="reference", **kw)
    assert got[0].shape == () and got[1].shape == lead and got[3].shape == hidden.shape
    assert_all_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,chunk_rows", [((9,), 4), ((9,), None), ((2, 3, 4), 1), ((0,), 3), ((3, 0), 2)])
def test_sft_loss_any_leading_dims(device, lead, chunk_rows):
    """SFT cross-entropy (-mean log p over valid tokens) on flat tokens, 3 leading dims and
    empty inputs; without bias."""
    hidden, weight, _, tokens = make_inputs(lead, 5, 23, bias=False, device=device, seed=4)
    mask = (torch.arange(tokens.numel(), device=device).view(lead) % 3 != 0)
    n = max(int(mask.sum()), 1)

    def sft(lp, ent, rows):
        return -(lp * mask[rows]).sum() / n

    got = run(hidden, weight, None, tokens, sft, impl="kernel", chunk_rows=chunk_rows)
    want = run(hidden, weight, None, tokens, sft, impl="reference", chunk_rows=chunk_rows)
    assert_all_close(got, want)
    assert got[5] is None


def test_matches_eager_log_softmax_definition():
    """Independent of fastrlhf's reference: F.linear -> log_softmax -> gather, entropy term."""
    hidden, weight, bias, tokens = make_inputs((6,), 4, 19, seed=5)

    def fn(lp, ent, rows):
        return (lp * torch.arange(1.0, 7.0, dtype=lp.dtype)[rows]).sum() + 0.3 * ent.sum()

    got = run(hidden, weight, bias, tokens, fn, impl="kernel", chunk_rows=4, temperature=1.3)
    h, W, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    logp = torch.log_softmax(torch.nn.functional.linear(h, W, b) / 1.3, dim=-1)
    lp = logp.gather(-1, tokens[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    loss = fn(lp, ent, slice(0, 6))
    loss.backward()
    assert_all_close(got, (loss.detach(), lp.detach(), ent.detach(), h.grad, W.grad, b.grad))


def test_upstream_gradient_scales_and_frozen_parts():
    """loss * 2.5 scales every gradient; a frozen LM head (weight without grad) or frozen
    trunk (hidden without grad) gets exactly the reference's remaining gradients."""
    hidden, weight, bias, tokens = make_inputs((4, 3), 6, 17, seed=6)
    fn = ppo_loss_fn((4, 3), "cpu")
    for requires in ((True, True, True), (True, False, False), (False, True, True), (False, False, True)):
        got = run(hidden, weight, bias, tokens, fn, grad_scale=2.5, requires=requires, chunk_rows=2)
        want = run(hidden, weight, bias, tokens, fn, grad_scale=2.5, requires=requires, impl="reference")
        assert_all_close(got, want)


def test_combined_with_another_loss_term():
    """The loss composes with other terms (a value loss on its own parameter) in one backward."""
    hidden, weight, bias, tokens = make_inputs((3, 4), 5, 11, seed=7)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = []
    for impl in ("kernel", "reference"):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        v.grad = None
        lt = linear_token_loss(h, W, tokens, lambda lp, ent, rows: lp.sum() / 12, impl=impl, chunk_rows=1)
        (lt.loss + 0.5 * (v**2).mean()).backward()
        out.append((h.grad, W.grad, v.grad.clone()))
    for a, b in zip(*out):
        assert_close(a, b)


def test_no_grad_call_gives_the_loss_only():
    hidden, weight, bias, tokens = make_inputs((5, 2), 4, 13, seed=8)
    fn = ppo_loss_fn((5, 2), "cpu")
    want = run(hidden, weight, bias, tokens, fn, impl="reference")
    with torch.no_grad():
        out = linear_token_loss(hidden, weight, tokens, fn, bias=bias, chunk_rows=2)
    assert not out.loss.requires_grad
    assert_close(out.loss, want[0])
    assert_close(out.logprobs, want[1])


def test_loss_fn_independent_of_logits_gives_zero_gradients():
    hidden, weight, bias, tokens = make_inputs((4,), 3, 7, seed=9)
    got = run(hidden, weight, bias, tokens, lambda lp, ent, rows: lp.new_zeros(()), chunk_rows=3)
    for name, g in zip(NAMES[3:], got[3:]):
        assert torch.count_nonzero(g) == 0, name


def test_gradient_matches_finite_differences_fp64():
    """Directional derivatives along random directions of (hidden, weight, bias) against central
    differences (torch.autograd.gradcheck re-runs one backward, which this op refuses)."""
    hidden, weight, bias, tokens = make_inputs((3, 2), 4, 9, seed=10)
    fn = ppo_loss_fn((3, 2), "cpu", agg="seq-mean-token-mean")

    def f(h, W, b):
        return linear_token_loss(h, W, tokens, fn, bias=b, chunk_rows=2, temperature=0.7).loss

    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    f(*inputs).backward()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        dirs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
        eps = 1e-6
        with torch.no_grad():
            plus = f(*(t + eps * d for t, d in zip(inputs, dirs)))
            minus = f(*(t - eps * d for t, d in zip(inputs, dirs)))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((t.grad * d).sum() for t, d in zip(inputs, dirs))
        assert_close(analytic, numeric, rtol=1e-6, atol=1e-7, what="directional derivative")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_vs_fp64_reference(device, dtype):
    """fp32 logits/grads within fp32 accuracy; 16-bit chunks are matmuls in the storage dtype
    (as in eager code) with fp32 accumulation of grad_weight: one rounding of the logits and of
    the returned gradients, relative to the gradients' scale."""
    hidden, weight, bias, tokens = make_inputs((6, 5), 16, 300, dtype=dtype, device=device, seed=11)
    fn = ppo_loss_fn((6, 5), device)
    got = run(hidden, weight, bias, tokens, fn, chunk_rows=2)
    want = run(hidden.double(), weight.double(), bias.double(), tokens, fn, impl="reference")
    assert got[1].dtype == torch.float32 and got[3].dtype == dtype and got[4].dtype == dtype
    for name, a, b in zip(NAMES, got, want):
        b = b.to(a.dtype).double() if name.startswith("grad") else b
        if dtype == torch.float32:
            atol = 1e-5 * max(1.0, float(b.abs().max()))
        elif name.startswith("grad"):  # measured ~0.3% of the largest entry in bf16, ~0.05% in fp16
            atol = 0.012 * float(b.abs().max())
        else:  # logits rounded to the storage dtype: ~2e-3 relative of |logit| ~ 10
            atol = 0.06
        assert_close(a.double(), b.double(), rtol=0.0, atol=atol, what=f"{name} {dtype}")


def test_chunk_rows_does_not_change_results_fp32():
    hidden, weight, bias, tokens = make_inputs((8,), 8, 40, dtype=torch.float32, seed=12)
    a = run(hidden, weight, bias, tokens, lambda lp, ent, rows: lp.sum() + ent.sum(), chunk_rows=1)
    b = run(hidden, weight, bias, tokens, lambda lp, ent, rows: lp.sum() + ent.sum(), chunk_rows=8)
    assert_all_close(a, b, torch.float32)


def test_torch_compile_matches_eager():
    """Under torch.compile (graph breaks around the chunk loop) the loss and gradients match."""
    hidden, weight, bias, tokens = make_inputs((4, 3), 8, 11, dtype=torch.float32, seed=16)

    def f(h, W):
        return linear_token_loss(h, W, tokens, lambda lp, ent, rows: lp.sum() - ent.sum(), chunk_rows=2).loss * 2

    results = []
    for fn in (f, torch.compile(f, backend="eager")):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, W)
        loss.backward()
        results.append((loss.detach(), h.grad, W.grad))
    for a, b in zip(*results):
        assert_close(a, b, torch.float32)


# ---- errors -------------------------------------------------------------------------------


def test_loss_fn_using_another_grad_tensor_raises():
    """A tensor that requires grad inside loss_fn would lose its gradient: refused."""
    hidden, weight, bias, tokens = make_inputs((4, 2), 3, 7, seed=13)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    h = hidden.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="requires grad"):
        linear_token_loss(h, weight, tokens, lambda lp, ent, rows: (lp * scale).sum(), impl="kernel")
    with pytest.raises(RuntimeError, match="requires grad"):  # frozen LM head and trunk: still refused
        linear_token_loss(hidden, weight, tokens, lambda lp, ent, rows: (lp * scale).sum(), impl="kernel")
    with pytest.raises(RuntimeError, match="requires grad"):  # a leaf returned as the loss
        linear_token_loss(h, weight, tokens, lambda lp, ent, rows: scale, impl="kernel")
    with torch.no_grad():  # no gradients wanted: nothing is lost
        linear_token_loss(h, weight, tokens, lambda lp, ent, rows: (lp * scale).sum(), impl="kernel")
    # the reference is plain autograd: the other tensor gets its gradient, d/dscale sum(lp * scale) = sum(lp)
    out = linear_token_loss(h, weight, tokens, lambda lp, ent, rows: (lp * scale).sum(), impl="reference")
    out.loss.backward()
    want = torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens[..., None]).sum()  # no bias passed
    torch.testing.assert_close(scale.grad, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale.grad, out.logprobs.sum(), rtol=1e-12, atol=1e-12)


def test_loss_fn_editing_its_inputs_in_place_does_not_change_gradients():
    hidden, weight, bias, tokens = make_inputs((5,), 4, 9, seed=17)

    def sneaky(lp, ent, rows):
        loss = lp.sum() + ent.sum()
        with torch.no_grad():
            lp.zero_(), ent.fill_(7.0)
        return loss

    got = run(hidden, weight, bias, tokens, sneaky, impl="kernel", chunk_rows=2)
    want = run(hidden, weight, bias, tokens, lambda lp, ent, rows: lp.sum() + ent.sum(), impl="kernel")
    assert_all_close(got, want)


def test_backward_twice_raises():
    hidden, weight, bias, tokens = make_inputs((3,), 3, 5, seed=14)
    h = hidden.clone().requires_grad_()
    out = linear_token_loss(h, weight, tokens, lambda lp, ent, rows: lp.sum(), impl="kernel")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        out.loss.backward()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(loss_fn=lambda lp, ent, rows: lp), ValueError, "0-dim"),
        (dict(loss_fn=lambda lp, ent, rows: 1.0), ValueError, "0-dim"),
        (dict(loss_fn="sum"), TypeError, "callable"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(tokens=torch.zeros(4, 3, dtype=torch.long)), ValueError, "tokens"),
        (dict(weight=torch.zeros(7, 5, dtype=torch.float64)), ValueError, "weight"),
        (dict(hidden=torch.zeros(3, dtype=torch.float64), tokens=torch.zeros((), dtype=torch.long)),
         ValueError, "hidden"),
    ],
)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("grad", [True, False])
def test_bad_input_raises(kwargs, exc, match, impl, grad):
    hidden, weight, _, tokens = make_inputs((4, 2), 3, 7, seed=15)
    args = dict(hidden=hidden.requires_grad_(), weight=weight, tokens=tokens, loss_fn=lambda lp, ent, rows: lp.sum())
    args.update(kwargs)
    with torch.set_grad_enabled(grad), pytest.raises(exc, match=match):
        linear_token_loss(**args, impl=impl)


def test_empty_batch_calls_loss_fn_like_the_reference():
    hidden, weight, bias, tokens = make_inputs((0, 3), 4, 9, seed=18)
    for impl in ("kernel", "reference"):
        out = linear_token_loss(hidden, weight, tokens, lambda lp, ent, rows: lp.mean(), impl=impl)
        assert out.loss.isnan() and out.logprobs.shape == (0, 3)


def test_warns_when_one_row_is_a_huge_chunk():
    hidden = torch.zeros(1, 3000, 2)
    weight = torch.zeros(30000, 2)
    with pytest.warns(UserWarning, match="flat tokens"):
        linear_token_loss(hidden, weight, torch.zeros(1, 3000, dtype=torch.long), lambda lp, ent, rows: lp.sum(),
                          impl="kernel")
