"""fastrlhf.ops.attention / decode_attention: the CPU kernel against the reference in fp64 (values
and gradients of q, k, v) over tile boundaries (32 query rows, 64 keys), head dims, GQA,
key_lengths / key_start, causal alignment and batch sizes; the packed varlen layout (against the
reference and against the padded call on the same data); gradcheck; low precision against an
fp64 oracle; decode_attention token by token and in chunks against attention over the whole
sequence; drop-in equality with F.scaled_dot_product_attention; opcheck and torch.compile;
determinism; bad input.

CUDA (skipped without a GPU and a CUDA build): the CUDA-core path (fp64, every layout) against
the reference at fp64 tolerance; the tensor-core path (bf16 / fp16, D = 64 / 128, T not a
multiple of the 64-row tiles, causal and not, GQA, key ranges, varlen with empty sequences)
against the fp64 reference with tolerances for the P / dS rounding; split-KV decode on long caches
(several splits) and token by token against full attention; NaN padding never read; bitwise
determinism; gradcheck and opcheck."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastrlhf.ops import attention, decode_attention, reference

from helpers import DEVICES, LOW_PRECISION, TOLERANCES, assert_as_accurate_as, assert_close, runs_at_thread_counts

F64 = torch.float64
CUDA_MARKS = DEVICES[1].marks  # skip without a GPU / CUDA build

CUDA_ONLY = [p for p in DEVICES if p != "cpu"]

# (device, impl) for tests about the path a call takes: the CPU kernel, the reference on the CPU,
# and the CUDA kernel (fp64 inputs: the CUDA-core path).
PATHS = [
    pytest.param("cpu", "kernel", id="cpu-kernel"),
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cuda", "kernel", id="cuda-kernel", marks=CUDA_MARKS),
]


# ---- helpers ------------------------------------------------------------------------------


def randn(*shape, seed, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(device, dtype)


def make_qkv(B, H, Hkv, Tq, Tk, D, *, dtype=F64, device="cpu", seed=0):
    """Padded q [B, H, Tq, D], k, v [B, Hkv, Tk, D] and an upstream gradient like q."""
    return (randn(B, H, Tq, D, seed=seed, dtype=dtype, device=device),
            randn(B, Hkv, Tk, D, seed=seed + 1, dtype=dtype, device=device),
            randn(B, Hkv, Tk, D, seed=seed + 2, dtype=dtype, device=device),
            randn(B, H, Tq, D, seed=seed + 3, dtype=dtype, device=device))


def fwd_bwd(q, k, v, grad, **kw):
    """(out, dq, dk, dv) of attention(q, k, v, **kw) for the upstream gradient ``grad``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), dq, dk, dv


def grad_scale(expected):
    """The magnitude assert_close scales its floor by for a gradient. Rows can vanish by
    cancellation: a query that sees a single key has P = 1 and dS = dP - rowsum(dO * O) = 0 to
    rounding, so its dq row (and the dk row of a key no other query sees) is rounding noise of the
    size of the inputs (N(0, 1) here) and of the other rows (1e-15 in fp64, 5e-7 in fp32), not 0;
    a whole tensor can vanish so (every batch row sees one key or none). Hence max(1, max|g|)."""
    return max(1.0, float(expected.abs().max())) if expected.numel() else 1.0


