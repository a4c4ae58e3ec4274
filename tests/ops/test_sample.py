"""fastrlhf.ops.sample: statistical exactness against the reference processed distribution for
every filter / penalty / epsilon combination and for per-row parameters, support, logprobs,
reproducibility and row independence, greedy rows, ties and -inf logits, dtypes, a large
vocabulary, opcheck, torch.compile, impl="reference" and bad input.

Statistical tests (FlashInfer style): draw many tokens cheaply by repeating each row
(``logits.repeat(R, 1)``: every copy has its own row index, hence its own Philox counter) and
varying ``offset``; then, per row,

* tokens with ``q == 0`` (``reference.processed_distribution``) must never be drawn;
* Pearson's X^2 of the counts against ``n * q`` (cells with expected count < 50 pooled) must stay
  below ``df + 2 sqrt(df x) + 2 x`` with ``x = ln(1e9)``. That is the Laurent-Massart bound,
  ``P(chi2_df >= df + 2 sqrt(df x) + 2 x) <= exp(-x)``, so under the null hypothesis (the kernel
  samples from q) one row check fails with probability <= 1e-9 (asymptotically; the bound is
  1.2-1.4x the exact 1e-9 quantile -- the exact chi2 tail there is ~1e-12 -- a margin for the
  chi-square approximation of Pearson's statistic in the far tail). This file makes fewer than
  500 row checks (both devices): false-failure probability < 1e-6 overall. Seeds are fixed, so
  the tests are deterministic anyway; ``test_harness_has_power`` shows the same harness rejects
  slightly wrong distributions.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastrlhf
from fastrlhf.ops import SampleOutput, reference, sample

from helpers import DEVICES, assert_close

NEG_INF = float("-inf")
V_SMALL = 12
REPEATS, OFFSETS = 2500, range(20)  # 50,000 draws per row
MIN_EXPECTED = 50.0  # pool cells with a smaller expected count
LOG_INV_DELTA = math.log(1e9)  # per-row false-failure probability 1e-9
LOGPROB_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 logits vs the fp64 oracle

PARAM_ORDER = ["temperature", "top_k", "top_p", "min_p", "epsilon", "repetition_penalty", "presence_penalty",
               "frequency_penalty"]
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, epsilon=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0)


# ---- inputs -------------------------------------------------------------------------------


def base_logits(device="cpu", dtype=torch.float32):
    """[4, 12] rows chosen so that no top-p / min-p boundary is a near tie (see _assert_robust):
    a: well-separated masses (0.30 ... 0.003), shuffled so index order != rank order, shifted so
       logits of both signs appear (repetition penalty divides positives, multiplies negatives);
    b: exact ties (1.0 x2, 0.5 x4), including at top-k boundaries;
    c: random N(0, 1.5^2);
    d: four -inf logits (masked tokens)."""
    probs = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.007, 0.003],
                         dtype=torch.float64)
    perm = [5, 0, 11, 3, 8, 1, 10, 6, 2, 9, 4, 7]
    a = probs.log()[perm] + 2.0
    b = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.0, -1.0, 2.0, -3.0, 0.5, -0.5, 1.5], dtype=torch.float64)
    c = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5
    d = torch.tensor([NEG_INF, 0.7, -0.3, NEG_INF, 1.2, 0.1, NEG_INF, -1.0, 0.4, NEG_INF, -2.0, 0.9],
                     dtype=torch.float64)
    return torch.stack([a, b, c, d]).to(device, dtype)


def base_history(device="cpu"):
    """[4, 7] token ids with -1 padding, repeated ids, the top token of a row, tokens with negative
    logits and (row d) a -inf token; row c is all padding (no penalty at all)."""
    return torch.tensor([[1, 1, 1, 4, 5, -1, -1],
                         [7, 7, 8, 0, -1, -1, -1],
                         [-1, -1, -1, -1, -1, -1, -1],
                         [0, 4, 4, 4, 10, 2, -1]], device=device)


def _tile(v, R):
    """Repeat a per-row parameter ([B]) or token_history ([B, L]) like logits.repeat(R, 1)."""
    if isinstance(v, torch.Tensor) and v.dim() == 1:
        return v.repeat(R)
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        return v.repeat(R, 1)
    return v


def _to(params, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def draw(logits, *, repeats=REPEATS, offsets=OFFSETS, seed=2024, impl="kernel", **params):
    """Sample every row of ``logits [B, V]`` ``repeats`` times at each offset.
    -> SampleOutput of [n, B] tensors on the CPU (n = repeats * len(offsets))."""
    B = logits.shape[0]
    big = logits.repeat(repeats, 1)
    tiled = {k: _tile(v, repeats) for k, v in params.items()}
    outs = [sample(big, seed=seed, offset=o, impl=impl, **tiled) for o in offsets]
    return SampleOutput(*(torch.cat([getattr(o, f).view(repeats, B) for o in outs]).cpu()
                          for f in SampleOutput._fields))


def oracle(logits, **params):
    """reference.processed_distribution on the CPU, fp64 (on the logits as given: rounded)."""
    return reference.processed_distribution(logits.cpu().double(), **_to(params, "cpu"))


def chi2_bound(df):
    return df + 2.0 * math.sqrt(df * LOG_INV_DELTA) + 2.0 * LOG_INV_DELTA


def pearson(obs, exp):
    """Pearson's X^2 and degrees of freedom after pooling the cells with expected count below
    MIN_EXPECTED (the pooled cell, if still small, is merged into the smallest other cell)."""
    small = exp < MIN_EXPECTED
    o, e = obs[~small], exp[~small]
    if small.any():
        po, pe = obs[small].sum(), exp[small].sum()
        if pe < MIN_EXPECTED and e.numel() > 0:
            i = int(torch.argmin(e))
            o, e = o.clone(), e.clone()
            o[i] += po
            e[i] += pe
        else:
            o, e = torch.cat([o, po[None]]), torch.cat([e, pe[None]])
    return float(((o - e) ** 2 / e).sum()), e.numel() - 1


def assert_distribution(tokens, q, what=""):
    """tokens [n, B] were drawn from q [B, V]: never outside the support, X^2 within the bound."""
    n, B = tokens.shape
    V = q.shape[1]
    assert ((tokens >= 0) & (tokens < V)).all(), f"{what}: token ids out of [0, {V})"
    counts = torch.zeros(B, V, dtype=torch.float64).scatter_add_(
        1, tokens.T.contiguous(), torch.ones(B, n, dtype=torch.float64))
    for b in range(B):
        zero = q[b] == 0
        outside = counts[b][zero]
        assert outside.sum() == 0, (
            f"{what} row {b}: drew tokens outside the support: "
            f"{dict(zip(torch.nonzero(zero).flatten().tolist(), outside.long().tolist()))}; q = {q[b].tolist()}")
        stat, df = pearson(counts[b][~zero], n * q[b][~zero])
        if df > 0:
            assert stat <= chi2_bound(df), (
                f"{what} row {b}: X^2 = {stat:.1f} > {chi2_bound(df):.1f} (df {df}, n {n}); "
                f"empirical {(counts[b] / n).tolist()} vs q {q[b].tolist()}")


def assert_logprobs(out, logits, q, dtype=torch.float32, what=""):
    """logprobs = log q(token), raw_logprobs = log_softmax(logits)(token), both fp32."""
    assert out.logprobs.dtype == torch.float32 and out.raw_logprobs.dtype == torch.float32
    assert out.tokens.dtype == torch.int64
    tok = out.tokens.T.cpu()  # [B, n]
    want = torch.log(q.gather(1, tok)).T
    raw = torch.log_softmax(logits.cpu().double(), -1).gather(1, tok).T
    assert_close(out.logprobs, want, dtype, **LOGPROB_TOL, what=f"{what} logprobs")
    assert_close(out.raw_logprobs, raw, dtype, **LOGPROB_TOL, what=f"{what} raw_logprobs")


def _support(logits, **params):
    return oracle(logits, **params) > 0


def _assert_robust(logits, params):
    """Guard on the test data: the support must not change when top_p / min_p (scalars or per-row
    tensors) move by 1e-4 relative: fp32 kernel and fp64 oracle must not disagree at a boundary."""
    base = _support(logits, **params)
    for name in ("top_p", "min_p"):
        v = params.get(name)
        if v is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float64).cpu()
        inner = (v > 0) & (v < 0.999)
        if not inner.any():
            continue
        for f in (1 - 1e-4, 1 + 1e-4):
            moved = torch.where(inner, v * f, v).expand(logits.shape[0])
            assert torch.equal(_support(logits, **{**params, name: moved}), base), (
                f"test data: {name}={v.tolist()} is within 1e-4 of a boundary")


def check_distribution(logits, params, *, what="", dtype=torch.float32, **kw):
    """Draw, then check support + frequencies + logprobs against the oracle."""
    _assert_robust(logits, params)
    q = oracle(logits, **params)
    out = draw(logits, **params, **kw)
    assert_distribution(out.tokens, q, what)
    assert_logprobs(out, logits, q, dtype, what)
    return out, q


# ---- statistical exactness ----------------------------------------------------------------

H = "token_history"
CASES = {
    "none": {},
    "temperature_0.5": dict(temperature=0.5),
    "temperature_2": dict(temperature=2.0),
    "top_k_3_ties": dict(top_k=3),  # row b: the 3rd largest is a tie -> 4 kept
    "top_k_5_ties": dict(top_k=5),  # row b: 0.5 x4 at the boundary -> 8 kept
    "top_k_V_off": dict(top_k=V_SMALL),
    "top_k_huge_off": dict(top_k=1000),
    "top_p_0.7": dict(top_p=0.7),
    "top_p_0.9_temperature": dict(top_p=0.9, temperature=1.5),
    "top_p_1_off": dict(top_p=1.0),
    "top_k_top_p": dict(top_k=6, top_p=0.8, temperature=1.3),
    "min_p": dict(min_p=0.25),
    "min_p_top_p_temperature": dict(temperature=0.7, top_p=0.95, min_p=0.1),
    "all_filters": dict(temperature=0.9, top_k=8, top_p=0.85, min_p=0.05),
    "epsilon": dict(epsilon=0.3),
    "epsilon_filters": dict(epsilon=0.2, top_k=4, top_p=0.9, temperature=0.8),
    "epsilon_1_uniform": dict(epsilon=1.0, top_k=2),
    "greedy_epsilon": dict(temperature=0.0, epsilon=0.3),
    "top_k_1_epsilon": dict(top_k=1, temperature=2.0, epsilon=0.1),
    "repetition": {H: True, "repetition_penalty": 2.0},
    "repetition_below_1": {H: True, "repetition_penalty": 0.5},
    "presence": {H: True, "presence_penalty": 1.0},
    "presence_negative": {H: True, "presence_penalty": -0.5},
    "frequency": {H: True, "frequency_penalty": 0.5},
    "penalties_all": {H: True, "repetition_penalty": 1.5, "presence_penalty": 0.4, "frequency_penalty": 0.3},
    "penalties_filters": {H: True, "repetition_penalty": 1.3, "presence_penalty": 0.2, "frequency_penalty": 0.3,
                          "top_k": 5, "top_p": 0.9, "temperature": 0.9, "min_p": 0.05},
    "penalties_greedy": {H: True, "repetition_penalty": 1.5, "frequency_penalty": 1.0, "temperature": 0.0},
    "penalties_epsilon": {H: True, "presence_penalty": 0.6, "epsilon": 0.25, "top_k": 3},
}


def case_params(name, device):
    params = dict(CASES[name])
    if params.pop(H, False):
        params[H] = base_history(device)
    return params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_distribution_matches_reference(device, case):
    logits = base_logits(device)
    params = case_params(case, device)
    out, q = check_distribution(logits, params, what=case)
    if params.get("temperature", 1.0) == 0.0 or params.get("top_k", 0) == 1:
        if params.get("epsilon", 0.0) == 0.0:  # greedy without exploration: always the argmax
            assert (out.tokens == q.argmax(1)).all()


def test_penalty_cases_change_the_distribution():
    """The penalty cases are not vacuous: in rows a, b and d the penalties move the oracle by more
    than 0.01 somewhere (so the statistical test really exercises the penalty code), while row c
    (history all padding) is untouched."""
    logits = base_logits()
    penalties = (H, "repetition_penalty", "presence_penalty", "frequency_penalty")
    for name in CASES:
        if CASES[name].get(H):
            params = case_params(name, "cpu")
            q = oracle(logits, **params)
            q0 = oracle(logits, **{k: v for k, v in params.items() if k not in penalties})
            assert (q - q0).abs()[[0, 1, 3]].amax(1).min() > 0.01, name
            assert torch.equal(q[2], q0[2]), name


def test_harness_has_power():
    """The statistical check rejects distributions slightly off the truth: temperature 1.05 for
    1.0, and top_k = 11 (drops a 0.3% token) instead of none."""
    logits = base_logits()
    out = draw(logits)
    assert_distribution(out.tokens, oracle(logits), "truth")
    with pytest.raises(AssertionError, match="X\\^2"):
        assert_distribution(out.tokens, oracle(logits, temperature=1.05), "temperature 1.05")
    with pytest.raises(AssertionError, match="outside the support"):
        assert_distribution(out.tokens, oracle(logits, top_k=11), "top_k 11")


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_tensor_params_mix_modes(device):
    """One batch, every row in its own mode, all parameters as [B] tensors: plain, greedy by
    temperature 0, greedy by top_k 1 with epsilon, top-p with temperature, min-p + top-k +
    epsilon, penalties + top-k."""
    logits = torch.cat([base_logits(device), base_logits(device)[[0, 2]]])  # [6, 12]
    hist = torch.cat([base_history(device), base_history(device)[[0, 1]]])
    t = lambda *v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    params = dict(
        temperature=t(1.0, 0.0, 0.7, 0.6, 1.0, 1.2),
        top_k=t(0, 0, 1, 0, 5, 6, dtype=torch.int64),
        top_p=t(1.0, 0.5, 1.0, 0.8, 1.0, 1.0),
        min_p=t(0.0, 0.0, 0.0, 0.0, 0.2, 0.0),
        epsilon=t(0.0, 0.0, 0.1, 0.0, 0.25, 0.0),
        repetition_penalty=t(1.0, 1.0, 1.0, 1.0, 1.0, 1.4),
        presence_penalty=t(0.0, 0.0, 0.0, 0.0, 0.0, 0.3),
        frequency_penalty=t(0.0, 0.0, 0.0, 0.0, 0.0, 0.2),
        token_history=hist,
    )
    out, q = check_distribution(logits, params, what="per-row")
    assert (out.tokens[:, 1] == q[1].argmax()).all()  # temperature 0 row
    assert (out.logprobs[:, 1] == 0).all()
    # row b of the mixed batch draws exactly what the batch draws with row b's values as scalars
    for off in range(5):
        mixed = sample(logits, **params, seed=8, offset=off)
        for b in range(6):
            scalars = {k: (v[b].item() if v.dim() == 1 else v) for k, v in params.items()}
            alone = sample(logits, **scalars, seed=8, offset=off)
            for f in SampleOutput._fields:
                assert torch.equal(getattr(mixed, f)[b], getattr(alone, f)[b]), (off, b, f)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_tensor_equals_scalar(device):
    """A [B] tensor holding one value everywhere (or a 0-dim tensor) samples exactly the same
    tokens as that scalar."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 40, generator=g) * 2).to(device)
    hist = torch.randint(-1, 40, (64, 9), generator=g).to(device)
    scal = dict(temperature=0.8, top_k=7, top_p=0.9, min_p=0.02, epsilon=0.1, repetition_penalty=1.2,
                presence_penalty=0.3, frequency_penalty=0.1)
    tens = {k: torch.full((64,), v, device=device, dtype=torch.int64 if k == "top_k" else torch.float32)
            for k, v in scal.items()}
    zero_dim = {k: torch.tensor(v, device=device) for k, v in scal.items()}
    a = sample(logits, **scal, token_history=hist, seed=9, offset=4)
    for other in (tens, zero_dim):
        b = sample(logits, **other, token_history=hist, seed=9, offset=4)
        for f in SampleOutput._fields:
            assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(device, dtype):
    """16-bit and fp64 logits: valid tokens, the right distribution and logprobs, all against the
    oracle applied to the same (already rounded) logits; logprobs are fp32 whatever the input."""
    logits = base_logits(device, dtype)
    params = dict(temperature=0.9, top_k=6, top_p=0.85)
    out, q = check_distribution(logits, params, what=str(dtype), dtype=torch.float32,
                                repeats=2000, offsets=range(10))
    assert out.logprobs.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [-300.0, 300.0])
