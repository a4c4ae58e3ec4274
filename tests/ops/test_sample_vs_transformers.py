"""fastrlhf.ops.sample's processing against Hugging Face transformers' logits processors, once, on
fixed cases: ``RepetitionPenaltyLogitsProcessor`` then ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper`` (the order of
``GenerationMixin._get_logits_processor``), renormalized by a softmax, must give
``reference.processed_distribution`` (the same kept set, the same probabilities) and the kernel's
draws (never outside transformers' kept set, every kept token of mass >= 2% drawn, the returned
``logprobs`` = log of transformers' renormalized probability of the drawn token).

Where the semantics differ on purpose (each pinned by a test below):

* ties at the top-p boundary: transformers sorts, so of several tokens with the same logit at the
  boundary it keeps those the sort puts last (an arbitrary subset); fastrlhf keeps them all (as
  at the top-k boundary, where transformers keeps ties as well);
* presence / frequency penalties are OpenAI's (``x - presence * [count > 0] - frequency *
  count``); transformers has no processor for them, so they are checked against that formula;
* ``epsilon`` is epsilon-greedy exploration (mix with a uniform distribution); transformers'
  ``EpsilonLogitsWarper`` is epsilon *sampling*, a truncation (drop tokens of probability below
  epsilon), a different thing under the same name: not compared;
* ``temperature = 0`` means greedy here; transformers' ``TemperatureLogitsWarper`` refuses 0
  (greedy is ``do_sample=False``).
"""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import reference, sample

transformers = pytest.importorskip("transformers")

B, V, L = 4, 64, 12
REPEATS, OFFSETS = 64, range(32)  # 2048 draws per row
SEED = 7