def assert_kernel_matches_reference(q, k, v, grad, what="", **kw):
    got = fwd_bwd(q, k, v, grad, impl="kernel", **kw)
    want = fwd_bwd(q, k, v, grad, impl="reference", **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == e.dtype
        assert_close(a, e, scale=None if name == "out" else grad_scale(e), what=f"{what} {name}")
    return got


def visible(Tq, Tk, causal, begin=0, end=None):
    """[Tq, Tk] bool: which keys query i sees, straight from the docstring."""
    end = Tk if end is None else end
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    m = ((j >= begin) & (j < end)).expand(Tq, Tk)
    if causal:
        m = m & (j <= i + (Tk - Tq))
    return m


def pack(x, lengths):
    """[B, H, T, D] right-padded -> packed [sum(lengths), H, D]."""
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def cu_seqlens_of(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64, device=device)


# ---- which implementation runs --------------------------------------------------------------


def test_cpu_runs_the_kernel(monkeypatch):
    """On the CPU, impl="kernel" and impl="auto" go through torch.ops.fastrlhf (never the
    reference); impl="reference" and FASTRLHF_FORCE_REFERENCE=1 go to the reference."""
    calls = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(reference, "attention", spy("attention", reference.attention))
    monkeypatch.setattr(reference, "decode_attention", spy("decode", reference.decode_attention))
    q, k, v, _ = make_qkv(2, 4, 2, 5, 7, 8)
    q.requires_grad_()
    cu = torch.tensor([0, 3, 7])
    qv, kv = randn(7, 4, 8, seed=1).requires_grad_(), randn(7, 2, 8, seed=2)
    for impl in ("kernel", "auto"):
        out = attention(q, k, v, key_lengths=torch.tensor([7, 3]), impl=impl)
        assert "fastrlhf_attention" in type(out.grad_fn).__name__
        outv = attention(qv, kv, kv, cu_seqlens=cu, impl=impl)
        assert "fastrlhf_attention" in type(outv.grad_fn).__name__
        decode_attention(q.detach(), k, v, torch.tensor([5, 6]), impl=impl)
    assert calls == []
    attention(q, k, v, impl="reference")
    decode_attention(q.detach(), k, v, torch.tensor([5, 6]), impl="reference")
    assert calls == ["attention", "decode"]
    monkeypatch.setenv("FASTRLHF_FORCE_REFERENCE", "1")
    attention(q, k, v, impl="kernel")
    assert calls == ["attention", "decode", "attention"]


def test_kernel_impl_raises_where_there_is_no_kernel():
    q, k, v, _ = make_qkv(1, 2, 1, 3, 3, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='kernel'"):
        attention(q.to("meta"), k.to("meta"), v.to("meta"), impl="kernel")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_runs_the_kernel(device, monkeypatch):
    """On CUDA, impl="auto" and impl="kernel" go through torch.ops.fastrlhf for every dtype (never
    the reference), and agree with the CPU kernel in fp64 (values and gradients)."""
    calls = []
    monkeypatch.setattr(reference, "attention", lambda *a, **kw: calls.append("attention"))
    monkeypatch.setattr(reference, "decode_attention", lambda *a, **kw: calls.append("decode"))
    for dtype in (F64, torch.float32, torch.bfloat16, torch.float16):
        q, k, v, _ = make_qkv(2, 4, 2, 9, 12, 64, dtype=dtype, device=device)
        lens = torch.tensor([9, 12], device=device)
        for impl in ("auto", "kernel"):
            out = attention(q.requires_grad_(), k, v, key_lengths=lens, impl=impl)
            assert "fastrlhf_attention" in type(out.grad_fn).__name__
            q = q.detach()
            decode_attention(q, k, v, lens, impl=impl)
    assert calls == []
    monkeypatch.undo()
    q, k, v, g = make_qkv(2, 4, 2, 9, 12, 8, device=device)
    kw = dict(causal=True, key_lengths=torch.tensor([12, 5]))
    got = fwd_bwd(q, k, v, g, impl="kernel", key_lengths=kw["key_lengths"].to(device), causal=True)
    cpu = fwd_bwd(q.cpu(), k.cpu(), v.cpu(), g.cpu(), impl="kernel", **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, cpu):
        assert a.device.type == "cuda"
        assert_close(a, e, scale=None if name == "out" else grad_scale(e), what=name)


# ---- padded layout: kernel vs reference in fp64 --------------------------------------------


TILE_SHAPES = [(1, 1), (31, 31), (33, 33), (65, 65), (97, 97), (130, 130),
               (1, 130), (31, 97), (33, 65), (65, 130), (97, 130), (1, 64), (32, 64)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", TILE_SHAPES)
def test_padded_tiles_kernel_matches_reference(causal, Tq, Tk):
    """T = 1 and T not a multiple of the 32-row / 64-key tiles; Tq == Tk and Tq < Tk (causal:
    the newest queries are last, j <= i + Tk - Tq)."""
    q, k, v, g = make_qkv(2, 4, 2, Tq, Tk, 8, seed=Tq * 7 + Tk)
    out, *_ = assert_kernel_matches_reference(q, k, v, g, causal=causal)
    if causal:  # the last query sees every key: it must not depend on the causal flag
        full = attention(q, k, v, causal=False, impl="kernel")
        assert_close(out[:, :, -1], full[:, :, -1], what="last causal row vs non-causal")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [1, 8, 64, 128, 256])
def test_padded_head_dims_kernel_matches_reference(causal, D):
    q, k, v, g = make_qkv(1, 2, 1, 33, 70, D, seed=D)
    assert_kernel_matches_reference(q, k, v, g, causal=causal, key_lengths=torch.tensor([67]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [8, 2, 1])
def test_gqa_kernel_matches_reference_and_repeated_kv(causal, Hkv):
    """H = 8 query heads over Hkv kv heads: equals the reference, and equals MHA on k/v repeated
    with repeat_interleave (head h reads kv head h // (H // Hkv)); dK/dV are the group sums."""
    H, group = 8, 8 // Hkv
    q, k, v, g = make_qkv(2, H, Hkv, 40, 70, 16, seed=Hkv)
    kw = dict(causal=causal, key_lengths=torch.tensor([70, 45]), key_start=torch.tensor([0, 3]))
    out, dq, dk, dv = assert_kernel_matches_reference(q, k, v, g, **kw)
    r_out, r_dq, r_dk, r_dv = fwd_bwd(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), g,
                                      impl="kernel", **kw)
    assert_close(out, r_out, what="out vs repeated kv")
    assert_close(dq, r_dq, what="dq vs repeated kv")
    assert_close(dk, r_dk.view(2, Hkv, group, 70, 16).sum(2), what="dk vs group sum")
    assert_close(dv, r_dv.view(2, Hkv, group, 70, 16).sum(2), what="dv vs group sum")


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_batch_sizes_kernel_matches_reference(B, causal):
    q, k, v, g = make_qkv(B, 4, 2, 33, 97, 8, seed=B)
    lengths = torch.tensor([97, 64, 1][:B])
    starts = torch.tensor([0, 10, 0][:B])
    assert_kernel_matches_reference(q, k, v, g, causal=causal)
    assert_kernel_matches_reference(q, k, v, g, causal=causal, key_lengths=lengths, key_start=starts)


KEY_RANGE_CASES = {
    # name: (key_lengths, key_start) for B = 5, Tk = 70
    "lengths": ([70, 0, 33, 1, 65], None),
    "start": (None, [0, 70, 5, 64, 69]),
    "both": ([70, 40, 64, 10, 66], [0, 37, 1, 10, 65]),
    "both_empty": ([70, 3, 0, 70, 20], [69, 3, 0, 70, 30]),  # start >= length: nothing visible
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [1, 33, 70])
@pytest.mark.parametrize("case", list(KEY_RANGE_CASES))
def test_key_lengths_and_key_start(case, Tq, causal):
    """Right padding (key_lengths, incl. 0 and Tk), left padding (key_start, incl. Tk) and both,
    with and without causal: kernel == reference; rows with no visible key output exactly 0 with
    dq = 0; keys outside [key_start, key_lengths) get dk = dv = 0."""
    B, Tk = 5, 70
    lengths, starts = KEY_RANGE_CASES[case]
    kl = torch.tensor(lengths) if lengths is not None else None
    ks = torch.tensor(starts) if starts is not None else None
    q, k, v, g = make_qkv(B, 4, 2, Tq, Tk, 8, seed=Tq)
    out, dq, dk, dv = assert_kernel_matches_reference(q, k, v, g, causal=causal, key_lengths=kl, key_start=ks)
    n_empty_rows = 0
    for b in range(B):
        begin = 0 if ks is None else int(ks[b])
        end = Tk if kl is None else int(kl[b])
        vis = visible(Tq, Tk, causal, begin, end)
        empty_rows = ~vis.any(1)
        n_empty_rows += int(empty_rows.sum())
        assert (out[b][:, empty_rows] == 0).all() and (dq[b][:, empty_rows] == 0).all()
        assert torch.isfinite(out[b]).all()
        unseen_keys = ~vis.any(0)
        assert (dk[b][:, unseen_keys] == 0).all() and (dv[b][:, unseen_keys] == 0).all()
        assert (dv[b][:, ~unseen_keys].abs().sum(-1) > 0).all()
    assert n_empty_rows > 0  # every case exercises rows that see no key


@pytest.mark.parametrize("causal", [True, False])
def test_tq_longer_than_tk(causal):
    """Tq > Tk: causal query i sees j <= i - (Tq - Tk), so the first Tq - Tk rows see nothing."""
    q, k, v, g = make_qkv(2, 4, 2, 70, 5, 8, seed=11)
    out, dq, _, _ = assert_kernel_matches_reference(q, k, v, g, causal=causal)
    if causal:
        assert (out[:, :, :65] == 0).all() and (dq[:, :, :65] == 0).all()
        assert (out[:, :, 65:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("Tq,Tk", [(0, 5), (3, 0)])
def test_empty_sequences_padded(Tq, Tk):
    q, k, v, g = make_qkv(2, 4, 2, Tq, Tk, 8)
    out, dq, dk, dv = fwd_bwd(q, k, v, g, impl="kernel")
    assert out.shape == q.shape and dk.shape == k.shape
    assert (out == 0).all() and (dq == 0).all()


def test_scale():
    q, k, v, g = make_qkv(2, 4, 2, 33, 70, 16, seed=5)
    for scale in (0.37, 1.0, 0.0, -0.2):
        assert_kernel_matches_reference(q, k, v, g, causal=True, scale=scale, what=f"scale={scale}")
    assert torch.equal(attention(q, k, v), attention(q, k, v, scale=16**-0.5))
    # scale 0: every visible key weighs the same -> the mean of the visible values
    out = attention(q, k, v, causal=False, scale=0.0, impl="kernel")
    assert_close(out, v.repeat_interleave(2, 1).mean(2, keepdim=True).expand_as(out))


def test_noncontiguous_inputs():
    """q, k, v as [B, T, H, D].transpose(1, 2) views (the usual projection layout)."""
    q, k, v, g = make_qkv(2, 4, 2, 33, 70, 8, seed=3)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    kw = dict(causal=True, key_lengths=torch.tensor([70, 50]))
    for a, e in zip(fwd_bwd(qt, kt, vt, g.transpose(1, 2).contiguous().transpose(1, 2), impl="kernel", **kw),
                    fwd_bwd(q, k, v, g, impl="kernel", **kw)):
        assert torch.equal(a, e)


def test_large_logits_stay_finite():
    """Scores of several hundred in fp32: the online softmax must not overflow."""
    q, k, v, g = make_qkv(2, 4, 2, 70, 70, 16, dtype=torch.float32, seed=9)
    q, k = q * 8, k * 8
    out, dq, dk, dv = fwd_bwd(q, k, v, g, causal=True, impl="kernel")
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    want = fwd_bwd(q.double(), k.double(), v.double(), g.double(), causal=True, impl="reference")
    assert_close(out, want[0], F64, rtol=1e-3, atol=1e-3, what="out")


@pytest.mark.parametrize("device,impl", PATHS)
def test_masked_keys_are_not_read_padded(device, impl):
    """Keys/values outside [key_start, key_lengths) are padding: NaN there must not reach the
    output or the gradients (left/right-padded batches hold garbage in the padding)."""
    q, k, v, g = make_qkv(3, 4, 2, 33, 70, 8, seed=21, device=device)
    kl = torch.tensor([70, 40, 66], device=device)
    ks = torch.tensor([0, 5, 64], device=device)
    kw = dict(causal=True, key_lengths=kl, key_start=ks, impl=impl)
    clean = fwd_bwd(q, k, v, g, **kw)
    pad = ~(torch.arange(70, device=device)[None, :] >= ks[:, None]) | (torch.arange(70, device=device)[None, :]
                                                                          >= kl[:, None])
    pad = pad[:, None, :, None]
    k_bad, v_bad = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    dirty = fwd_bwd(q, k_bad, v_bad, g, **kw)
    for name, a, e in zip(("out", "dq"), dirty[:2], clean[:2]):
        assert_close(a, e, what=f"{name} with NaN padding")
    for name, a, e in zip(("dk", "dv"), dirty[2:], clean[2:]):
        assert_close(a.masked_fill(pad, 0), e.masked_fill(pad, 0), what=f"{name} with NaN padding")


# ---- packed varlen ------------------------------------------------------------------------


VARLEN_CASES = [[70], [0, 5, 0, 65, 1, 0, 69], [1, 31, 33, 97], [130, 2]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 1])
@pytest.mark.parametrize("lengths", VARLEN_CASES, ids=str)
def test_varlen_kernel_matches_reference(lengths, Hkv, causal):
    total = sum(lengths)
    q, k, v, g = (randn(total, h, 16, seed=i) for i, h in enumerate((4, Hkv, Hkv, 4)))
    cu = cu_seqlens_of(lengths)
    assert_kernel_matches_reference(q, k, v, g, causal=causal, cu_seqlens=cu)
    # int32 cu_seqlens and max_seqlen (accepted, unused) give the same result
    a = attention(q, k, v, causal=causal, cu_seqlens=cu.int(), max_seqlen=max(lengths) + 3, impl="kernel")
    assert torch.equal(a, attention(q, k, v, causal=causal, cu_seqlens=cu, impl="kernel"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_varlen_equals_padded(causal, Hkv):
    """Packing right-padded sequences of different lengths (0 included) and calling the varlen
    layout gives the padded call's values and gradients on the valid rows."""
    lengths = [70, 0, 33, 1, 64]
    B, T, H, D = len(lengths), max(lengths), 4, 16
    q, k, v, g = make_qkv(B, H, Hkv, T, T, D, seed=31)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    g = g * valid[:, None, :, None]  # padded query rows carry no gradient
    out, dq, dk, dv = fwd_bwd(q, k, v, g, causal=causal, key_lengths=torch.tensor(lengths), impl="kernel")
    vout, vdq, vdk, vdv = fwd_bwd(pack(q, lengths), pack(k, lengths), pack(v, lengths), pack(g, lengths),
                                  causal=causal, cu_seqlens=cu_seqlens_of(lengths), impl="kernel")
    assert_close(vout, pack(out, lengths), what="out")
    assert_close(vdq, pack(dq, lengths), scale=grad_scale(pack(dq, lengths)), what="dq")
    assert_close(vdk, pack(dk, lengths), scale=grad_scale(pack(dk, lengths)), what="dk")
    assert_close(vdv, pack(dv, lengths), scale=grad_scale(pack(dv, lengths)), what="dv")
    # padded keys got no gradient in the padded call
    assert (dk.transpose(1, 2)[~valid] == 0).all() and (dv.transpose(1, 2)[~valid] == 0).all()


def test_varlen_only_empty_sequences():
    for lengths in ([0], [0, 0, 0], []):
        q, k, v, g = (randn(0, h, 8, seed=i) for i, h in enumerate((4, 2, 2, 4)))
        out, dq, dk, dv = fwd_bwd(q, k, v, g, cu_seqlens=cu_seqlens_of(lengths), impl="kernel")
        assert out.shape == (0, 4, 8) and dq.shape == (0, 4, 8) and dk.shape == (0, 2, 8)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_empty_batch_padded(impl):
    """B = 0 gives an empty output and empty gradients."""
    q, k, v, g = make_qkv(0, 4, 2, 3, 5, 8)
    out, dq, dk, dv = fwd_bwd(q, k, v, g, impl=impl)
    assert out.shape == (0, 4, 3, 8) and dq.shape == (0, 4, 3, 8) and dk.shape == (0, 2, 5, 8)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_empty_batch_varlen_is_differentiable(impl):
    """total = 0 tokens: the output still hangs off q, k, v in the autograd graph, as any torch
    op's output does, so a training step over an empty pack does not crash in backward."""
    q, k, v, g = (randn(0, h, 8, seed=i).requires_grad_() for i, h in enumerate((4, 2, 2, 4)))
    out = attention(q, k, v, cu_seqlens=torch.tensor([0]), impl=impl)
    assert out.shape == (0, 4, 8)
    assert out.requires_grad
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---- gradcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True, key_lengths=torch.tensor([5, 0])),
        dict(causal=True, key_lengths=torch.tensor([4, 5]), key_start=torch.tensor([1, 3])),
        dict(causal=False, key_lengths=torch.tensor([2, 5])),
    ],
    ids=["causal-lengths", "causal-lengths-start", "lengths"],
)
def test_gradcheck_padded(kw):
    """fp64 gradcheck on small shapes: GQA (H = 2 over Hkv = 1), Tq = 3 < Tk = 5."""
    q, k, v, _ = make_qkv(2, 2, 1, 3, 5, 2, seed=41)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, impl="kernel", **kw), (q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_varlen(causal):
    cu = torch.tensor([0, 3, 3, 6, 7])
    q, k, v = randn(7, 2, 2, seed=1), randn(7, 1, 2, seed=2), randn(7, 1, 2, seed=3)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, causal=causal, cu_seqlens=cu, impl="kernel"), (q, k, v))