def test_shifted_logits(device, shift):
    """Softmax is shift invariant: logits around +-300 (fp32 ulp 3e-5) sample the oracle's
    distribution of the same rounded logits, with correct logprobs."""
    logits = base_logits(device) + shift
    check_distribution(logits, dict(CASES["all_filters"]), what=f"shift {shift}", repeats=1000, offsets=range(10))


# ---- support ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [dict(top_k=20), dict(top_p=0.5), dict(top_k=30, top_p=0.8, temperature=0.6),
                                    dict(min_p=0.3, temperature=1.5), dict(top_k=10, min_p=0.1, top_p=0.95)])
def test_never_draws_outside_support(device, params):
    """Random rows (V = 1000, some heavily tied): every draw is in the oracle's support and its
    logprob is log q(token)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 1000, generator=g) * 3
    logits[4:] = (logits[4:] * 2).round() / 2  # many exact ties
    logits = logits.to(device)
    q = oracle(logits, **params)
    out = draw(logits, repeats=50, offsets=range(10), **params)
    assert q.gather(1, out.tokens.T).gt(0).all()
    assert_logprobs(out, logits, q)


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocab(device):
    """V = 32000 with top_k = 50, top_p = 0.9: always inside the oracle's support (continuous and
    heavily tied rows), logprobs right, and the frequencies of one row match q."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 32000, generator=g) * 2.5
    logits[3:] = logits[3:].round()  # ties at the top-k and top-p boundaries
    logits = logits.to(device)
    params = dict(top_k=50, top_p=0.9)
    q = oracle(logits, **params)
    assert ((q > 0).sum(1)[:3] <= 50).all()
    out = draw(logits, repeats=16, offsets=range(8), **params)
    assert q.gather(1, out.tokens.T).gt(0).all()
    assert_logprobs(out, logits, q)
    check_distribution(logits[:1], dict(params, temperature=0.8), what="V=32000", repeats=2000,
                       offsets=range(3))