def make_logits(seed=0):
    """[B, V] fp32 logits ~ N(0, 2^2) (largest probabilities 0.1 .. 0.4, both signs, so the
    repetition penalty divides some and multiplies others) and a [B, L] token history drawn from
    the 16 most likely tokens of each row (repeats included)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g, dtype=torch.float64) * 2).float()
    top = logits.topk(16, -1).indices
    history = top.gather(1, torch.randint(0, 16, (B, L), generator=g))
    return logits, history


def hf_processed(logits, history, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """transformers' processors in GenerationMixin's order, in fp64 -> (q [B, V], kept [B, V])."""
    procs = transformers.LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(transformers.RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if temperature != 1.0:
        procs.append(transformers.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(transformers.TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        procs.append(transformers.TopPLogitsWarper(top_p=top_p))
    if min_p > 0.0:
        procs.append(transformers.MinPLogitsWarper(min_p=min_p))
    scores = procs(history, logits.double().clone())
    return torch.softmax(scores, -1), torch.isfinite(scores)


def draw(logits, history, **params):
    """The kernel, every row REPEATS times at each offset -> (tokens [n, B], logprobs [n, B])."""
    big, hist = logits.repeat(REPEATS, 1), history.repeat(REPEATS, 1)
    outs = [sample(big, token_history=hist, seed=SEED, offset=o, impl="kernel", **params) for o in OFFSETS]
    tokens = torch.cat([o.tokens.view(REPEATS, B) for o in outs])
    logprobs = torch.cat([o.logprobs.view(REPEATS, B) for o in outs])
    return tokens, logprobs


def assert_no_near_boundary(logits, history, params):
    """The case is not a coin flip at fp32 resolution: no top-p cumulative mass and no min-p ratio
    within 1e-4 of its threshold (the kernel thresholds in fp32, transformers sorts in fp64)."""
    q = reference.processed_distribution(logits.double(), token_history=history,
                                         **{k: v for k, v in params.items() if k != "top_p" and k != "min_p"})
    if params.get("top_p", 1.0) < 1.0:
        s = q.sort(-1, descending=True).values.cumsum(-1)
        assert ((s - params["top_p"]).abs() > 1e-4).all()
    if params.get("min_p", 0.0) > 0.0:
        ratio = q / q.amax(-1, keepdim=True)
        assert ((ratio - params["min_p"]).abs() > 1e-4).all()


CASES = {
    "temperature": dict(temperature=0.6),
    "top_k": dict(temperature=0.7, top_k=10),
    "top_p": dict(temperature=1.3, top_p=0.8),
    "min_p": dict(temperature=0.9, min_p=0.1),
    "top_k_then_top_p": dict(top_k=8, top_p=0.6),  # top-p on the renormalized top-k distribution
    "repetition": dict(repetition_penalty=1.5),
    "repetition_below_1": dict(repetition_penalty=0.7, temperature=1.2),
    "all": dict(repetition_penalty=1.3, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_processed_distribution_matches_transformers(case):
    params = CASES[case]
    logits, history = make_logits()
    want, kept = hf_processed(logits, history, **params)
    assert_no_near_boundary(logits, history, params)
    if case != "temperature" and not case.startswith("repetition"):
        assert (~kept).any(1).all()  # the filters cut something in every row
    got = reference.processed_distribution(logits.double(), token_history=history, **params)
    assert torch.equal(got > 0, kept)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_draws_from_transformers_distribution(case):
    """Support: no draw outside transformers' kept set, and every kept token of probability >= 2%
    drawn (2048 draws: missing one has probability < 1e-17); logprobs: log q_hf(token)."""
    params = CASES[case]
    logits, history = make_logits()
    want, kept = hf_processed(logits, history, **params)
    tokens, logprobs = draw(logits, history, **params)
    for b in range(B):
        drawn = torch.zeros(V, dtype=torch.bool)
        drawn[tokens[:, b]] = True
        assert not (drawn & ~kept[b]).any(), f"row {b}: drew {torch.nonzero(drawn & ~kept[b]).flatten().tolist()}"
        assert drawn[want[b] >= 0.02].all(), f"row {b}: never drew {torch.nonzero((want[b] >= 0.02) & ~drawn)}"
    hf_logprobs = want.log().gather(1, tokens.T).T  # [n, B]
    torch.testing.assert_close(logprobs.double(), hf_logprobs, rtol=0, atol=1e-5)


def test_top_p_ties_at_the_boundary_are_kept_transformers_keeps_a_subset():
    """The documented difference: logits [2, 1, 1, 1, 1, 0, ...] with top_p = 0.6 cross the mass
    threshold inside the four tied tokens. transformers' sort keeps some of them, fastrlhf all four;
    everything else agrees."""
    logits = torch.full((1, 16), -1.0)
    logits[0, :6] = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    history = torch.zeros(1, 1, dtype=torch.long)
    _, kept_hf = hf_processed(logits, history, top_p=0.6)
    q = reference.processed_distribution(logits.double(), top_p=0.6)
    ours = q[0] > 0
    assert ours.tolist() == [True] * 5 + [False] * 11
    tied = torch.zeros(16, dtype=torch.bool)
    tied[1:5] = True
    assert kept_hf[0, 0] and torch.equal(kept_hf[0] & ~tied, ours & ~tied)
    assert 0 < int((kept_hf[0] & tied).sum()) < 4  # transformers: an arbitrary part of the tie
    out = sample(logits.repeat(256, 1), top_p=0.6, seed=1, impl="kernel")
    assert set(out.tokens.tolist()) == {0, 1, 2, 3, 4}  # the kernel draws every tied token


def test_top_k_ties_at_the_boundary_are_kept_by_both():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    _, kept_hf = hf_processed(logits, torch.zeros(1, 1, dtype=torch.long), top_k=2)
    q = reference.processed_distribution(logits.double(), top_k=2)
    assert kept_hf[0].tolist() == (q[0] > 0).tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("params", [dict(presence_penalty=0.8), dict(frequency_penalty=0.5),
                                    dict(presence_penalty=-0.4, frequency_penalty=0.3, temperature=0.8,
                                         repetition_penalty=1.2)])
def test_presence_and_frequency_penalties_are_openais(params):
    """No transformers processor: OpenAI's definition, logits[j] -= presence * (c[j] > 0) +
    frequency * c[j] with c the token's count in the history, after the repetition penalty (applied
    with transformers' processor) and before the temperature."""
    logits, history = make_logits(seed=1)
    hist = history.clone()
    hist[:, -3:] = -1  # padding: not counted
    counts = torch.zeros(B, V, dtype=torch.float64)
    for b in range(B):
        for t in hist[b][hist[b] >= 0].tolist():
            counts[b, t] += 1
    assert (counts >= 2).any()  # frequency counts matter
    x = logits.double()
    rp = params.get("repetition_penalty", 1.0)
    if rp != 1.0:
        x = transformers.RepetitionPenaltyLogitsProcessor(penalty=rp)(
            torch.where(hist >= 0, hist, hist[:, :1]), x.clone())  # hist[:, :1]: a token already present
    x = x - params.get("presence_penalty", 0.0) * (counts > 0).double() - params.get("frequency_penalty", 0.0) * counts
    want = torch.softmax(x / params.get("temperature", 1.0), -1)
    got = reference.processed_distribution(logits.double(), token_history=hist, **params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    tokens, logprobs = draw(logits, hist, **params)
    torch.testing.assert_close(logprobs.double(), want.log().gather(1, tokens.T).T, rtol=0, atol=1e-5)