# ---- low precision ------------------------------------------------------------------------

# Outputs carry one rounding to the storage dtype on top of fp32 accumulation: |error| <=
# half an ulp (<= 2^-8 |x| for bf16, 2^-11 |x| for fp16) plus the accumulation error (< 2e-6 here).
OUT_TOL = {
    torch.float32: TOLERANCES[torch.float32],
    torch.bfloat16: dict(rtol=2.0**-8, atol=2e-5),
    torch.float16: dict(rtol=2.0**-11, atol=2e-5),
}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_low_precision_vs_fp64_reference(dtype, layout):
    """Kernel in fp32 / bf16 / fp16 against the fp64 reference on the same, already rounded,
    inputs. Gradients: the TOLERANCES table (the backward reads the rounded output)."""
    if layout == "padded":
        q, k, v, g = make_qkv(2, 4, 2, 70, 97, 64, dtype=dtype, seed=51)
        kw = dict(causal=True, key_lengths=torch.tensor([97, 60]), key_start=torch.tensor([0, 7]))
    else:
        lengths = [70, 0, 33]
        q, k, v, g = (randn(103, h, 64, seed=i, dtype=dtype) for i, h in enumerate((4, 2, 2, 4)))
        kw = dict(causal=True, cu_seqlens=cu_seqlens_of(lengths))
    got = fwd_bwd(q, k, v, g, impl="kernel", **kw)
    want = fwd_bwd(q.double(), k.double(), v.double(), g.double(), impl="reference", **kw)
    for t in got:
        assert t.dtype == dtype
    assert_close(got[0], want[0], dtype, **OUT_TOL[dtype], what="out")
    for name, a, e in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert_close(a, e, dtype, scale=grad_scale(e), what=name)