# ---- greedy, ties, -inf -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(top_k=1), dict(top_k=1, temperature=3.0),
                                    dict(temperature=0.0, top_p=0.1, min_p=0.9, top_k=5)])
def test_greedy_is_argmax(device, greedy):
    """temperature 0 or top_k 1 (whatever the other filters): the first argmax, logprob 0."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(40, 50, generator=g)
    logits[:10] = logits[:10].round()  # ties at the max
    logits[10:20, ::3] = NEG_INF
    logits[20] = 0.0  # all tied: token 0
    logits = logits.to(device)
    for off in range(3):
        out = sample(logits, **greedy, seed=1, offset=off)
        want = torch.stack([torch.nonzero(r == r.max())[0, 0] for r in logits.cpu()])
        assert torch.equal(out.tokens.cpu(), want)
        assert (out.logprobs == 0).all()
        assert_close(out.raw_logprobs, torch.log_softmax(logits.double(), -1).gather(1, want[:, None].to(device))[:, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_first_index(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [NEG_INF, 2.0, 2.0, NEG_INF],
                      [NEG_INF, NEG_INF, NEG_INF, 0.5]], device=device)
    for params in (dict(temperature=0.0), dict(top_k=1)):
        out = sample(x, **params, seed=0)
        assert out.tokens.tolist() == [1, 0, 1, 3]
        assert (out.logprobs == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_penalties_uses_penalized_argmax(device):
    """Greedy takes the argmax of the penalized logits (token 0 is the raw argmax of both rows)."""
    x = torch.tensor([[3.0, 2.9, 0.0, -1.0], [-0.1, -0.2, -5.0, -0.12]], device=device)
    hist = torch.tensor([[0, -1], [0, 0]], device=device)
    assert sample(x, temperature=0.0, seed=0).tokens.tolist() == [0, 0]
    # repetition 1.5: row 0: 3 / 1.5 = 2 < 2.9 -> 1; row 1 (negative): -0.1 * 1.5 = -0.15 < -0.12 -> 3
    assert sample(x, temperature=0.0, repetition_penalty=1.5, token_history=hist, seed=0).tokens.tolist() == [1, 3]
    # presence 0.05: row 0: 2.95 > 2.9 -> 0; row 1: -0.15 < -0.12 -> 3
    assert sample(x, top_k=1, presence_penalty=0.05, token_history=hist, seed=0).tokens.tolist() == [0, 3]
    # frequency 0.015 (row 1 has token 0 twice): row 0: 2.985 -> 0; row 1: -0.13 < -0.12 -> 3
    assert sample(x, temperature=0.0, frequency_penalty=0.015, token_history=hist, seed=0).tokens.tolist() == [0, 3]
    # frequency 0.008: row 1: -0.116 > -0.12 -> 0 (counts, not presence: 0.015 flipped it, 0.008 does not)
    assert sample(x, temperature=0.0, frequency_penalty=0.008, token_history=hist, seed=0).tokens.tolist() == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_greedy_epsilon_logprobs(device, eps):
    """Greedy with epsilon: the argmax has log((1-eps) + eps/V), any other token log(eps/V)."""
    g = torch.Generator().manual_seed(14)
    V = 16
    logits = torch.randn(8, V, generator=g).to(device)
    out = draw(logits, repeats=100, offsets=range(5), temperature=0.0, epsilon=eps)
    arg = logits.cpu().argmax(1)[None, :]
    is_arg = out.tokens == arg
    assert is_arg.any() and (~is_arg).any()
    want = torch.where(is_arg, math.log((1 - eps) + eps / V), math.log(eps / V)).float()
    assert_close(out.logprobs, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [{}, dict(temperature=0.3), dict(temperature=4.0), dict(top_k=5),
                                    dict(top_p=0.5), dict(min_p=0.5), dict(top_k=100, top_p=0.99),
                                    {H: True, "repetition_penalty": 3.0, "presence_penalty": 2.0}])
def test_neg_inf_logits_never_drawn(device, params):
    """-inf logits (every third token, and a row with only 2 finite ones) are never drawn without
    epsilon, whatever the filters; the logprobs stay finite."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(6, 30, generator=g)
    logits[:, ::3] = NEG_INF
    logits[5] = NEG_INF
    logits[5, [7, 19]] = torch.tensor([0.0, 0.3])
    logits = logits.to(device)
    if params.pop(H, False):
        params[H] = torch.arange(0, 12, device=device).repeat(6, 1)
    out = draw(logits, repeats=100, offsets=range(4), **params)
    assert torch.isfinite(logits.cpu().gather(1, out.tokens.T)).all()
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.raw_logprobs).all()
    assert_logprobs(out, logits, oracle(logits, **params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [{}, dict(temperature=0.0), dict(temperature=0.2), dict(top_k=5),
                                    dict(top_k=1), dict(top_p=0.3), dict(min_p=0.5), dict(min_p=1.0),
                                    dict(top_k=3, top_p=0.2, min_p=0.9, temperature=2.0)])
def test_single_finite_logit_always_returned(device, params):
    V = 37
    pos = torch.tensor([0, 5, 36, 17, 1])
    logits = torch.full((5, V), NEG_INF)
    logits[torch.arange(5), pos] = torch.tensor([0.0, -50.0, 80.0, 3.5, -1e4])
    logits = logits.to(device)
    out = draw(logits, repeats=20, offsets=range(5), **params)
    assert (out.tokens == pos[None, :]).all()
    assert (out.logprobs == 0).all() and (out.raw_logprobs == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_logits_with_epsilon(device):
    """With epsilon, masked tokens can be drawn (uniform part): logprob log(eps / V), raw -inf."""
    eps, V = 0.5, 4
    logits = torch.tensor([[NEG_INF, 1.0, NEG_INF, NEG_INF]], device=device)
    out = draw(logits, repeats=500, offsets=range(4), epsilon=eps, top_k=2)
    assert_distribution(out.tokens, oracle(logits, epsilon=eps, top_k=2))
    masked = out.tokens != 1
    assert masked.any()
    assert (out.logprobs[masked] == torch.tensor(math.log(eps / V), dtype=torch.float32)).all()
    assert (out.raw_logprobs[masked] == NEG_INF).all()
    assert_close(out.logprobs[~masked], torch.full_like(out.logprobs[~masked], math.log(1 - eps + eps / V)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.5, 2.0])
def test_min_p_one_keeps_only_the_max(device, temperature):
    """min_p = 1 is documented as valid ([0, 1]) and keeps tokens with probability >= the largest
    one: exactly the argmax (or the tied maxima), logprob 0 -- at any temperature."""
    g = torch.Generator().manual_seed(16)
    logits = (torch.randn(64, 5, generator=g) * 3).to(device)
    out = sample(logits, temperature=temperature, min_p=1.0, seed=0)
    want = logits.cpu().argmax(1)
    bad = torch.nonzero(out.tokens.cpu() != want).flatten()
    assert bad.numel() == 0, (
        f"temperature={temperature}, min_p=1: {bad.numel()} of 64 rows not the argmax; first: row "
        f"{bad[0].item()} logits {logits[bad[0]].tolist()} -> token {out.tokens[bad[0]].item()} "
        f"(logprob {out.logprobs[bad[0]].item()}), expected {want[bad[0]].item()}")
    assert (out.logprobs == 0).all()


# ---- reproducibility and row independence -------------------------------------------------


def _random_rows(B, V, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 0.3).to(device)  # close to uniform: draws spread out


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_offset_identical(device):
    x = _random_rows(200, 64, 0, device)
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, epsilon=0.05, seed=1234, offset=77)
    a, b = sample(x, **kw), sample(x, **kw)
    for f in SampleOutput._fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("device", DEVICES)
def test_different_offsets_and_seeds_differ(device):
    """P(same token) ~ 1/64 per row for independent draws; 2000 rows: expect ~31 equal. Offsets
    and seeds that differ only in their high 32 bits must give different streams too."""
    x = _random_rows(2000, 64, 1, device)
    base = sample(x, seed=5, offset=0).tokens
    for kw in (dict(seed=5, offset=1), dict(seed=5, offset=2**32), dict(seed=6, offset=0),
               dict(seed=5 + 2**32, offset=0), dict(seed=2**63 - 1, offset=2**63 - 1)):
        other = sample(x, **kw).tokens
        frac = (other == base).double().mean().item()
        assert frac < 0.05, (kw, frac)
    # and rows within one call differ from each other (counter includes the row index)
    same_rows = sample(torch.zeros(2000, 64, device=device), seed=5).tokens
    assert same_rows.unique().numel() == 64


@pytest.mark.parametrize("device", DEVICES)
def test_row_independent_of_other_rows(device):
    """A row's draw depends on (seed, offset, row index, its own row) only: same as alone (index 0),
    same with different neighbours (logits and per-row parameters), same when rows are appended."""
    x = _random_rows(3, 50, 2, device)
    row, o1, o2 = x[0:1], x[1:2], x[2:3] * 5
    for off in range(30):
        kw = dict(seed=99, offset=off, top_p=0.9, epsilon=0.1)
        alone = sample(row, **kw).tokens
        assert sample(torch.cat([row, o1]), **kw).tokens[0] == alone[0]
        assert sample(torch.cat([row, o2]), **kw).tokens[0] == alone[0]
        a1 = sample(torch.cat([o1, row]), **kw).tokens[1]
        assert sample(torch.cat([o2, row]), **kw).tokens[1] == a1
        # per-row parameters of the neighbour change nothing either
        t1 = torch.tensor([0.9, 0.1], device=device)
        t2 = torch.tensor([0.9, 1.0], device=device)
        k1 = torch.tensor([0, 1], device=device)
        k2 = torch.tensor([0, 3], device=device)
        r1 = sample(torch.cat([row, o1]), seed=99, offset=off, top_p=t1, top_k=k1).tokens[0]
        r2 = sample(torch.cat([row, o2]), seed=99, offset=off, top_p=t2, top_k=k2).tokens[0]
        assert r1 == r2

    big = _random_rows(128, 50, 3, device)
    hist = torch.randint(-1, 50, (128, 5), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(seed=3, offset=8, temperature=0.8, top_k=20, repetition_penalty=1.3)
    full = sample(big, token_history=hist, **kw)
    half = sample(big[:64], token_history=hist[:64], **kw)
    swapped = sample(torch.cat([big[:64], big[64:].flip(0)]), token_history=torch.cat([hist[:64], hist[64:].flip(0)]),
                     **kw)
    for f in SampleOutput._fields:
        assert torch.equal(getattr(full, f)[:64], getattr(half, f)), f
        assert torch.equal(getattr(full, f)[:64], getattr(swapped, f)[:64]), f


def test_same_tokens_for_any_thread_count():
    x = _random_rows(257, 300, 4, "cpu")
    kw = dict(seed=1, offset=2, top_k=50, top_p=0.9, min_p=0.01, temperature=0.7, epsilon=0.02)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = sample(x, **kw)
        torch.set_num_threads(2)
        b = sample(x, **kw)
    finally:
        torch.set_num_threads(before)
    for f in SampleOutput._fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("device", DEVICES)
def test_seed_none_follows_torch_manual_seed(device):
    x = _random_rows(500, 64, 5, device)
    torch.manual_seed(0)
    a = sample(x).tokens
    torch.manual_seed(0)
    b = sample(x).tokens
    torch.manual_seed(1)
    c = sample(x).tokens
    assert torch.equal(a, b)
    assert (a == c).double().mean() < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_single_token_vocab(device):
    out = sample(torch.empty(0, 7, device=device), top_k=3, seed=0)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,) and out.raw_logprobs.shape == (0,)
    assert out.tokens.dtype == torch.int64
    out = sample(torch.randn(5, 1, device=device), top_p=0.5, epsilon=0.3, seed=0)
    assert (out.tokens == 0).all() and (out.logprobs == 0).all() and (out.raw_logprobs == 0).all()


# ---- impl="reference" ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["none", "top_k_top_p", "epsilon_filters", "penalties_filters", "greedy_epsilon"])
def test_reference_impl(device, case):
    """impl='reference' draws from the same distribution (support, frequencies, logprobs) and is
    reproducible given seed / offset."""
    logits = base_logits(device)
    params = case_params(case, device)
    check_distribution(logits, params, what=f"reference {case}", impl="reference", repeats=250, offsets=range(4))
    a = sample(logits, **params, seed=3, offset=1, impl="reference")
    b = sample(logits, **params, seed=3, offset=1, impl="reference")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


# ---- opcheck and torch.compile ------------------------------------------------------------


def op_args(logits, seed=0, offset=0, **params):
    """Positional arguments of torch.ops.fastrlhf.sample in schema order."""
    args = [logits]
    for name in PARAM_ORDER:
        v = params.get(name, DEFAULTS[name])
        args += [v, DEFAULTS[name]] if isinstance(v, torch.Tensor) else [None, v]
    return (*args, params.get(H), seed, offset, params.get("row_ids"))


def opcheck_inputs(device):
    logits = base_logits(device)
    yield op_args(logits)
    yield op_args(logits, seed=7, offset=3, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, epsilon=0.1)
    yield op_args(logits.to(torch.bfloat16), seed=1, offset=2**40, token_history=base_history(device),
                  repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)
    yield op_args(logits, seed=2, offset=1,
                  temperature=torch.tensor([1.0, 0.0, 0.7, 2.0], device=device),
                  top_k=torch.tensor([0, 1, 3, 100], device=device),
                  top_p=torch.tensor([1.0, 0.5, 0.9, 0.8], device=device),
                  epsilon=torch.tensor([0.0, 0.1, 0.0, 1.0], device=device),
                  repetition_penalty=torch.tensor([1.0, 1.2, 0.8, 1.0], device=device),
                  token_history=base_history(device))
    yield op_args(logits, seed=3, offset=5, temperature=0.9, row_ids=torch.tensor([7, 0, 3, 2**40], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_row_ids_make_a_rows_draw_independent_of_the_batch(device, impl):
    """What a generation loop relies on when it drops finished rows: with row_ids, a row's token
    depends on (seed, offset, row id) only, not on its position or on the other rows."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g).to(device)
    ids = torch.arange(6, device=device)
    for offset in range(5):
        full = sample(logits, temperature=1.5, seed=9, offset=offset, row_ids=ids, impl=impl).tokens
        keep = torch.tensor([5, 1, 3], device=device)
        part = sample(logits[keep], temperature=1.5, seed=9, offset=offset, row_ids=ids[keep], impl=impl).tokens
        assert torch.equal(part, full[keep])
    plain = torch.stack([sample(logits, temperature=1.5, seed=9, offset=o, impl=impl).tokens for o in range(8)])
    shifted = torch.stack([sample(logits, temperature=1.5, seed=9, offset=o, row_ids=ids + 1, impl=impl).tokens
                           for o in range(8)])
    assert not torch.equal(plain, shifted)  # the row id is part of the counter
    with pytest.raises(ValueError, match=r"row_ids must have shape \(6,\)"):
        sample(logits, row_ids=ids[:3], impl=impl)
    with pytest.raises(TypeError, match="row_ids must be an integer tensor"):
        sample(logits, row_ids=ids.float(), impl=impl)
    with pytest.raises(ValueError, match="row_ids must be >= 0"):
        sample(logits, row_ids=ids - 1, impl=impl)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in opcheck_inputs(device):
        torch.library.opcheck(torch.ops.fastrlhf.sample.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_python_api(device):
    """The op called positionally gives exactly what fastrlhf.ops.sample gives."""
    logits = base_logits(device)
    params = dict(temperature=0.8, top_k=5, top_p=0.9, epsilon=0.1, token_history=base_history(device),
                  presence_penalty=0.5)
    got = torch.ops.fastrlhf.sample.default(*op_args(logits, seed=4, offset=6, **params))
    want = sample(logits, **params, seed=4, offset=6)
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(x):
        out = sample(x, temperature=0.8, top_k=5, top_p=0.9, min_p=0.02, epsilon=0.1, seed=1234, offset=3)
        return out.tokens, out.logprobs * 2.0, out.raw_logprobs

    def f_rows(x, t, k, h):
        out = sample(x, temperature=t, top_k=k, token_history=h, repetition_penalty=1.2, seed=7, offset=1,
                     validate=False)
        return out.tokens, out.logprobs, out.raw_logprobs

    x = _random_rows(16, 40, 6, device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), f(x)):
        assert torch.equal(got, want)
    t = torch.linspace(0.0, 2.0, 16, device=device)
    k = torch.arange(16, device=device)
    h = torch.randint(-1, 40, (16, 6), generator=torch.Generator().manual_seed(0)).to(device)
    compiled = torch.compile(f_rows, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, t, k, h), f_rows(x, t, k, h)):
        assert torch.equal(got, want)


# ---- bad input ----------------------------------------------------------------------------


def _x():
    return torch.randn(2, 5)


NAN_LOGITS = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, float("nan"), 1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x: sample(NAN_LOGITS, seed=0), (RuntimeError, ValueError), "NaN"),
        (lambda x: sample(NAN_LOGITS, temperature=0.0, seed=0), (RuntimeError, ValueError), "NaN"),
        (lambda x: sample(NAN_LOGITS.bfloat16(), top_k=2, seed=0), (RuntimeError, ValueError), "NaN"),
        (lambda x: sample(NAN_LOGITS, seed=0, impl="reference"), (RuntimeError, ValueError), "NaN"),
        (lambda x: sample(x, top_p=0.0), ValueError, "top_p"),
        (lambda x: sample(x, top_p=1.5), ValueError, "top_p"),
        (lambda x: sample(x, top_p=-0.5), ValueError, "top_p"),
        (lambda x: sample(x, temperature=-0.1), ValueError, "temperature"),
        (lambda x: sample(x, temperature=float("nan")), ValueError, "temperature"),
        (lambda x: sample(x, temperature=float("inf")), ValueError, "temperature"),
        (lambda x: sample(x, temperature="hot"), TypeError, "temperature"),
        (lambda x: sample(x, temperature=True), TypeError, "temperature"),
        (lambda x: sample(x, top_k=-1), ValueError, "top_k"),
        (lambda x: sample(x, top_k=2.5), TypeError, "top_k"),
        (lambda x: sample(x, top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
        (lambda x: sample(x, min_p=1.5), ValueError, "min_p"),
        (lambda x: sample(x, min_p=-0.1), ValueError, "min_p"),
        (lambda x: sample(x, epsilon=1.5), ValueError, "epsilon"),
        (lambda x: sample(x, epsilon=-0.01), ValueError, "epsilon"),
        (lambda x: sample(x, repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (lambda x: sample(x, repetition_penalty=-1.0), ValueError, "repetition_penalty"),
        (lambda x: sample(x, presence_penalty=float("inf")), ValueError, "presence_penalty"),
        (lambda x: sample(x, frequency_penalty=float("nan")), ValueError, "frequency_penalty"),
        (lambda x: sample(x, temperature=torch.ones(3)), ValueError, "temperature"),
        (lambda x: sample(x, top_p=torch.ones(2, 1)), ValueError, "top_p"),
        (lambda x: sample(x, top_k=torch.ones(1, dtype=torch.int64)), ValueError, "top_k"),
        (lambda x: sample(x, top_p=torch.tensor([0.5, 0.0])), ValueError, r"top_p\[1\]"),
        (lambda x: sample(x, top_p=torch.tensor([1.2, 0.5])), ValueError, r"top_p\[0\]"),
        (lambda x: sample(x, temperature=torch.tensor([1.0, -1.0])), ValueError, r"temperature\[1\]"),
        (lambda x: sample(x, temperature=torch.tensor([float("nan"), 1.0])), ValueError, r"temperature\[0\]"),
        (lambda x: sample(x, top_k=torch.tensor([-2, 1])), ValueError, r"top_k\[0\]"),
        (lambda x: sample(x, min_p=torch.tensor([0.1, 2.0])), ValueError, r"min_p\[1\]"),
        (lambda x: sample(x, epsilon=torch.tensor([0.1, 1.01])), ValueError, r"epsilon\[1\]"),
        (lambda x: sample(x, repetition_penalty=torch.tensor([0.0, 1.0])), ValueError, r"repetition_penalty\[0\]"),
        (lambda x: sample(x, token_history=torch.tensor([[0, 5], [1, 2]])), ValueError, "token_history"),
        (lambda x: sample(x, token_history=torch.tensor([[0, -2], [1, 2]])), ValueError, "token_history"),
        (lambda x: sample(x, token_history=torch.tensor([0, 1])), ValueError, "token_history"),
        (lambda x: sample(x, token_history=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "token_history"),
        (lambda x: sample(x, token_history=torch.zeros(2, 2)), TypeError, "token_history"),
        (lambda x: sample(x, token_history=torch.zeros(2, 2, dtype=torch.bool)), TypeError, "token_history"),
        (lambda x: sample(x, token_history=[[0], [1]]), TypeError, "token_history"),
        (lambda x: sample(x[0]), ValueError, "logits"),
        (lambda x: sample(x[None]), ValueError, "logits"),
        (lambda x: sample(torch.empty(2, 0)), ValueError, "logits"),
        (lambda x: sample(torch.ones(2, 5, dtype=torch.int64)), TypeError, "logits"),
        (lambda x: sample(x.tolist()), TypeError, "logits"),
        (lambda x: sample(x, seed=-1), ValueError, "seed"),
        (lambda x: sample(x, seed=2**63), ValueError, "seed"),
        (lambda x: sample(x, seed=1.5), ValueError, "seed"),
        (lambda x: sample(x, seed=0, offset=-1), ValueError, "offset"),
        (lambda x: sample(x, impl="fast"), ValueError, "impl"),
        # validate=False skips only value checks of tensors: shapes and scalars are still checked
        (lambda x: sample(x, top_p=torch.ones(3), validate=False), ValueError, "top_p"),
        (lambda x: sample(x, top_p=0.0, validate=False), ValueError, "top_p"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_x())


def test_kernel_op_rejects_bad_input_directly():
    """torch.ops.fastrlhf.sample checks too (RuntimeError naming the argument)."""
    x = _x()
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.fastrlhf.sample.default(*op_args(NAN_LOGITS))
    big_nan = torch.randn(64, 100)
    big_nan[37, 99] = float("nan")  # one NaN in one row of many, in the tail of the row
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.fastrlhf.sample.default(*op_args(big_nan, top_k=5))
    with pytest.raises(RuntimeError, match="top_p"):
        torch.ops.fastrlhf.sample.default(*op_args(x, top_p=torch.ones(3)))
    with pytest.raises(RuntimeError, match="token_history"):
        torch.ops.fastrlhf.sample.default(*op_args(x, token_history=torch.zeros(2, 3, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="token_history"):
        torch.ops.fastrlhf.sample.default(*op_args(x, token_history=torch.zeros(3, 3, dtype=torch.int64)))
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.fastrlhf.sample.default(*op_args(torch.ones(2, 5, dtype=torch.int64)))
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.fastrlhf.sample.default(*op_args(torch.ones(5)))


def test_exports():
    assert fastrlhf.ops.sample is sample
    assert fastrlhf.ops.SampleOutput is SampleOutput
    assert SampleOutput._fields == ("tokens", "logprobs", "raw_logprobs")


# ---- rows without a distribution: NaN, +inf, all -inf (a named error, never a silent draw) ----


def _bad_rows():
    g = torch.Generator().manual_seed(7)
    pinf = torch.randn(3, 10, generator=g)
    pinf[1, 3] = float("inf")
    ninf = torch.randn(3, 10, generator=g)
    ninf[2] = float("-inf")
    nan = torch.randn(3, 10, generator=g)
    nan[0, 5] = float("nan")
    return [(pinf, r"row 1 of logits holds \+inf at token 3"), (ninf, "row 2 of logits is all -inf"),
            (nan, "row 0 of logits holds NaN")]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_rows_without_a_distribution_raise_naming_the_row(case, impl):
    logits, match = _bad_rows()[case]
    with pytest.raises(ValueError, match=match):
        sample(logits, seed=0, impl=impl)


@pytest.mark.parametrize("case", range(3))
def test_unvalidated_cpu_kernel_still_names_the_row(case):
    logits, _ = _bad_rows()[case]
    row = [1, 2, 0][case]
    with pytest.raises(RuntimeError, match=f"row {row} of logits"):
        sample(logits, seed=0, validate=False, impl="kernel")


def test_some_minus_inf_is_fine_and_never_drawn():
    logits = torch.randn(4, 10)
    logits[:, 5:] = float("-inf")
    out = sample(logits, seed=1, impl="kernel")
    assert bool((out.tokens < 5).all()) and torch.isfinite(out.logprobs).all()
