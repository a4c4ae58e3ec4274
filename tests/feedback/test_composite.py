"""CompositeFeedback: weighting, running normalization, clipping, repeats, agreement, compare."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastrlhf.feedback import CallableJudge, CompositeFeedback, Judge, SimulatedAnnotator

LEN = CallableJudge(lambda p, c: float(len(c)), "len")
NEG_LEN = CallableJudge(lambda p, c: -10.0 * len(c), "neg_len")
VOWELS = CallableJudge(lambda p, c: float(sum(ch in "aeiou" for ch in c)), "vowels")


def zscore(x, mean, std):
    return (x - mean) / std


def test_weighted_normalized_sum_and_raw_signals():
    comp = CompositeFeedback({"len": (LEN, 2.0), "vowels": (VOWELS, -0.5)})
    P, C = ["p"] * 4, ["a", "bbb", "aeio", "xyzzyx"]
    scores, raw = comp.score_signals(P, C)
    ln, vw = torch.tensor([1.0, 3, 4, 6]), torch.tensor([1.0, 0, 4, 0])
    torch.testing.assert_close(raw["len"], ln)
    torch.testing.assert_close(raw["vowels"], vw)
    expected = 2.0 * zscore(ln, ln.mean(), ln.std(unbiased=False)) - 0.5 * zscore(vw, vw.mean(), vw.std(unbiased=False))
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(comp.score(P, C), scores)  # same batch again: same statistics
    st = comp.last_stats
    assert st["len/mean"] == pytest.approx(3.5) and st["len/norm_mean"] == pytest.approx(0.0, abs=1e-6)
    assert st["len/running_std"] == pytest.approx(float(ln.std(unbiased=False)))
    # list form, no normalization: the plain weighted sum
    plain = CompositeFeedback([("len", LEN, 2.0), ("vowels", VOWELS, -0.5)], normalize=False)
    torch.testing.assert_close(plain.score(P, C), 2.0 * ln - 0.5 * vw)
    # a bare judge gets weight 1
    torch.testing.assert_close(CompositeFeedback({"len": LEN}, normalize=False).score(P, C), ln)


def test_running_statistics_over_calls_and_state_round_trip():
    comp = CompositeFeedback({"len": (LEN, 1.0)})
    batches = [["a", "bb"], ["ccc", "dddd", "eeeee"], ["ffffff"]]
    seen = []
    for b in batches:
        comp.score(["p"] * len(b), b)
        seen += [float(len(c)) for c in b]
    t = torch.tensor(seen, dtype=torch.float64)
    assert comp.stats["len"].count == 6
    assert comp.stats["len"].mean == pytest.approx(float(t.mean()))
    assert comp.stats["len"].std == pytest.approx(float(t.std(unbiased=False)))
    state = comp.state_dict()
    restored = CompositeFeedback({"len": (LEN, 1.0)})
    restored.load_state_dict(state)
    nxt = ["abcdefgh", "a"]
    torch.testing.assert_close(restored.score(["p", "p"], nxt), comp.score(["p", "p"], nxt))
    with pytest.raises(ValueError, match="signals"):
        CompositeFeedback({"other": (LEN, 1.0)}).load_state_dict(state)
    comp.reset_stats()
    assert comp.stats["len"].count == 0


def test_state_includes_judges_with_state():
    ann = SimulatedAnnotator(lambda p, c: float(len(c)), flip_prob=0.5, seed=4)
    comp = CompositeFeedback({"len": (LEN, 1.0), "human": (ann, 1.0)})
    P, A, B = ["p"] * 50, ["a" * i for i in range(50)], ["b" * (49 - i) for i in range(50)]
    comp.compare(P, A, B)
    state = json.loads(json.dumps(comp.state_dict()))
    nxt = comp.compare(P, A, B)
    other = CompositeFeedback({"len": (LEN, 1.0), "human": (SimulatedAnnotator(lambda p, c: float(len(c)),
                                                                                flip_prob=0.5), 1.0)})
    other.load_state_dict(state)
    torch.testing.assert_close(other.compare(P, A, B), nxt, equal_nan=True)


def test_first_single_score_is_only_centred():
    comp = CompositeFeedback({"len": (LEN, 1.0)})
    assert comp.score(["p"], ["abc"]).item() == 0.0


def test_clipping_each_normalized_signal():
    comp = CompositeFeedback({"len": (LEN, 1.0)}, clip=1.0)
    C = ["a"] * 9 + ["a" * 50]
    s = comp.score(["p"] * 10, C)
    assert s.max().item() == 1.0 and s.min().item() >= -1.0
    raw_clip = CompositeFeedback({"len": (LEN, 3.0)}, normalize=False, clip=2.0)
    torch.testing.assert_close(raw_clip.score(["p", "p"], ["a", "abcd"]), torch.tensor([3.0, 6.0]))


class Sequenced(Judge):
    """A stochastic judge stand-in: call k returns values[k] for every row."""

    name = "noisy"

    def __init__(self, values):
        self.values, self.calls = values, 0

    def score(self, prompts, completions):
        v = self.values[self.calls % len(self.values)]
        self.calls += 1
        return torch.full((len(prompts),), float(v))


@pytest.mark.parametrize("aggregate,expected", [("mean", 10 / 3), ("median", 0.0)])
def test_repeats_are_aggregated(aggregate, expected):
    judge = Sequenced([0.0, 0.0, 10.0])
    comp = CompositeFeedback({"noisy": (judge, 1.0), "len": (LEN, 1.0)}, repeats={"noisy": 3}, aggregate=aggregate,
                             normalize=False)
    _, raw = comp.score_signals(["p", "p"], ["a", "b"])
    assert judge.calls == 3
    torch.testing.assert_close(raw["noisy"], torch.full((2,), expected))


def test_agreement_and_spearman_report_disagreement():
    P, C = ["p"] * 5, ["a", "bb", "ccc", "dddd", "eeeee"]
    anti = CompositeFeedback({"len": (LEN, 1.0), "neg_len": (NEG_LEN, 1.0)})
    anti.score(P, C)
    assert anti.last_stats["spearman/len|neg_len"] == pytest.approx(-1.0)
    assert anti.last_stats["agreement/len|neg_len"] == pytest.approx(0.2)  # only the centred zero agrees
    aligned = CompositeFeedback({"len": (LEN, 1.0), "neg_len": (NEG_LEN, -1.0)})  # a negative weight aligns them
    aligned.score(P, C)
    assert aligned.last_stats["agreement"] == pytest.approx(1.0)
    single = CompositeFeedback({"len": (LEN, 1.0)})
    single.score(P, C)
    assert single.last_stats["agreement"] == 1.0


def test_compare_mixes_signals_with_smoothing_and_drops_disagreement():
    ann = SimulatedAnnotator(lambda p, c: float("good" in c))  # a comparison-style judge: hard labels
    comp = CompositeFeedback({"len": (LEN, 1.0), "human": (ann, 3.0)}, normalize=False)
    P, A, B = ["p"] * 3, ["good", "bad answer", "goodness!"], ["meh", "good", "good"]
    p = comp.compare(P, A, B)
    p_len = torch.sigmoid(torch.tensor([4.0 - 3, 10 - 4, 9 - 4]))
    human = torch.tensor([1.0, 0.0, 0.5])  # "goodness!" vs "good": both contain "good": a tie
    torch.testing.assert_close(p, (p_len + 3 * human) / 4)
    assert comp.last_stats["kept"] == 1.0 and bool(comp.last_mask.all())
    # equal weights: on pair 1 the signals disagree (agreement 1/2); on pair 2 the annotator ties
    # (counts half: agreement 3/4)
    strict = CompositeFeedback({"len": (LEN, 1.0), "human": (ann, 1.0)}, normalize=False, min_agreement=0.9,
                               label_smoothing=0.2)
    q = strict.compare(P, A, B)
    assert math.isnan(q[1].item()) and not math.isnan(q[0].item())
    assert strict.last_stats["pair_agreement"] == pytest.approx((1 + 0.5 + 0.75) / 3)
    assert strict.last_mask.tolist() == [True, False, False]
    assert q[0].item() == pytest.approx(0.8 * (p_len[0].item() + 1.0) / 2 + 0.1)
    assert strict.last_stats["agreement/len|human"] == pytest.approx(1 / 3)


def test_compare_on_the_normalized_scale_updates_statistics():
    comp = CompositeFeedback({"neg_len": (NEG_LEN, 1.0)})
    p = comp.compare(["p", "p"], ["a", "aaa"], ["aa", "a"])
    raw = torch.tensor([-10.0, -30, -20])  # "a" answers "p" twice: one answer, scored once
    z = (raw - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(p, torch.sigmoid(z[[0, 1]] - z[[2, 0]]))
    assert comp.stats["neg_len"].count == 3


def test_compare_scores_each_distinct_answer_once():
    calls = []

    def length(prompt, completion):
        calls.append((prompt, completion))
        return float(len(completion))

    comp = CompositeFeedback({"len": (CallableJudge(length, "len"), 1.0), "vowels": (VOWELS, 0.5)})
    answers = ["a", "bb", "ccc", "dddd"]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]  # every pair of 4 answers, as the loop labels
    prompts = ["p"] * len(pairs) + ["q"]
    a = [answers[i] for i, _ in pairs] + ["a"]
    b = [answers[j] for _, j in pairs] + ["bb"]
    p = comp.compare(prompts, a, b)
    assert sorted(calls) == sorted([("p", x) for x in answers] + [("q", "a"), ("q", "bb")])
    assert p.shape == (7,) and bool(torch.isfinite(p).all())
    fresh = CompositeFeedback({"len": (CallableJudge(length, "len"), 1.0), "vowels": (VOWELS, 0.5)})
    fresh.score(  # the same statistics as scoring the distinct answers directly
        ["p"] * 4 + ["q", "q"], answers + ["a", "bb"])
    assert fresh.stats["len"].count == comp.stats["len"].count == 6
    assert fresh.stats["len"].mean == pytest.approx(comp.stats["len"].mean)


def test_default_compare_scores_each_distinct_answer_once():
    seen = []

    class Counting(Judge):
        def score(self, prompts, completions):
            seen.append(list(completions))
            return torch.tensor([float(len(c)) for c in completions])

    p = Counting().compare(["p", "p", "q"], ["a", "a", "a"], ["bb", "ccc", "bb"])
    assert seen == [["a", "a", "bb", "ccc", "bb"]]  # (p, a) once; (q, a) is another prompt's answer
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([1.0 - 2, 1 - 3, 1 - 2])))


def test_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        CompositeFeedback({})
    with pytest.raises(TypeError, match="not a Judge"):
        CompositeFeedback({"x": (lambda p, c: 1.0, 1.0)})
    with pytest.raises(ValueError, match="weight"):
        CompositeFeedback({"x": (LEN, float("nan"))})
    with pytest.raises(ValueError, match="twice"):
        CompositeFeedback([("x", LEN, 1.0), ("x", VOWELS, 1.0)])
    with pytest.raises(ValueError, match="tuples"):
        CompositeFeedback([("x", LEN)])
    for kw in (dict(clip=0), dict(aggregate="max"), dict(min_agreement=1.5), dict(label_smoothing=-0.1),
               dict(repeats={"nope": 2}), dict(repeats=0)):
        with pytest.raises(ValueError, match="CompositeFeedback"):
            CompositeFeedback({"len": (LEN, 1.0)}, **kw)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        CompositeFeedback({"len": (LEN, 1.0)}).score(["a", "b"], ["c"])