# ---- decode_attention ---------------------------------------------------------------------


def _decode_sequence(q, k, v, starts, chunks, Tmax, *, garbage=float("nan"), impl="auto"):
    """Run decode_attention over rows that start at positions ``starts`` (their prefixes already
    in the cache) and advance by the sizes in ``chunks``; the caches (on q's device) start filled
    with garbage and get each new token written just before it is decoded. Returns per-row
    outputs for the positions decoded, as a list over rows of [H, n, D]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    k_cache = torch.full((B, Hkv, Tmax, D), garbage, dtype=q.dtype, device=q.device)
    v_cache = torch.full((B, Hkv, Tmax, D), garbage, dtype=q.dtype, device=q.device)
    for b, s in enumerate(starts):
        k_cache[b, :, :s], v_cache[b, :, :s] = k[b, :, :s], v[b, :, :s]
    pos = list(starts)
    outs = [[] for _ in range(B)]
    for n in chunks:
        qs = torch.stack([q[b, :, p:p + n] for b, p in enumerate(pos)])
        for b, p in enumerate(pos):
            k_cache[b, :, p:p + n], v_cache[b, :, p:p + n] = k[b, :, p:p + n], v[b, :, p:p + n]
        lens = torch.tensor([p + n for p in pos], device=q.device)
        o = decode_attention(qs, k_cache, v_cache, lens, impl=impl)
        assert o.shape == qs.shape and o.dtype == q.dtype
        for b in range(B):
            outs[b].append(o[b])
        pos = [p + n for p in pos]
    return [torch.cat(o, 1) for o in outs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Hkv", [4, 1])
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_token_by_token_matches_full_attention(Hkv, chunk, device):
    """Decoding a 70-token sequence token by token (or a 4-token prefill then chunks of 3)
    through decode_attention equals causal attention over the whole sequence within 1e-5 (fp32).
    The caches beyond cache_seqlens hold NaN the whole time."""
    B, H, T, D = 2, 4, 70, 16
    q, k, v, _ = make_qkv(B, H, Hkv, T, T, D, dtype=torch.float32, seed=61 + chunk, device=device)
    full = attention(q, k, v, causal=True)
    chunks = [1] * T if chunk == 1 else [4] + [3] * 22
    dec = _decode_sequence(q, k, v, [0] * B, chunks, Tmax=T + 6)
    for b in range(B):
        assert_close(dec[b], full[b], rtol=0.0, atol=1e-5, what=f"row {b}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_rows_at_different_positions(chunk, device):
    """Rows with different cache lengths (different prompt lengths) decoded together, GQA."""
    B, H, Hkv, T, D = 3, 8, 2, 100, 16
    q, k, v, _ = make_qkv(B, H, Hkv, T, T, D, dtype=torch.float32, seed=71, device=device)
    full = attention(q, k, v, causal=True)
    starts = [0, 17, 61]
    steps = 36 // chunk
    dec = _decode_sequence(q, k, v, starts, [chunk] * steps, Tmax=T + 1)
    for b, s in enumerate(starts):
        assert_close(dec[b], full[b, :, s:s + chunk * steps], rtol=0.0, atol=1e-5, what=f"row {b}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Tq", [1, 3, 33])
@pytest.mark.parametrize("Hkv,D", [(4, 16), (2, 16), (1, 16), (2, 1), (1, 256)])
def test_decode_kernel_matches_reference(Tq, Hkv, D, device):
    """fp64, per-row cache lengths from Tq (only the new tokens) to Tmax (several 64-key tiles);
    GQA groups of 1, 2 and 4 query heads; the cache beyond each row's length holds large finite
    garbage. (On CUDA, Tq = 33 > 16 takes the forward kernel instead of split-KV decode.)"""
    B, H, Tmax = 3, 4, 100
    q = randn(B, H, Tq, D, seed=81, device=device)
    k, v = randn(B, Hkv, Tmax, D, seed=82, device=device), randn(B, Hkv, Tmax, D, seed=83, device=device)
    lens = torch.tensor([Tq, Tq + 40, Tmax], device=device)
    beyond = (torch.arange(Tmax, device=device)[None, :] >= lens[:, None])[:, None, :, None]
    k, v = k.masked_fill(beyond, 1e3), v.masked_fill(beyond, -1e3)
    got = decode_attention(q, k, v, lens, impl="kernel")
    want = reference.decode_attention(q, k, v, lens)
    assert_close(got, want)
    assert_close(decode_attention(q, k, v, lens, scale=0.3, impl="kernel"),
                 decode_attention(q, k, v, lens, scale=0.3, impl="reference"), what="scale=0.3")
    # the same as padded attention with key_lengths, queries aligned to each row's end
    for b in range(B):
        n = int(lens[b])
        row = attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True, impl="kernel")
        assert_close(got[b:b + 1], row, what=f"row {b} vs attention")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256, 48])
@pytest.mark.parametrize("H,Hkv,Tq", [(4, 4, 1), (6, 2, 1), (8, 2, 1), (4, 1, 3), (3, 3, 2)])
def test_decode_fp32_head_dims(D, H, Hkv, Tq, device):
    """fp32 at the head dims with a register-blocked CPU path (32 ... 256; 48 takes the generic
    one): query rows per kv head odd and even (1, 3, 4, 12), several key tiles with a partial
    last one, causal new tokens, NaN in the cache beyond each row's length."""
    B, Tmax = 3, 150
    q = randn(B, H, Tq, D, seed=84, device=device).float()
    k = randn(B, Hkv, Tmax, D, seed=85, device=device).float()
    v = randn(B, Hkv, Tmax, D, seed=86, device=device).float()
    lens = torch.tensor([Tq, 64 + Tq, Tmax - 1], device=device)
    beyond = (torch.arange(Tmax, device=device)[None, :] >= lens[:, None])[:, None, :, None]
    got = decode_attention(q, k.masked_fill(beyond, float("nan")), v.masked_fill(beyond, float("nan")), lens,
                           impl="kernel")
    want = reference.decode_attention(q.double(), k.double(), v.double(), lens)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=0.0, atol=2e-6)


