"""fastrlhf.ops.linear_token_logprobs: equals token_logprobs(hidden @ weight.T + bias) for every
chunk size, gradients (hidden, weight, bias) vs the materialized reference, gradcheck, bf16,
leading dims, memory (no [N, V] logits), opcheck, torch.compile, bad input and the module face."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastrlhf.ops import LinearTokenLogprobs, linear_token_logprobs, token_logprobs

from helpers import DEVICES, assert_close, lm_head_inputs

make_inputs = lm_head_inputs


def sample_inputs(device, dtype):
    """Small inputs for correctness, opcheck and compile: chunk sizes 1, 2, N, > N and the
    default; with / without bias; V = 1; leading dims; N = 0; a temperature != 1."""
    cases = [
        dict(lead=(5,), H=8, V=11, bias=True, chunk_size=2, temperature=1.0),
        dict(lead=(2, 3), H=6, V=37, bias=False, chunk_size=None, temperature=0.8),
        dict(lead=(4,), H=3, V=1, bias=True, chunk_size=1, temperature=1.0),
        dict(lead=(7,), H=5, V=33, bias=True, chunk_size=100, temperature=1.5),
        dict(lead=(0,), H=4, V=6, bias=True, chunk_size=3, temperature=1.0),
    ]
    for i, c in enumerate(cases):
        inp = make_inputs(c["lead"], c["H"], c["V"], bias=c["bias"], dtype=dtype, device=device, seed=i)
        yield dict(inp, chunk_size=c["chunk_size"], temperature=c["temperature"])


def forward_backward(hidden, weight, tokens, bias=None, *, impl="kernel", seed=0, **kw):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) of sum(u * lp + w * ent)."""
    h = hidden.detach().clone().requires_grad_()
    W = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    lp, ent = linear_token_logprobs(h, W, tokens, bias=b, return_entropy=True, impl=impl, **kw)
    g = torch.Generator().manual_seed(seed + 7)
    u = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype)
    w = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device, lp.dtype)
    (u * lp + w * ent).sum().backward()
    return lp.detach(), ent.detach(), h.grad, W.grad, (b.grad if b is not None else None)


NAMES = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def assert_all_close(got, want, dtype=None, **tol):
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, dtype, **tol, what=name)


# ---- kernel vs materialized logits --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_kernel_matches_reference_fp32(device):
    for inp in sample_inputs(device, torch.float32):
        k = forward_backward(**inp, impl="kernel")
        r = forward_backward(**inp, impl="reference")
        assert_all_close(k, r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_inputs_kernel_matches_reference(device):
    for inp in sample_inputs(device, torch.float64):
        k = forward_backward(**inp, impl="kernel")
        r = forward_backward(**inp, impl="reference")
        assert_all_close(k, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 20, None])  # N = 13
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_token_logprobs_of_linear(device, chunk_size, bias, temperature):
    """lp, entropy and all gradients equal those of token_logprobs(hidden @ W.T + b) in fp64."""
    inp = make_inputs((13,), 10, 45, bias=bias, device=device, seed=chunk_size or 0)
    k = forward_backward(**inp, chunk_size=chunk_size, temperature=temperature, impl="kernel")

    h = inp["hidden"].clone().requires_grad_()
    W = inp["weight"].clone().requires_grad_()
    b = inp["bias"].clone().requires_grad_() if bias else None
    logits = h @ W.T + (b if bias else 0.0)
    lp, ent = token_logprobs(logits, inp["tokens"], temperature=temperature, return_entropy=True, impl="kernel")
    g = torch.Generator().manual_seed(7)
    u = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)
    w = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)
    (u * lp + w * ent).sum().backward()
    want = (lp.detach(), ent.detach(), h.grad, W.grad, b.grad if bias else None)
    assert_all_close(k, want)
    # and the fully materialized pure-torch reference
    assert_all_close(k, forward_backward(**inp, temperature=temperature, impl="reference"))


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunk_size_does_not_change_the_answer(chunk_size):
    """Rows are independent: every chunking gives the same answer (to fp64 rounding: the chunk
    matmuls have other shapes, so BLAS may round differently), run to run the same bits."""
    inp = make_inputs((9,), 6, 20, seed=3)
    k = forward_backward(**inp, chunk_size=chunk_size)
    one = forward_backward(**inp, chunk_size=9)
    assert_all_close(k, one)
    again = forward_backward(**inp, chunk_size=chunk_size)
    for name, a, b in zip(NAMES, k, again):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "case",
    ["plain", "large logits", "first vocab block -inf", "uneven chunks and blocks"],
)
def test_online_statistics_across_vocab_blocks(case):
    """The CPU kernel's tiles span at most ~2^20 logits, so 4096 tokens x V = 600 are split into
    vocab blocks of 224, 224, 152 (also with 3000-token chunks) and each token's
    log-sum-exp / entropy is merged across blocks; the max moves between blocks (large logits),
    and a block can hold nothing but -inf for every token."""
    inp = make_inputs((4096,), 4, 600, seed=11)
    chunk = 3000 if case == "uneven chunks and blocks" else 4096
    if case == "large logits":
        inp["weight"] = inp["weight"] * 40.0
    if case == "first vocab block -inf":
        inp["bias"][:256] = float("-inf")
        inp["tokens"] = inp["tokens"].clamp(min=256)
    k = forward_backward(**inp, chunk_size=chunk, temperature=0.7)
    r = forward_backward(**inp, temperature=0.7, impl="reference")
    # large logits: a token that holds all the mass (p = 1 to rounding) has a grad_hidden row that
    # vanishes by cancellation, rounding noise of the logits' scale (3e-12), not 0: the floor is
    # scaled by the whole tensor's magnitude, not the row's
    assert_all_close(k, r, **(dict(scale="tensor") if case == "large logits" else {}))


