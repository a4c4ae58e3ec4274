"""fastrlhf.ops.token_logprobs: kernel vs reference (values, entropy, gradients) over shapes,
temperatures and dtypes, gradcheck, extreme / -inf / NaN logits, out-of-range tokens, bad input,
opcheck, torch.compile, the "no fp32 [N, V] tensor for 16-bit logits" memory promise and the
module face."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from fastrlhf.ops import TokenLogprobs, token_logprobs

from helpers import DEVICES, LOW_PRECISION, assert_close

NEG_INF = float("-inf")


def make_inputs(lead, V, *, dtype=torch.float64, device="cpu", scale=3.0, seed=0):
    """logits ~ N(0, scale^2) of shape [*lead, V] and uniform tokens of shape lead."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    tokens = torch.randint(0, V, tuple(lead), generator=g).to(device)
    return logits, tokens


def sample_inputs(device, dtype):
    """Small inputs for the correctness, opcheck and torch.compile tests: 1-D and 2-D leading
    dims, V = 1, V not a multiple of the 32 CPU lanes, N = 0, temperatures != 1."""
    cases = [
        dict(lead=(7,), V=33, temperature=1.0),
        dict(lead=(2, 5), V=1003, temperature=0.7),
        dict(lead=(3,), V=1, temperature=1.0),
        dict(lead=(4,), V=64, temperature=1.9),
        dict(lead=(0,), V=17, temperature=1.0),
    ]
    for i, c in enumerate(cases):
        logits, tokens = make_inputs(c["lead"], c["V"], dtype=dtype, device=device, seed=i)
        yield dict(logits=logits, tokens=tokens, temperature=c["temperature"])


def forward_backward(logits, tokens, *, temperature=1.0, impl="kernel", seed=0, entropy_grad=True):
    """(logprobs, entropy, dlogits) of loss = sum(u * logprobs + w * entropy) with random u, w
    (so that both backward terms are exercised with different weights per position); without
    the entropy term when not ``entropy_grad``."""
    x = logits.detach().clone().requires_grad_()
    lp, ent = token_logprobs(x, tokens, temperature=temperature, return_entropy=True, impl=impl)
    g = torch.Generator().manual_seed(seed + 100)
    u = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype)
    w = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype)
    ((u * lp + w * ent) if entropy_grad else u * lp).sum().backward()
    return lp.detach(), ent.detach(), x.grad