@pytest.mark.parametrize("device,impl", PATHS)
def test_decode_ignores_cache_beyond_seqlens(device, impl):
    """Cache slots at and after cache_seqlens[b] are never read: NaN / Inf there (e.g. a cache
    from torch.empty) leaves the outputs unchanged."""
    B, H, Hkv, Tq, Tmax, D = 3, 4, 2, 2, 40, 8
    q = randn(B, H, Tq, D, seed=91, device=device)
    k, v = randn(B, Hkv, Tmax, D, seed=92, device=device), randn(B, Hkv, Tmax, D, seed=93, device=device)
    lens = torch.tensor([2, 17, 40], device=device)
    clean = decode_attention(q, k, v, lens, impl=impl)
    beyond = (torch.arange(Tmax, device=device)[None, :] >= lens[:, None])[:, None, :, None]
    for bad in (float("nan"), float("inf")):
        got = decode_attention(q, k.masked_fill(beyond, bad), v.masked_fill(beyond, bad), lens, impl=impl)
        assert_close(got, clean, what=f"cache padding = {bad}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision(dtype, device):
    """Decode accumulates in fp32 on both devices (no tensor-core rounding of P): only the
    output's rounding separates it from the fp64 reference."""
    q, k, v, _ = make_qkv(2, 4, 2, 3, 50, 32, dtype=dtype, seed=95, device=device)
    lens = torch.tensor([3, 44], device=device)
    got = decode_attention(q, k, v, lens, impl="kernel")
    want = reference.decode_attention(q.double(), k.double(), v.double(), lens)
    assert got.dtype == dtype
    assert_close(got, want, dtype, **OUT_TOL[dtype])


# ---- CUDA kernels ---------------------------------------------------------------------------
# csrc/kernels/cuda/attention.cu has two paths: tensor cores for bf16 / fp16 with D in {32, 64,
# 96, 128} (16-byte aligned rows, sm_80+), and warp-per-row CUDA-core kernels for everything else
# (fp64 below, compared at fp64 tolerance). decode_attention: split-KV for Tq <= 16, else the
# forward.


def _on(device, kw):
    """kw with its tensors moved to ``device``."""
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


CUDA_FP64_CASES = {
    # name: ((B, H, Hkv, Tq, Tk, D), kwargs)
    "causal": ((2, 4, 2, 70, 70, 8), dict(causal=True)),
    "noncausal-tq<tk": ((2, 4, 2, 33, 97, 16), dict(causal=False)),
    "causal-tq<tk-ranges": ((3, 4, 2, 33, 97, 16),
                            dict(causal=True, key_lengths=torch.tensor([97, 40, 0]),
                                 key_start=torch.tensor([0, 5, 0]))),
    "noncausal-ranges-empty": ((3, 4, 4, 20, 70, 32),
                               dict(causal=False, key_lengths=torch.tensor([70, 3, 20]),
                                    key_start=torch.tensor([69, 3, 30]))),
    "causal-tq>tk": ((2, 4, 1, 70, 5, 8), dict(causal=True)),
    "D=1": ((1, 2, 1, 33, 70, 1), dict(causal=True)),
    "D=64-mqa": ((2, 8, 1, 65, 65, 64), dict(causal=True, key_lengths=torch.tensor([65, 31]))),
    "D=256": ((1, 2, 1, 33, 70, 256), dict(causal=False, key_lengths=torch.tensor([67]))),
}


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("case", list(CUDA_FP64_CASES))
def test_cuda_fp64_padded_matches_reference(case, device):
    """The CUDA-core path in fp64 (values and gradients of q, k, v) against the reference."""
    shape, kw = CUDA_FP64_CASES[case]
    q, k, v, g = make_qkv(*shape, device=device, seed=len(case))
    assert_kernel_matches_reference(q, k, v, g, what=case, **_on(device, kw))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", VARLEN_CASES, ids=str)
def test_cuda_fp64_varlen_matches_reference(lengths, causal, device):
    total = sum(lengths)
    q, k, v, g = (randn(total, h, 16, seed=i, device=device) for i, h in enumerate((4, 2, 2, 4)))
    assert_kernel_matches_reference(q, k, v, g, causal=causal, cu_seqlens=cu_seqlens_of(lengths, device))


# Tensor-core path against the fp64 reference on the same (rounded) inputs. Besides the rounding
# of each output, P and dS are rounded to the storage dtype before their matmuls (as in
# FlashAttention-2): one relative rounding (2^-9 bf16, 2^-11 fp16) per product term, which
# averages out over the keys (queries for dK / dV). For D = 32..128, T = 300: |out| ~ 0.1 with
# an expected error ~ 2e-4 (bf16) from P, hence atol well above that and rtol a few output ulps.
TC_TOL = {
    torch.bfloat16: dict(out=dict(rtol=1e-2, atol=2e-3), grad=dict(rtol=2e-2, atol=2e-2)),
    torch.float16: dict(out=dict(rtol=2e-3, atol=5e-4), grad=dict(rtol=5e-3, atol=5e-3)),
}

TC_CASES = {
    # name: ((B, H, Hkv, Tq, Tk), kwargs) -- T not a multiple of the 64-row tiles
    "causal-T300-gqa-ranges": ((2, 8, 2, 300, 300),
                               dict(causal=True, key_lengths=torch.tensor([300, 217]), key_start=torch.tensor([0, 9]))),
    "noncausal-T300-gqa-ranges": ((2, 8, 2, 300, 300),
                                  dict(causal=False, key_lengths=torch.tensor([300, 217]),
                                       key_start=torch.tensor([0, 9]))),
    "causal-tq<tk": ((2, 4, 4, 100, 300), dict(causal=True)),
    "causal-tq>tk-mqa": ((1, 4, 1, 129, 65), dict(causal=True)),
    "noncausal-T1": ((3, 4, 2, 1, 1), dict(causal=False)),
    "causal-T63": ((2, 4, 2, 63, 63), dict(causal=True, key_lengths=torch.tensor([63, 0]))),
}


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("case", list(TC_CASES))
def test_cuda_tensor_cores_vs_fp64_reference(case, D, dtype, device):
    shape, kw = TC_CASES[case]
    q, k, v, g = make_qkv(*shape, D, dtype=dtype, device=device, seed=D + len(case))
    kw = _on(device, kw)
    got = fwd_bwd(q, k, v, g, impl="kernel", **kw)
    want = fwd_bwd(q.double(), k.double(), v.double(), g.double(), impl="reference", **kw)
    torch_lowp = fwd_bwd(q, k, v, g, impl="reference", **kw)  # PyTorch's own math in the same dtype
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, torch_lowp, want):
        assert a.dtype == dtype and a.device.type == "cuda"
        assert_as_accurate_as(a, b, e, what=f"{case} {name}")


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_tensor_cores_varlen_vs_fp64_reference(causal, dtype, device):
    """Packed sequences (an empty one included) on the tensor-core path, GQA, D = 128."""
    lengths = [300, 0, 77, 1, 130]
    total = sum(lengths)
    q, k, v, g = (randn(total, h, 128, seed=i, dtype=dtype, device=device) for i, h in enumerate((8, 2, 2, 8)))
    kw = dict(causal=causal, cu_seqlens=cu_seqlens_of(lengths, device))
    got = fwd_bwd(q, k, v, g, impl="kernel", **kw)
    want = fwd_bwd(q.double(), k.double(), v.double(), g.double(), impl="reference", **kw)
    torch_lowp = fwd_bwd(q, k, v, g, impl="reference", **kw)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, torch_lowp, want):
        assert_as_accurate_as(a, b, e, what=name)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_unaligned_bf16_takes_the_cuda_core_path(device):
    """bf16 rows that are not 16-byte aligned (a contiguous view at an odd element offset) cannot
    use cp.async: the CUDA-core kernels run instead (fp32 probabilities: only the output's
    rounding separates them from the reference) and agree with the aligned tensor-core result."""
    shape = (2, 4, 2, 70, 70, 64)
    q, k, v, g = make_qkv(*shape, dtype=torch.bfloat16, device=device, seed=7)

    def unaligned(x):
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = buf[1:].view(x.shape)
        view.copy_(x)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    # (not fwd_bwd: its clone() would allocate aligned copies)
    qu, ku, vu = (unaligned(x).requires_grad_() for x in (q, k, v))
    out = attention(qu, ku, vu, causal=True, impl="kernel")
    got = (out.detach(), *torch.autograd.grad(out, (qu, ku, vu), unaligned(g)))
    want = fwd_bwd(q.double(), k.double(), v.double(), g.double(), impl="reference", causal=True)
    assert_close(got[0], want[0], torch.bfloat16, **OUT_TOL[torch.bfloat16], what="out")
    for name, a, e in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert_close(a, e, torch.bfloat16, scale=grad_scale(e), what=name)
    aligned = fwd_bwd(q, k, v, g, impl="kernel", causal=True)  # the tensor-core path, as accurate as PyTorch's
    torch_lowp = fwd_bwd(q, k, v, g, impl="reference", causal=True)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), aligned, torch_lowp, want):
        assert_as_accurate_as(a, b, e, what=f"tensor cores {name}")


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cuda_masked_keys_are_never_read(dtype, device):
    """NaN in left/right padding of K and V: the tensor-core path zero-fills those rows instead of
    loading them and the CUDA-core path skips them, so results are bitwise those of clean
    padding (gradients of the padded keys are exactly 0)."""
    q, k, v, g = make_qkv(3, 4, 2, 100, 130, 64, dtype=dtype, seed=23, device=device)
    kl = torch.tensor([130, 70, 100], device=device)
    ks = torch.tensor([0, 5, 64], device=device)
    kw = dict(causal=True, key_lengths=kl, key_start=ks, impl="kernel")
    j = torch.arange(130, device=device)[None, :]
    pad = ((j < ks[:, None]) | (j >= kl[:, None]))[:, None, :, None]
    clean = fwd_bwd(q, k, v, g, **kw)
    dirty = fwd_bwd(q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan")), g, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), dirty, clean):
        assert torch.equal(a, e), name
    assert (dirty[2].masked_select(pad) == 0).all() and (dirty[3].masked_select(pad) == 0).all()


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 4])
def test_cuda_decode_long_cache_several_splits(Tq, dtype, device):
    """Caches of thousands of keys with B * Hkv small: the keys of each row are split over many
    blocks (B = 1, Hkv = 1 alone gives min(2 * SMs, 5000 / 256) >= 2 splits on any GPU) and
    merged by log-sum-exp. Rows of very different lengths (Tq only, a few hundred, 4999) share
    the split count, so short rows have empty chunks. Against the fp64 reference (NaN beyond
    every row's length) and against padded attention over each row's prefix."""
    H, Hkv, D, Tmax = 8, 2, 128, 5000
    for lengths in ([4999], [Tq, 300, 4999]):
        B = len(lengths)
        q = randn(B, H, Tq, D, seed=Tq, dtype=dtype, device=device)
        k, v = (randn(B, Hkv, Tmax, D, seed=Tq + i, dtype=dtype, device=device) for i in (1, 2))
        lens = torch.tensor(lengths, device=device)
        beyond = (torch.arange(Tmax, device=device)[None, :] >= lens[:, None])[:, None, :, None]
        k, v = k.masked_fill(beyond, float("nan")), v.masked_fill(beyond, float("nan"))
        got = decode_attention(q, k, v, lens, impl="kernel")
        want = reference.decode_attention(q.double(), k.double(), v.double(), lens)
        assert_close(got, want, dtype, **OUT_TOL[dtype], what=f"lengths {lengths}")
        for b, n in enumerate(lengths):
            row = attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True, impl="kernel")
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TC_TOL[dtype]["out"]
            assert_close(got[b:b + 1], row, dtype, **tol, what=f"row {b} vs attention")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_decode_prefill_chunk_takes_the_forward(device):
    """Tq = 40 > 16 new tokens per row (a prefill chunk) runs the forward kernel on the device
    table (tensor cores for bf16), still masking each row at its own cache length."""
    q, k, v, _ = make_qkv(2, 8, 2, 40, 300, 64, dtype=torch.bfloat16, device=device, seed=3)
    lens = torch.tensor([40, 257], device=device)
    got = decode_attention(q, k, v, lens, impl="kernel")
    want = reference.decode_attention(q.double(), k.double(), v.double(), lens)
    assert_close(got, want, torch.bfloat16, **TC_TOL[torch.bfloat16]["out"])


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_bitwise_deterministic(device):
    """Tensor-core forward + backward (GQA, causal, key ranges) and split decode: identical bits
    run to run (no atomics; fixed reduction orders)."""
    q, k, v, g = make_qkv(2, 8, 2, 300, 300, 128, dtype=torch.bfloat16, device=device, seed=5)
    kw = dict(causal=True, key_lengths=torch.tensor([300, 150], device=device), impl="kernel")
    a, b = fwd_bwd(q, k, v, g, **kw), fwd_bwd(q, k, v, g, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    qd = q[:1, :, :1].contiguous()
    lens = torch.tensor([299], device=device)
    assert torch.equal(decode_attention(qd, k[:1], v[:1], lens), decode_attention(qd, k[:1], v[:1], lens))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_gradcheck(causal, device):
    q, k, v, _ = make_qkv(2, 2, 1, 3, 5, 2, seed=41, device=device)
    kw = dict(causal=causal, key_lengths=torch.tensor([4, 5], device=device),
              key_start=torch.tensor([1, 0], device=device))
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, impl="kernel", **kw), (q, k, v))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("kind", ["padded", "padded_plain", "varlen"])
def test_cuda_opcheck_attention(kind, device):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _op_args(kind))
    args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.fastrlhf.attention.default, args)
    q, k, v, _ = make_qkv(2, 4, 2, 3, 12, 64, dtype=torch.bfloat16, device=device, seed=111)
    torch.library.opcheck(torch.ops.fastrlhf.decode_attention.default,
                          (q, k, v, torch.tensor([3, 12], device=device), 0.3))