def test_logprob_only_gradient_across_vocab_blocks():
    """Only log-probs used: the entropy gradient reaches the kernel as None (no materialized
    zeros), its log-prob-only path, across blocks."""
    inp = make_inputs((4096,), 4, 600, seed=12)
    grads = []
    for impl in ("kernel", "reference"):
        h = inp["hidden"].clone().requires_grad_()
        W = inp["weight"].clone().requires_grad_()
        b = inp["bias"].clone().requires_grad_()
        lp = linear_token_logprobs(h, W, inp["tokens"], bias=b, temperature=1.3, impl=impl)
        (lp * torch.linspace(-1, 2, lp.numel(), dtype=lp.dtype)).sum().backward()
        grads.append((lp.detach(), h.grad, W.grad, b.grad))
    for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight", "grad_bias"), *grads):
        assert_close(a, b, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_hidden_size(dtype):
    """H = 0: the logits are the bias alone (the BLAS is never handed empty operands)."""
    inp = make_inputs((2, 3), 0, 7, dtype=dtype, seed=14)
    k = forward_backward(**inp, chunk_size=4)
    r = forward_backward(**inp, impl="reference")
    assert_all_close(k, r)
    assert_close(k[0], torch.log_softmax(inp["bias"], 0)[inp["tokens"]], what="logprobs")


def test_bitwise_identical_for_any_thread_count():
    """fp32 CPU kernel: the tile GEMMs run as fixed work units (micro-kernel strips, or panels of
    single-threaded BLAS calls), so 1 and 2 threads give the same bits (a multi-threaded BLAS
    rounded the narrow last vocab block differently); uneven chunks (700 + 700 + 100 tokens) and vocab blocks
    (1344 + 1344 + 312)."""
    inp = make_inputs((1500,), 64, 3000, dtype=torch.float32, seed=13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = (forward_backward(**inp, chunk_size=700) for _ in range(2))
        torch.set_num_threads(1)
        c = forward_backward(**inp, chunk_size=700)
    finally:
        torch.set_num_threads(before)
    for other in (b, c):
        for name, x, y in zip(NAMES, a, other):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("H,chunk_size", [(100, 300), (100, 700), (64, None), (17, 45), (1, 14), (40, 31)])
def test_fp32_kernel_vs_fp64_reference_uneven_shapes(H, chunk_size):
    """fp32 on the CPU runs the AVX-512 micro-kernel where the build has it (packed strips of 14
    vocab rows / tokens x 32 tokens / hidden columns): hidden sizes and chunks that are not
    multiples of the strips, vocab blocks with partial strips, several blocks accumulating into a
    partial 32-column strip of grad_hidden (H = 100, chunks of 700: blocks 1344 + 1344 + 313), and
    chunks under 32 tokens (the BLAS path; chunk 31, then the 2-token tail), vs the fp64 reference."""
    inp = make_inputs((777,), H, 3001, dtype=torch.float32, seed=21)
    k = forward_backward(**inp, chunk_size=chunk_size, temperature=0.9)
    r = forward_backward(**{n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                            for n, v in inp.items()}, temperature=0.9, impl="reference")
    for name, a, b in zip(NAMES, k, r):
        scale = max(1.0, b.abs().max().item()) if name in ("logprobs", "entropy") else b.abs().max().item()
        assert_close(a, b, torch.float32, rtol=1e-5, atol=2e-5 * scale, what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims(device):
    inp = make_inputs((2, 3, 4), 5, 19, device=device, seed=4)
    k = forward_backward(**inp, chunk_size=5)
    assert k[0].shape == (2, 3, 4) and k[1].shape == (2, 3, 4) and k[2].shape == (2, 3, 4, 5)
    flat = dict(inp, hidden=inp["hidden"].reshape(-1, 5), tokens=inp["tokens"].reshape(-1))
    r = forward_backward(**inp, impl="reference")
    assert_all_close(k, r)
    kf = forward_backward(**flat, chunk_size=5)
    assert torch.equal(kf[0], k[0].reshape(-1))


def test_only_logprobs_used():
    """return_entropy=False: the backward gets no entropy gradient (None) and stays right."""
    inp = make_inputs((6,), 4, 9, seed=5)
    grads = []
    for impl in ("kernel", "reference"):
        h = inp["hidden"].clone().requires_grad_()
        W = inp["weight"].clone().requires_grad_()
        b = inp["bias"].clone().requires_grad_()
        lp = linear_token_logprobs(h, W, inp["tokens"], bias=b, chunk_size=4, impl=impl)
        assert isinstance(lp, torch.Tensor) and lp.shape == (6,)
        lp.sum().backward()
        grads.append((lp.detach(), h.grad, W.grad, b.grad))
    for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight", "grad_bias"), *grads):
        assert_close(a, b, what=name)


# ---- gradcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias,chunk_size,temperature", [(True, 2, 1.0), (False, 1, 0.8), (True, 10, 1.3)])
def test_gradcheck_fp64(bias, chunk_size, temperature):
    inp = make_inputs((5,), 4, 7, bias=bias, seed=chunk_size)
    args = [inp["hidden"].requires_grad_(), inp["weight"].requires_grad_()]
    if bias:
        args.append(inp["bias"].requires_grad_())

    def f(h, W, b=None):
        return linear_token_logprobs(h, W, inp["tokens"], bias=b, temperature=temperature, return_entropy=True,
                                     chunk_size=chunk_size, impl="kernel")

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


# ---- low precision ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_low_precision_vs_fp64_reference(device, dtype, chunk_size):
    """16-bit hidden / weight / bias vs the fp64 reference on the same (rounded) inputs.
    Tolerances: the logits themselves come out of a 16-bit matmul (one rounding of |logit| <~ 4:
    bf16 1.6e-2, fp16 2e-3), and log-probs / entropy inherit that error: atol 6e-2 (bf16),
    8e-3 (fp16), 1e-5 (fp32). Gradients are stored in the input dtype and grad_hidden comes out
    of a 16-bit matmul of 16-bit dlogits: checked against max|grad| (atol = tol * max|ref|)
    with tol 3e-2 (bf16), 4e-3 (fp16), 1e-5 (fp32)."""
    inp = make_inputs((3, 7), 32, 300, dtype=dtype, device=device, seed=9)
    k = forward_backward(**inp, chunk_size=chunk_size, impl="kernel")
    r = forward_backward(**{n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                            for n, v in inp.items()}, impl="reference")
    assert k[0].dtype == torch.float32 and k[1].dtype == torch.float32
    assert k[2].dtype == k[3].dtype == k[4].dtype == dtype
    out_tol = {torch.bfloat16: 6e-2, torch.float16: 8e-3, torch.float32: 1e-5}[dtype]
    grad_tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-5}[dtype]
    assert_close(k[0], r[0], torch.float32, rtol=out_tol, atol=out_tol, what="logprobs")
    assert_close(k[1], r[1], torch.float32, rtol=out_tol, atol=out_tol, what="entropy")
    for name, a, b in zip(NAMES[2:], k[2:], r[2:]):
        scale = b.abs().max().item()
        assert_close(a, b, dtype, rtol=grad_tol, atol=grad_tol * scale, what=name)


def test_bf16_kernel_close_to_bf16_reference():
    """Against the reference in the same dtype (bf16 logits materialized, fp32 log-softmax)."""
    inp = make_inputs((16,), 32, 200, dtype=torch.bfloat16, seed=2)
    k = forward_backward(**inp, chunk_size=5)
    r = forward_backward(**inp, impl="reference")
    assert_close(k[0], r[0], torch.float32, rtol=1e-5, atol=1e-4, what="logprobs")
    assert_close(k[1], r[1], torch.float32, rtol=1e-5, atol=1e-4, what="entropy")
    for name, a, b in zip(NAMES[2:], k[2:], r[2:]):
        assert_close(a, b, torch.bfloat16, rtol=2e-2, atol=2e-2 * b.abs().max().item(), what=name)


# ---- memory: the [N, V] logits are never materialized -------------------------------------


def test_peak_allocation_is_a_chunk_not_the_logits():
    N, H, V, chunk = 256, 8, 1000, 16
    inp = make_inputs((N,), H, V, dtype=torch.float32, seed=1)

    def allocations(**kw):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            forward_backward(**inp, **kw)
        return [e.nbytes() for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]" and e.nbytes() > 0]

    full = 4 * N * V
    kernel = allocations(chunk_size=chunk)
    assert max(kernel) <= 4 * chunk * V, f"largest allocation {max(kernel)} bytes > one fp32 chunk of logits"
    assert max(allocations(impl="reference")) >= full  # the detector sees materialized logits


# ---- out-of-range tokens and bad input ----------------------------------------------------


@pytest.mark.parametrize("bad", ["V", -1])
def test_out_of_range_tokens_raise(bad):
    inp = make_inputs((6,), 4, 9)
    inp["tokens"][4] = 9 if bad == "V" else -1
    with pytest.raises(RuntimeError, match=r"\[0, V\)"):
        linear_token_logprobs(inp["hidden"], inp["weight"], inp["tokens"], bias=inp["bias"], chunk_size=2)


def _args():
    return make_inputs((2, 3), 4, 9, dtype=torch.float32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda h, W, t, b: linear_token_logprobs(h, W[:, :3], t), ValueError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h, W.T, t), ValueError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h, W[0], t), ValueError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h, W.double(), t), TypeError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h.bfloat16(), W, t), TypeError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h, W.to("meta"), t), ValueError, "weight"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, bias=b[:5]), ValueError, "bias"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, bias=b[None]), ValueError, "bias"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, bias=b.double()), TypeError, "bias"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, chunk_size=-3), ValueError, "chunk_size"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, chunk_size=2.5), ValueError, "chunk_size"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, chunk_size=True), ValueError, "chunk_size"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t[:, :2]), ValueError, "tokens"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t.reshape(-1)), ValueError, "tokens"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t.float()), TypeError, "tokens"),
        (lambda h, W, t, b: linear_token_logprobs(h.long(), W, t), TypeError, "hidden"),
        (lambda h, W, t, b: linear_token_logprobs(h[0, 0, 0], W, t), ValueError, "hidden"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, temperature=0.0), ValueError, "temperature"),
        (lambda h, W, t, b: linear_token_logprobs(h, W, t, impl="fused"), ValueError, "impl"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    inp = _args()
    with pytest.raises(exc, match=match):
        call(inp["hidden"], inp["weight"], inp["tokens"], inp["bias"])


def test_kernel_op_rejects_bad_tensors_directly():
    inp = make_inputs((4,), 3, 5)
    h, W, t, b = inp["hidden"], inp["weight"], inp["tokens"], inp["bias"]
    op = torch.ops.fastrlhf.linear_token_logprobs.default
    with pytest.raises(RuntimeError, match="chunk_size"):
        op(h, W, t, b, 1.0, -1)
    with pytest.raises(RuntimeError, match="temperature"):
        op(h, W, t, b, 0.0, 2)
    with pytest.raises(RuntimeError, match="weight"):
        op(h, W[:, :2], t, b, 1.0, 2)
    with pytest.raises(RuntimeError, match="weight"):
        op(h, W.float(), t, b, 1.0, 2)
    with pytest.raises(RuntimeError, match="bias"):
        op(h, W, t, b[:4], 1.0, 2)
    with pytest.raises(RuntimeError, match="tokens"):
        op(h, W, t[:3], b, 1.0, 2)
    with pytest.raises(RuntimeError, match="hidden"):
        op(h[None], W, t, b, 1.0, 2)


# ---- opcheck and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_linear_token_logprobs(device):
    for inp in sample_inputs(device, torch.float64):
        H = inp["hidden"].shape[-1]
        b = inp["bias"].requires_grad_() if inp["bias"] is not None else None
        args = (inp["hidden"].reshape(-1, H).requires_grad_(), inp["weight"].requires_grad_(),
                inp["tokens"].reshape(-1), b, inp["temperature"], inp["chunk_size"] or 3)
        torch.library.opcheck(torch.ops.fastrlhf.linear_token_logprobs.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(hidden, weight, bias, tokens):
        lp, ent = linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=0.9, return_entropy=True,
                                        chunk_size=4)
        return -(lp.mean()) - 0.01 * ent.mean(), lp

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inp = make_inputs((2, 5), 6, 23, dtype=torch.float32, device=device, seed=12)
    results = []
    for fn in (compiled, f):
        h = inp["hidden"].clone().requires_grad_()
        W = inp["weight"].clone().requires_grad_()
        b = inp["bias"].clone().requires_grad_()
        loss, lp = fn(h, W, b, inp["tokens"])
        loss.backward()
        results.append((loss.detach(), lp.detach(), h.grad, W.grad, b.grad))
    for name, a, b in zip(("loss", "logprobs", "grad_hidden", "grad_weight", "grad_bias"), *results):
        assert a is not None and torch.equal(a, b), name


# ---- module face --------------------------------------------------------------------------


def test_module_face():
    torch.manual_seed(0)
    m = LinearTokenLogprobs(6, 17, bias=True, temperature=0.8, return_entropy=True, chunk_size=3)
    assert isinstance(m, torch.nn.Module)
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    assert m.weight.shape == (17, 6) and m.bias.shape == (17,)
    r = repr(m)
    assert "hidden_size=6" in r and "vocab_size=17" in r and "bias=True" in r and "temperature=0.8" in r
    # the parameters are nn.Linear's: a Linear state dict loads as is
    lin = torch.nn.Linear(6, 17)
    m.load_state_dict(lin.state_dict())
    hidden = torch.randn(2, 4, 6)
    tokens = torch.randint(0, 17, (2, 4))
    lp, ent = m(hidden, tokens)
    want_lp, want_ent = token_logprobs(lin(hidden), tokens, temperature=0.8, return_entropy=True, impl="reference")
    assert_close(lp, want_lp)
    assert_close(ent, want_ent)
    (lp.sum() + ent.sum()).backward()
    assert m.weight.grad is not None and m.bias.grad is not None and m.weight.grad.abs().sum() > 0
    plain = LinearTokenLogprobs(6, 17)
    assert plain.bias is None and "bias=False" in repr(plain)
    assert isinstance(plain(hidden, tokens), torch.Tensor)