# ---- kernel vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_kernel_matches_reference(device):
    for inp in sample_inputs(device, torch.float64):
        k = forward_backward(**inp, impl="kernel")
        r = forward_backward(**inp, impl="reference")
        for name, a, b in zip(("logprobs", "entropy", "grad_logits"), k, r):
            assert_close(a, b, what=f"{name} {tuple(inp['logits'].shape)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead,V",
    [((1,), 1), ((5,), 1), ((9,), 31), ((9,), 32), ((9,), 33), ((6,), 1003), ((2, 3), 64), ((2, 3, 4), 40),
     ((0,), 10), ((3, 0), 10), ((37,), 257)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_kernel_matches_reference_fp64(device, lead, V, temperature):
    logits, tokens = make_inputs(lead, V, device=device, seed=V + len(lead))
    k_lp, k_ent, k_grad = forward_backward(logits, tokens, temperature=temperature, impl="kernel")
    r_lp, r_ent, r_grad = forward_backward(logits, tokens, temperature=temperature, impl="reference")
    assert k_lp.shape == lead and k_ent.shape == lead and k_grad.shape == logits.shape
    assert k_lp.dtype == torch.float64 and k_grad.dtype == torch.float64
    # V = 1: every output vanishes by cancellation (log p, 1 - p with p = 1 to rounding), so it
    # is rounding noise (1e-16) of the logits' scale, not 0: the floor is absolute (scale 1)
    scale = 1.0 if V == 1 else None
    assert_close(k_lp, r_lp, scale=scale, what="logprobs")
    assert_close(k_ent, r_ent, scale=scale, what="entropy")
    assert_close(k_grad, r_grad, scale=scale, what="grad_logits")
    if V == 1:  # a one-token vocabulary: certain, zero entropy, zero gradient (to rounding; the
        # exact-sign invariants are test_logprob_nonpositive_entropy_nonnegative's business)
        for name, t in (("logprobs", k_lp), ("entropy", k_ent), ("grad_logits", k_grad)):
            assert_close(t, torch.zeros_like(t), atol=1e-12, what=f"{name}, V = 1")


@pytest.mark.parametrize("device", DEVICES)
def test_matches_log_softmax_gather_definition(device):
    """Independent of the reference module: torch.log_softmax / gather / sum(p log p)."""
    logits, tokens = make_inputs((4, 6), 50, device=device, seed=3)
    lp, ent = token_logprobs(logits, tokens, temperature=0.8, return_entropy=True, impl="kernel")
    logp = torch.log_softmax(logits / 0.8, dim=-1)
    assert_close(lp, logp.gather(-1, tokens[..., None])[..., 0])
    assert_close(ent, -(logp.exp() * logp).sum(-1))
    assert token_logprobs(logits, tokens, impl="kernel").shape == (4, 6)  # return_entropy=False: one tensor


@settings(max_examples=25)
@given(
    N=st.integers(0, 12), V=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.3, 3.0), scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_property_kernel_matches_reference(N, V, seed, temperature, scale):
    logits, tokens = make_inputs((N,), V, scale=scale, seed=seed)
    k = forward_backward(logits, tokens, temperature=temperature, impl="kernel", seed=seed)
    r = forward_backward(logits, tokens, temperature=temperature, impl="reference", seed=seed)
    for name, a, b in zip(("logprobs", "entropy", "grad_logits"), k, r):
        assert_close(a, b, rtol=1e-9, atol=1e-9, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("lead,V", [((5, 7), 1003), ((16,), 64), ((3,), 1)])
def test_low_precision_vs_fp64_reference(device, dtype, lead, V):
    """Kernel in fp32/bf16/fp16 vs the fp64 reference on the same (already rounded) logits.
    Outputs are fp32 for every non-fp64 dtype (so only fp32 accumulation error: checked with
    the fp32 tolerance, 1e-5, for fp16 / bf16 logits too); dlogits come back in the logits
    dtype and carry one rounding of it (TOLERANCES[dtype])."""
    logits, tokens = make_inputs(lead, V, dtype=dtype, device=device, seed=11)
    k_lp, k_ent, k_grad = forward_backward(logits, tokens, temperature=0.9, impl="kernel")
    r_lp, r_ent, r_grad = forward_backward(logits.double(), tokens, temperature=0.9, impl="reference")
    assert k_lp.dtype == torch.float32 and k_ent.dtype == torch.float32
    assert k_grad.dtype == dtype
    assert_close(k_lp, r_lp, torch.float32, rtol=1e-5, atol=2e-5, what="logprobs")
    assert_close(k_ent, r_ent, torch.float32, rtol=1e-5, atol=2e-5, what="entropy")
    if V == 1:  # dlogits = u (1 - p) with p = 1 to fp32 rounding: noise (4e-7) of the logits' scale
        assert_close(k_grad, r_grad, dtype, scale=1.0, what="grad_logits")
        return
    assert_close(k_grad, r_grad, dtype, what="grad_logits")
    # The kernel accumulates in fp32 and rounds each entry once to the logits' dtype: every entry
    # is within rtol (a few half-ulps) of the fp64 value; the floor only covers fp32 noise, 1e-5
    # of the row's largest entry. (Most entries are ~1e-5 of that largest entry: with the table's
    # floor, 2e-2 of it, zeros would pass for nearly all of them.)
    assert_close(k_grad, r_grad, dtype, atol=1e-5, scale="row", what="grad_logits, entrywise")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference_in_same_dtype(dtype):
    """The reference also upcasts to fp32: the two fp32 results agree to fp32 accuracy."""
    logits, tokens = make_inputs((8,), 300, dtype=dtype, seed=5)
    k = forward_backward(logits, tokens, impl="kernel")
    r = forward_backward(logits, tokens, impl="reference")
    assert r[0].dtype == torch.float32 and r[2].dtype == dtype
    assert_close(k[0], r[0], torch.float32, atol=2e-5, what="logprobs")
    assert_close(k[1], r[1], torch.float32, atol=2e-5, what="entropy")
    assert_close(k[2], r[2], dtype, what="grad_logits")


# ---- gradcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize("lead,V,temperature", [((3,), 5, 1.0), ((2, 2), 7, 0.7), ((1,), 33, 1.6)])
def test_gradcheck_fp64(lead, V, temperature):
    logits, tokens = make_inputs(lead, V, scale=1.0, seed=V)
    logits.requires_grad_()

    def f(x):
        return token_logprobs(x, tokens, temperature=temperature, return_entropy=True, impl="kernel")

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_gradcheck_each_output_alone():
    """Only logprobs used (grad_entropy is None in the backward op) and only entropy used."""
    logits, tokens = make_inputs((4,), 9, scale=1.0, seed=2)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, impl="kernel"), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs(x, tokens, return_entropy=True, impl="kernel")[1], (logits,)
    )


# ---- extreme values, -inf, NaN ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_logits_are_stable(dtype):
    """Logits of +-1e4 (exp overflows without the max shift): finite and accurate. In fp32 the
    answer must stay within 1e-5 of the exact one, as torch.log_softmax in fp32 (which computes
    (x - max) - log(sum)) does; x_tok - (max + log sum) would lose ulp(1e4) / 2 = 4.9e-4."""
    logits = torch.tensor(
        [[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4 + 2.0, -1e4], [1e4, 1e4, 1e4, 1e4]], dtype=torch.float64
    ).to(dtype)
    tokens = torch.tensor([3, 2, 1])
    lp, ent, grad = forward_backward(logits, tokens, impl="kernel")
    r_lp, r_ent, r_grad = forward_backward(logits.double(), tokens, impl="reference")
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    assert_close(lp, r_lp, torch.float64, **tol, what="logprobs")
    assert_close(ent, r_ent, torch.float64, **tol, what="entropy")
    assert_close(grad, r_grad, torch.float64, **tol, what="grad")
    # row 0: two live tokens 1e4 and 1e4 - 1: log p(1e4 - 1) = -1 - log(1 + e^-1)
    assert math.isclose(lp[0].item(), -1.0 - math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    # row 2: uniform over 4 tokens
    assert math.isclose(lp[2].item(), -math.log(4.0), rel_tol=1e-6)
    assert math.isclose(ent[2].item(), math.log(4.0), rel_tol=1e-6)
    # the fp32 reference meets the same bound
    ref32 = token_logprobs(logits.float(), tokens, impl="reference")
    assert_close(ref32, r_lp, torch.float64, rtol=1e-5, atol=1e-5, what="fp32 reference logprobs")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logprob_nonpositive_entropy_nonnegative(dtype, temperature):
    """log p <= 0 and H >= 0 always (the reference guarantees both: (x - max) - log(sum) with
    sum >= 1, and -sum p log p with every term >= 0). Peaked rows (one logit 40 above the rest,
    as in a confident policy) put p(token) within rounding of 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 50, generator=g, dtype=torch.float64)
    logits[:, 7] += 40.0
    logits = logits.to(dtype)
    tokens = torch.full((500,), 7)
    for impl in ("reference", "kernel"):
        lp, ent = token_logprobs(logits, tokens, temperature=temperature, return_entropy=True, impl=impl)
        assert (lp <= 0).all(), (
            f"{impl}: {(lp > 0).sum().item()} of 500 logprobs > 0 (max {lp.max().item():.3e})")
        assert (ent >= 0).all(), (
            f"{impl}: {(ent < 0).sum().item()} of 500 entropies < 0 (min {ent.min().item():.3e})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_neg_inf_logits(dtype):
    """-inf logits are impossible tokens (0 log 0 = 0): the row behaves like the vocabulary
    without them, gradients there are 0, and nothing is NaN. A chosen token whose logit is -inf
    has logprob -inf (with a finite gradient)."""
    V = 70  # > 2 x 32 lanes + a tail
    logits, tokens = make_inputs((4,), V, dtype=dtype, scale=2.0, seed=8)
    dead = torch.zeros(4, V, dtype=torch.bool)
    dead[0, [0, 5, 31, 32, 69]] = True
    dead[1, ::2] = True
    dead[2, 1:] = True  # a single live token
    dead[3, 10] = True
    logits = logits.masked_fill(dead, NEG_INF)
    tokens = torch.tensor([1, 1, 0, 10])  # row 3 picks its -inf token
    lp, ent, grad = forward_backward(logits, tokens, impl="kernel")

    assert torch.isfinite(lp[:3]).all() and torch.isfinite(ent).all()
    assert lp[3].item() == NEG_INF
    assert not torch.isnan(grad).any() and torch.isfinite(grad).all()
    assert (grad[dead & (torch.arange(V) != tokens[:, None])] == 0).all()
    assert lp[2].item() == 0.0 and ent[2].item() == 0.0

    # each row equals the same computation over its live tokens only (fp64 reference)
    for i in range(3):
        live = ~dead[i]
        sub_tok = live[: tokens[i]].sum()[None]
        r_lp, r_ent, _ = forward_backward(logits[i, live][None].double(), sub_tok, impl="reference")
        assert_close(lp[i : i + 1], r_lp, torch.float32, rtol=1e-5, atol=1e-5, what=f"row {i} logprob")
        assert_close(ent[i : i + 1], r_ent, torch.float32, rtol=1e-5, atol=1e-5, what=f"row {i} entropy")
    r_lp, r_ent, r_grad = forward_backward(logits.double(), tokens, impl="reference")
    assert_close(ent, r_ent, torch.float32, rtol=1e-5, atol=1e-5, what="entropy")
    assert_close(grad, r_grad, dtype if dtype != torch.float64 else None, what="grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_all_neg_inf_row_is_nan_and_isolated(dtype):
    logits, tokens = make_inputs((5,), 45, dtype=dtype, seed=4)
    logits[2] = NEG_INF
    lp, ent, grad = forward_backward(logits, tokens, impl="kernel")
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    others = torch.tensor([0, 1, 3, 4])
    assert torch.isfinite(lp[others]).all() and torch.isfinite(ent[others]).all()
    assert torch.isfinite(grad[others]).all()
    assert torch.isnan(grad[2]).all()  # as log_softmax's gradient (with and without the entropy term)
    _, _, grad_lp_only = forward_backward(logits, tokens, impl="kernel", entropy_grad=False)
    assert torch.isnan(grad_lp_only[2]).all() and torch.isfinite(grad_lp_only[others]).all()
    # the other rows are exactly what they are without the bad row
    clean_lp, clean_ent = token_logprobs(logits[others], tokens[others], return_entropy=True, impl="kernel")
    assert torch.equal(lp[others], clean_lp) and torch.equal(ent[others], clean_ent)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("col", [0, 31, 32, 1002])
def test_nan_logit_poisons_only_its_row(dtype, col):
    """NaN propagates to its row (logprob and entropy), whichever lane / tail position holds it,
    even when it is not the chosen token and not the max; other rows are bitwise unchanged."""
    logits, tokens = make_inputs((4,), 1003, dtype=dtype, seed=6)
    tokens[1] = (col + 7) % 1003
    clean = token_logprobs(logits, tokens, return_entropy=True, impl="kernel")
    logits[1, col] = float("nan")
    lp, ent = token_logprobs(logits, tokens, return_entropy=True, impl="kernel")
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    rows = torch.tensor([0, 2, 3])
    assert torch.equal(lp[rows], clean[0][rows]) and torch.equal(ent[rows], clean[1][rows])
    # gradients of the other rows stay finite
    _, _, grad = forward_backward(logits, tokens, impl="kernel")
    assert torch.isfinite(grad[rows]).all() and torch.isnan(grad[1]).all()


# ---- out-of-range tokens and bad input ----------------------------------------------------


@pytest.mark.parametrize("bad", ["V", -1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_out_of_range_tokens_raise(bad, dtype):
    V = 17
    logits, tokens = make_inputs((6,), V, dtype=dtype)
    tokens[3] = V if bad == "V" else -1
    with pytest.raises(RuntimeError, match=r"\[0, V\)"):
        token_logprobs(logits, tokens, impl="kernel")
    with pytest.raises(RuntimeError, match=r"\[0, V\)"):
        torch.ops.fastrlhf.token_logprobs.default(logits, tokens, 1.0)
    with pytest.raises(RuntimeError, match=r"\[0, V\)"):  # auto picks the kernel on the CPU
        token_logprobs(logits.requires_grad_(), tokens)


def _args():
    return make_inputs((2, 3), 5, dtype=torch.float32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, t: token_logprobs(x.long(), t), TypeError, "logits"),
        (lambda x, t: token_logprobs(x.to(torch.complex64), t), TypeError, "logits"),
        (lambda x, t: token_logprobs(x.tolist(), t), TypeError, "logits"),
        (lambda x, t: token_logprobs(x[0, 0, 0], t), ValueError, "logits"),  # 0-dim
        (lambda x, t: token_logprobs(x[..., :0], t), ValueError, "logits"),  # V = 0
        (lambda x, t: token_logprobs(x, t[:, :2]), ValueError, "tokens"),
        (lambda x, t: token_logprobs(x, t[..., None]), ValueError, "tokens"),
        (lambda x, t: token_logprobs(x, t.float()), TypeError, "tokens"),
        (lambda x, t: token_logprobs(x, t.bool()), TypeError, "tokens"),
        (lambda x, t: token_logprobs(x, t.tolist()), TypeError, "tokens"),
        (lambda x, t: token_logprobs(x, t.to("meta")), ValueError, "tokens"),
        (lambda x, t: token_logprobs(x, t, temperature=0.0), ValueError, "temperature"),
        (lambda x, t: token_logprobs(x, t, temperature=-1.0), ValueError, "temperature"),
        (lambda x, t: token_logprobs(x, t, temperature=float("nan")), ValueError, "temperature"),
        (lambda x, t: token_logprobs(x, t, temperature=float("inf")), ValueError, "temperature"),
        (lambda x, t: token_logprobs(x, t, impl="triton"), ValueError, "impl"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    x, t = _args()
    with pytest.raises(exc, match=match):
        call(x, t)


def test_int32_tokens_are_accepted():
    x, t = _args()
    assert torch.equal(token_logprobs(x, t.int()), token_logprobs(x, t))


def test_kernel_op_rejects_bad_tensors_directly():
    x, t = make_inputs((4,), 5)
    op = torch.ops.fastrlhf.token_logprobs.default
    with pytest.raises(RuntimeError, match="logits"):
        op(x[None], t, 1.0)
    with pytest.raises(RuntimeError, match="logits"):
        op(x.long(), t, 1.0)
    with pytest.raises(RuntimeError, match="tokens"):
        op(x, t.int(), 1.0)
    with pytest.raises(RuntimeError, match="tokens"):
        op(x, t[:3], 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        op(x, t, 0.0)
    lp, ent, stats = op(x, t, 1.0)
    with pytest.raises(RuntimeError, match="entropy"):
        torch.ops.fastrlhf.token_logprobs_backward.default(lp, None, x, t, stats, ent[:2], 1.0)
    with pytest.raises(RuntimeError, match="grad_logprobs"):
        torch.ops.fastrlhf.token_logprobs_backward.default(lp[:3], None, x, t, stats, ent, 1.0)


@pytest.mark.parametrize("op", ["token_logprobs_backward", "token_logprobs_backward_"])
def test_backward_op_called_directly_checks_tokens(op):
    """The backward ops are public (torch.ops): a bad token raises instead of writing out of bounds."""
    x = torch.randn(3, 10)
    lp, ent, row_stats = torch.ops.fastrlhf.token_logprobs.default(x, torch.tensor([1, 2, 3]), 1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        getattr(torch.ops.fastrlhf, op).default(torch.ones(3), None, x, torch.tensor([1, 10, 3]), row_stats, ent, 1.0)


# ---- opcheck and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_token_logprobs(device):
    for inp in sample_inputs(device, torch.float64):
        V = inp["logits"].shape[-1]
        logits = inp["logits"].reshape(-1, V).requires_grad_()  # the op takes [N, V], [N]
        args = (logits, inp["tokens"].reshape(-1), inp["temperature"])
        torch.library.opcheck(torch.ops.fastrlhf.token_logprobs.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_token_logprobs_backward(device):
    for inp in list(sample_inputs(device, torch.float32))[:2]:
        V = inp["logits"].shape[-1]
        x, t, temp = inp["logits"].reshape(-1, V), inp["tokens"].reshape(-1), inp["temperature"]
        lp, ent, row_stats = torch.ops.fastrlhf.token_logprobs.default(x, t, temp)
        op = torch.ops.fastrlhf.token_logprobs_backward.default
        torch.library.opcheck(op, (torch.randn_like(lp), torch.randn_like(ent), x, t, row_stats, ent, temp))
        torch.library.opcheck(op, (torch.randn_like(lp), None, x, t, row_stats, ent, temp))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_inplace_backward_matches_out_of_place(device, dtype):
    """token_logprobs_backward_ writes the same dlogits over the logits (the chosen token's logit
    is read before its row is overwritten); opcheck of the mutating op."""
    for inp in sample_inputs(device, dtype):
        V = inp["logits"].shape[-1]
        x, t, temp = inp["logits"].reshape(-1, V), inp["tokens"].reshape(-1), inp["temperature"]
        lp, ent, row_stats = torch.ops.fastrlhf.token_logprobs.default(x, t, temp)
        for g, h in ((torch.randn_like(lp), torch.randn_like(ent)), (torch.randn_like(lp), None),
                     (None, torch.randn_like(ent))):
            want = torch.ops.fastrlhf.token_logprobs_backward.default(g, h, x, t, row_stats, ent, temp)
            got = x.clone()
            torch.ops.fastrlhf.token_logprobs_backward_.default(g, h, got, t, row_stats, ent, temp)
            assert torch.equal(got, want)
        torch.library.opcheck(torch.ops.fastrlhf.token_logprobs_backward_.default,
                              (torch.randn_like(lp), None, x.clone(), t, row_stats, ent, temp))
    x = torch.randn(4, 6, device=device).t()  # in place needs contiguous logits
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastrlhf.token_logprobs_backward_.default(
            None, None, x, torch.zeros(6, dtype=torch.long, device=device), torch.zeros(6, 2, device=device),
            torch.zeros(6, device=device), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(logits, tokens):
        lp, ent = token_logprobs(logits, tokens, temperature=0.9, return_entropy=True)
        return (lp * 2.0).sum() + ent.mean(), lp

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inp = list(sample_inputs(device, torch.float32))[1]
    x1 = inp["logits"].clone().requires_grad_()
    x2 = inp["logits"].clone().requires_grad_()
    loss_c, lp_c = compiled(x1, inp["tokens"])
    loss_e, lp_e = f(x2, inp["tokens"])
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(lp_c, lp_e)
    assert_close(loss_c, loss_e)
    assert x1.grad is not None and torch.equal(x1.grad, x2.grad)


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_calls_and_threads(dtype):
    logits, tokens = make_inputs((64,), 1003, dtype=dtype, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = forward_backward(logits, tokens, temperature=0.8)
        b = forward_backward(logits, tokens, temperature=0.8)
        torch.set_num_threads(1)
        c = forward_backward(logits, tokens, temperature=0.8)
    finally:
        torch.set_num_threads(before)
    for other in (b, c):
        for name, x, y in zip(("logprobs", "entropy", "grad_logits"), a, other):
            assert torch.equal(x, y), name


# ---- memory: no fp32 [N, V] tensor for 16-bit logits --------------------------------------


def _allocations(fn):
    """Sizes in bytes of every CPU allocation made while running fn (allocator-level events from
    the profiler, so allocations inside C++ kernels count too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_fp32_logits_sized_tensor(dtype):
    N, V = 48, 1000
    logits, tokens = make_inputs((N,), V, dtype=dtype, seed=1)
    fp32_nv = 4 * N * V

    def run(impl):
        def fn():
            x = logits.detach().requires_grad_()
            lp, ent = token_logprobs(x, tokens, return_entropy=True, impl=impl)
            (lp.sum() + ent.sum()).backward()
            assert x.grad.dtype == dtype
        return _allocations(fn)

    kernel = run("kernel")
    # the detector sees allocations made inside the C++ backward: the dlogits tensor (16-bit)
    assert 2 * N * V in kernel, sorted(kernel)[-5:]
    assert max(kernel) < fp32_nv, f"an allocation of {max(kernel)} bytes >= 4 * N * V = {fp32_nv}"
    # ... and it does catch the reference path, which upcasts the logits to fp32
    reference = run("reference")
    assert max(reference) >= fp32_nv


# ---- module face --------------------------------------------------------------------------


def test_module_face():
    m = TokenLogprobs(temperature=0.7, return_entropy=True)
    assert isinstance(m, torch.nn.Module)
    assert "temperature=0.7" in repr(m) and "return_entropy=True" in repr(m)
    logits, tokens = make_inputs((3, 4), 20)
    lp, ent = m(logits, tokens)
    r_lp, r_ent = token_logprobs(logits, tokens, temperature=0.7, return_entropy=True, impl="reference")
    assert_close(lp, r_lp)
    assert_close(ent, r_ent)
    only = TokenLogprobs(impl="reference")(logits, tokens)
    assert isinstance(only, torch.Tensor)
    assert_close(only, token_logprobs(logits, tokens, impl="kernel"))