# ---- drop-in for F.scaled_dot_product_attention -----------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(33, 33), (20, 70)])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("lengths", [False, True])
def test_dropin_for_sdpa(causal, Tq, Tk, Hkv, lengths):
    """fp32 values and gradients equal SDPA's (GQA through repeat_interleave on the SDPA side;
    key_lengths / Tq < Tk causal alignment through an explicit boolean mask)."""
    B, H, D = 2, 4, 32
    q, k, v, g = make_qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=Tq + Hkv)
    kl = torch.tensor([Tk, Tk // 2]) if lengths else None
    got = fwd_bwd(q, k, v, g, causal=causal, key_lengths=kl)

    group = H // Hkv
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    kr, vr = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
    if causal and Tq == Tk and kl is None:
        ref = F.scaled_dot_product_attention(qs, kr, vr, is_causal=True)
    elif not causal and kl is None:
        ref = F.scaled_dot_product_attention(qs, kr, vr)
    else:
        mask = torch.stack([visible(Tq, Tk, causal, 0, Tk if kl is None else int(kl[b])) for b in range(B)])
        ref = F.scaled_dot_product_attention(qs, kr, vr, attn_mask=mask[:, None])
    want = (ref.detach(), *torch.autograd.grad(ref, (qs, ks, vs), g))
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, rtol=1e-5, atol=2e-5, what=name)


# ---- opcheck and torch.compile ------------------------------------------------------------


def _op_args(kind, requires_grad=True):
    if kind == "padded":
        q, k, v, _ = make_qkv(2, 4, 2, 5, 9, 8, seed=101)
        extra = (True, 0.3, None, None, torch.tensor([9, 4]), torch.tensor([0, 2]))
    elif kind == "padded_plain":
        q, k, v, _ = make_qkv(2, 4, 4, 9, 9, 8, dtype=torch.float32, seed=102)
        extra = (False, 0.35, None, None, None, None)
    else:
        q, k, v = randn(9, 4, 8, seed=103), randn(9, 2, 8, seed=104), randn(9, 2, 8, seed=105)
        cu = torch.tensor([0, 4, 4, 9])
        extra = (True, 0.3, cu, cu, None, None)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return (q, k, v, *extra)


@pytest.mark.parametrize("kind", ["padded", "padded_plain", "varlen"])
def test_opcheck_attention(kind):
    torch.library.opcheck(torch.ops.fastrlhf.attention.default, _op_args(kind))
    torch.library.opcheck(torch.ops.fastrlhf.attention.default, _op_args(kind, requires_grad=False))


def test_opcheck_decode_attention():
    q, k, v, _ = make_qkv(2, 4, 2, 3, 12, 8, seed=111)
    torch.library.opcheck(torch.ops.fastrlhf.decode_attention.default, (q, k, v, torch.tensor([3, 12]), 0.3))
    q1 = q[:, :, :1].contiguous().float()
    torch.library.opcheck(torch.ops.fastrlhf.decode_attention.default,
                          (q1, k.float(), v.float(), torch.tensor([7, 1]), 0.5))


def _compile_case(kind):
    if kind == "padded":
        q, k, v, g = make_qkv(2, 4, 2, 33, 70, 16, dtype=torch.float32, seed=121)
        return (q, k, v, g), dict(causal=True)
    if kind == "key_lengths":
        q, k, v, g = make_qkv(2, 4, 2, 33, 70, 16, dtype=torch.float32, seed=122)
        return (q, k, v, g), dict(causal=True, key_lengths=torch.tensor([70, 30]), key_start=torch.tensor([0, 4]))
    q, k, v, g = (randn(40, h, 16, seed=i, dtype=torch.float32) for i, h in enumerate((4, 2, 2, 4)))
    return (q, k, v, g), dict(causal=True, cu_seqlens=torch.tensor([0, 7, 7, 40]))


@pytest.mark.parametrize("kind", ["padded", "key_lengths", "varlen"])
def test_torch_compile_fullgraph_forward_backward(kind):
    """torch.compile(fullgraph=True) of a function calling fastrlhf.ops.attention, forward and
    backward, matches eager."""
    torch._dynamo.reset()
    (q, k, v, g), kw = _compile_case(kind)
    tensor_kw = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    causal = kw["causal"]

    def f(q, k, v, **tkw):
        return attention(q, k, v, causal=causal, **tkw) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = fn(qs, ks, vs, **tensor_kw)
        results.append((out.detach(), *torch.autograd.grad(out, (qs, ks, vs), g)))
    for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, e), name


def test_torch_compile_still_rejects_bad_values():
    """Under torch.compile the Python layer skips its data-dependent value checks; the op's own
    checks must still reject out-of-range key_lengths, bad cu_seqlens and cache_seqlens."""
    torch._dynamo.reset()
    q, k, v, _ = make_qkv(2, 4, 2, 5, 5, 8, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def padded(q, k, v, kl):
        return attention(q, k, v, key_lengths=kl)

    assert torch.equal(padded(q, k, v, torch.tensor([5, 2])), attention(q, k, v, key_lengths=torch.tensor([5, 2])))
    with pytest.raises(Exception, match="key_lengths"):
        padded(q, k, v, torch.tensor([6, 2]))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def varlen(q, k, v, cu):
        return attention(q, k, v, cu_seqlens=cu)

    qv, kv = randn(6, 4, 8, seed=1, dtype=torch.float32), randn(6, 2, 8, seed=2, dtype=torch.float32)
    with pytest.raises(Exception, match="cu_seqlens"):
        varlen(qv, kv, kv, torch.tensor([0, 4, 2, 6]))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def dec(q, k, v, lens):
        return decode_attention(q, k, v, lens)

    with pytest.raises(Exception, match="cache_seqlens"):
        dec(q[:, :, :3], k, v, torch.tensor([2, 5]))


def test_torch_compile_fullgraph_decode():
    torch._dynamo.reset()
    q, k, v, _ = make_qkv(2, 4, 2, 1, 30, 16, dtype=torch.float32, seed=131)
    lens = torch.tensor([5, 30])

    def f(q, k, v, lens):
        return decode_attention(q, k, v, lens) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v, lens), f(q, k, v, lens))


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["padded", "varlen", "decode"])
def test_bitwise_deterministic_across_calls_and_threads(kind):
    """Every output element is written by one task in a fixed order: identical bits run to run
    and for 1 vs 2 threads (values and gradients)."""
    if kind == "padded":
        q, k, v, g = make_qkv(2, 4, 2, 130, 130, 64, dtype=torch.float32, seed=141)
        kw = dict(causal=True, key_lengths=torch.tensor([130, 77]), key_start=torch.tensor([0, 3]))
    elif kind == "varlen":
        q, k, v, g = (randn(200, h, 32, seed=i, dtype=torch.float32) for i, h in enumerate((4, 1, 1, 4)))
        kw = dict(causal=True, cu_seqlens=torch.tensor([0, 5, 5, 130, 200]))
    else:
        q, k, v, _ = make_qkv(3, 4, 2, 3, 130, 64, dtype=torch.float32, seed=142)
        lens = torch.tensor([3, 70, 130])

    def run():
        if kind == "decode":
            return (decode_attention(q, k, v, lens, impl="kernel"),)
        return fwd_bwd(q, k, v, g, impl="kernel", **kw)

    before = torch.get_num_threads()
    a, b, c = runs_at_thread_counts(run)
    assert torch.get_num_threads() == before
    for other in (b, c):
        for x, y in zip(a, other):
            assert torch.equal(x, y)


# ---- bad input ----------------------------------------------------------------------------


def _q(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype).to(device)


Q, K = (2, 4, 5, 8), (2, 2, 5, 8)
QV, KV = (6, 4, 8), (6, 2, 8)
CU = torch.tensor([0, 4, 6])


def _varlen(cu, **kw):
    return attention(_q(*QV), _q(*KV), _q(*KV), cu_seqlens=cu, **kw)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        # heads / head dim / shapes / dtypes
        (lambda: attention(_q(*Q), _q(2, 3, 5, 8), _q(2, 3, 5, 8)), ValueError, r"heads \(4\).*k/v heads \(3\)"),
        (lambda: attention(_q(1, 1, 2, 257), _q(1, 1, 2, 257), _q(1, 1, 2, 257)), ValueError, "head dim D"),
        (lambda: attention(_q(6, 1, 300), _q(6, 1, 300), _q(6, 1, 300), cu_seqlens=CU), ValueError, "head dim D"),
        (lambda: attention(_q(*Q), _q(2, 2, 5, 4), _q(2, 2, 5, 4)), ValueError, "k head dim"),
        (lambda: attention(_q(*Q), _q(*K), _q(2, 2, 6, 8)), ValueError, "k and v"),
        (lambda: attention(_q(*Q), _q(*K, dtype=F64), _q(*K, dtype=F64)), TypeError, "dtype"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K, dtype=torch.float16)), TypeError, "dtype"),
        (lambda: attention(_q(*Q).long(), _q(*K).long(), _q(*K).long()), TypeError, "q must be a floating"),
        (lambda: attention(_q(*Q), _q(1, 2, 5, 8), _q(1, 2, 5, 8)), ValueError, "k batch"),
        (lambda: attention(_q(*Q).tolist(), _q(*K), _q(*K)), ValueError, "padded layout"),
        # ndim
        (lambda: attention(_q(4, 5, 8), _q(2, 5, 8), _q(2, 5, 8)), ValueError, r"q \[B, H, Tq, D\]"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), cu_seqlens=torch.tensor([0, 2])), ValueError,
         r"varlen layout takes q \[total, H, D\]"),
        # cu_seqlens
        (lambda: _varlen(torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens.*non-decreasing"),
        (lambda: _varlen(torch.tensor([1, 4, 6])), ValueError, "cu_seqlens must start at 0"),
        (lambda: _varlen(torch.tensor([0, 4, 5])), ValueError, "cu_seqlens.*end at the number of tokens 6"),
        (lambda: _varlen(torch.tensor([0, 4, 7])), ValueError, "cu_seqlens"),
        (lambda: _varlen(torch.tensor([0.0, 4.0, 6.0])), TypeError, "cu_seqlens must be an integer"),
        (lambda: _varlen(torch.tensor([[0, 4, 6]])), ValueError, "cu_seqlens"),
        (lambda: _varlen(torch.tensor([], dtype=torch.long)), ValueError, "cu_seqlens"),
        (lambda: _varlen([0, 4, 6]), ValueError, "cu_seqlens"),
        (lambda: _varlen(CU, max_seqlen=3), ValueError, "max_seqlen"),
        (lambda: attention(_q(*QV), _q(5, 2, 8), _q(5, 2, 8), cu_seqlens=CU), ValueError, "as many k tokens"),
        # key_lengths / key_start
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([6, 1])), ValueError,
         r"key_lengths must be in \[0, Tk\]"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([-1, 1])), ValueError, "key_lengths"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([1, 1, 1])), ValueError,
         r"key_lengths must be a \[2\]"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([[1, 1]])), ValueError, "key_lengths"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([1.0, 1.0])), TypeError,
         "key_lengths must be an integer"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([True, True])), TypeError,
         "key_lengths"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=[1, 1]), ValueError, "key_lengths"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_start=torch.tensor([0, 9])), ValueError,
         r"key_start must be in \[0, Tk\]"),
        (lambda: _varlen(CU, key_lengths=torch.tensor([4, 2])), ValueError, "key_lengths / key_start"),
        (lambda: _varlen(CU, key_start=torch.tensor([0, 0])), ValueError, "key_lengths / key_start"),
        # devices
        (lambda: attention(_q(*Q), _q(*K, device="meta"), _q(*K, device="meta")), ValueError, "device"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K, device="meta")), ValueError, "device"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_lengths=torch.tensor([1, 1], device="meta")), ValueError,
         "key_lengths is on meta"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), key_start=torch.tensor([1, 1], device="meta")), ValueError,
         "key_start is on meta"),
        # scalars
        (lambda: attention(_q(*Q), _q(*K), _q(*K), scale=float("nan")), ValueError, "scale"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), scale=float("inf")), ValueError, "scale"),
        (lambda: attention(_q(*Q), _q(*K), _q(*K), impl="flash"), ValueError, "impl"),
        # decode_attention
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), torch.tensor([2, 5])), ValueError,
         r"cache_seqlens must be in \[Tq, Tmax\] = \[3, 5\]"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), torch.tensor([3, 6])), ValueError,
         "cache_seqlens must be in"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), None), ValueError, "cache_seqlens is required"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), torch.tensor([3])), ValueError, "cache_seqlens"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), torch.tensor([3.0, 3.0])), TypeError,
         "cache_seqlens"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(*K), torch.tensor([3, 3], device="meta")),
         ValueError, "cache_seqlens is on meta"),
        (lambda: decode_attention(_q(4, 3, 8), _q(*K), _q(*K), torch.tensor([3, 3])), ValueError,
         r"q \[B, H, Tq, D\]"),
        (lambda: decode_attention(_q(3, 4, 3, 8), _q(*K), _q(*K), torch.tensor([3, 3, 3])), ValueError, "cache batch"),
        (lambda: decode_attention(_q(2, 3, 3, 8), _q(*K), _q(*K), torch.tensor([3, 3])), ValueError, "heads"),
        (lambda: decode_attention(_q(2, 4, 3, 4), _q(*K), _q(*K), torch.tensor([3, 3])), ValueError, "head dim"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K), _q(2, 2, 6, 8), torch.tensor([3, 3])), ValueError,
         "one shape"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K, dtype=F64), _q(*K, dtype=F64), torch.tensor([3, 3])),
         TypeError, "dtype"),
        (lambda: decode_attention(_q(2, 4, 3, 8), _q(*K, device="meta"), _q(*K, device="meta"),
                                  torch.tensor([3, 3])), ValueError, "device"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kernel_op_rejects_bad_input_directly():
    """torch.ops.fastrlhf.attention / decode_attention validate too (the Python layer is not the
    only guard), naming what is wrong."""
    op, dec = torch.ops.fastrlhf.attention.default, torch.ops.fastrlhf.decode_attention.default
    q, k, v = _q(*Q), _q(*K), _q(*K)
    with pytest.raises(RuntimeError, match="key_lengths"):
        op(q, k, v, True, 0.3, None, None, torch.tensor([6, 1]), None)
    with pytest.raises(RuntimeError, match="key_lengths"):
        op(q, k, v, True, 0.3, None, None, torch.tensor([1, 1, 1]), None)
    with pytest.raises(RuntimeError, match="key_start"):
        op(q, k, v, True, 0.3, None, None, None, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        op(q, _q(2, 3, 5, 8), _q(2, 3, 5, 8), True, 0.3, None, None, None, None)
    with pytest.raises(RuntimeError, match="head dim"):
        op(_q(1, 1, 2, 257), _q(1, 1, 2, 257), _q(1, 1, 2, 257), True, 0.3, None, None, None, None)
    with pytest.raises(RuntimeError, match="k and v"):
        op(q, k, _q(2, 2, 6, 8), True, 0.3, None, None, None, None)
    with pytest.raises(RuntimeError, match="v"):
        op(q, k, v.double(), True, 0.3, None, None, None, None)
    qv, kv = _q(*QV), _q(*KV)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(qv, kv, kv, True, 0.3, torch.tensor([0, 4, 2, 6]), torch.tensor([0, 4, 2, 6]), None, None)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(qv, kv, kv, True, 0.3, torch.tensor([0, 4, 5]), torch.tensor([0, 4, 5]), None, None)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(qv, kv, kv, True, 0.3, CU, None, None, None)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        dec(_q(2, 4, 3, 8), k, v, torch.tensor([2, 5]), 0.3)
    with pytest.raises(RuntimeError, match="out of"):
        dec(_q(2, 4, 3, 8), k, v, torch.tensor([3, 6]), 0.3)


def test_validate_false_skips_only_the_python_value_checks():
    """validate=False (callers that build their own lengths) skips the Python-side value checks,
    which read the data; the op's own checks still reject out-of-range values on the CPU."""
    q, k, v = _q(*Q), _q(*K), _q(*K)
    good = torch.tensor([5, 1])
    torch.testing.assert_close(attention(q, k, v, key_lengths=good, validate=False),
                               attention(q, k, v, key_lengths=good), rtol=0, atol=0)
    bad = torch.tensor([6, 1])
    with pytest.raises(ValueError, match="key_lengths"):
        attention(q, k, v, key_lengths=bad)
    with pytest.raises(RuntimeError, match="key_lengths"):
        attention(q, k, v, key_lengths=bad, validate=False)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        decode_attention(_q(2, 4, 3, 8), k, v, torch.tensor([2, 5]), validate=False)


# ---- NaN is never turned into a silent answer: a NaN query row gives a NaN output row ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_nan_query_row_propagates_like_the_reference(dtype, causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 37, 32, generator=g).to(dtype) for _ in range(3))
    q[1, 2, 5] = float("nan")  # one query row
    outs = []
    for impl in ("kernel", "reference"):
        qq = q.clone().requires_grad_()
        o = attention(qq, k, v, causal=causal, impl=impl)
        o.nan_to_num().sum().backward()  # a NaN-free upstream gradient
        outs.append((o.detach(), qq.grad))
    for name, (a, b) in zip(("out", "grad_q"), zip(*outs)):
        assert torch.equal(a.isnan(), b.isnan()), name
    assert outs[0][0][1, 2, 5].isnan().all() and not outs[0][0][1, 2, 4].isnan().any()
    assert outs[0][1][1, 2, 5].isnan().all()


def test_nan_query_row_in_decode_propagates():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 8, 1, 64, generator=g)
    kc, vc = torch.randn(3, 2, 50, 64, generator=g), torch.randn(3, 2, 50, 64, generator=g)
    q[2, 5] = float("nan")
    lens = torch.tensor([50, 17, 33])
    for impl in ("kernel", "reference"):
        o = decode_attention(q, kc, vc, lens, impl=impl)
        assert o[2, 5].isnan().all() and not o[2, 4].isnan().any() and not o[:2].isnan().any(), impl
