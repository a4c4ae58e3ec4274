"""SimulatedAnnotator: hidden utility, hard labels, Bradley-Terry noise, flips, determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastrlhf.feedback import Judge, SimulatedAnnotator, friendly_concise


def length_utility(prompt, completion):
    return float(len(completion))


def test_noiseless_labels_are_the_truth_with_ties_at_half():
    ann = SimulatedAnnotator(length_utility)
    assert isinstance(ann, Judge) and ann.name == "simulated_length_utility"
    labels = ann.compare(["p"] * 3, ["aaa", "a", "ab"], ["a", "aaa", "cd"])
    torch.testing.assert_close(labels, torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(ann.score(["p", "p"], ["abc", ""]), torch.tensor([3.0, 0.0]))


def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    la, lb = torch.randint(0, 50, (n,), generator=g), torch.randint(0, 50, (n,), generator=g)
    keep = la != lb
    return ["p"] * int(keep.sum()), ["x" * int(v) for v in la[keep]], ["x" * int(v) for v in lb[keep]]


def test_flip_rate_matches_flip_prob():
    P, A, B = pairs(4000)
    ann = SimulatedAnnotator(length_utility, flip_prob=0.2, seed=1)
    agree = ann.agreement(P, A, B)
    n = len(P)
    assert abs((1 - agree) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)  # within 4 standard errors
    assert SimulatedAnnotator(length_utility).agreement(P, A, B) == 1.0
    assert math.isnan(SimulatedAnnotator(length_utility).agreement(["p"], ["a"], ["b"]))


def test_seeded_and_reproducible():
    P, A, B = pairs(200)
    a1 = SimulatedAnnotator(length_utility, flip_prob=0.3, bt_temperature=5.0, seed=7)
    a2 = SimulatedAnnotator(length_utility, flip_prob=0.3, bt_temperature=5.0, seed=7)
    first = a1.compare(P, A, B)
    torch.testing.assert_close(first, a2.compare(P, A, B))
    assert not torch.equal(first, a1.compare(P, A, B))  # the sequence moves on ...
    a1.reset()
    torch.testing.assert_close(a1.compare(P, A, B), first)  # ... and starts over
    assert not torch.equal(first, SimulatedAnnotator(length_utility, flip_prob=0.3, bt_temperature=5.0,
                                                     seed=8).compare(P, A, B))
    assert set(first.unique().tolist()) <= {0.0, 1.0}


def test_state_round_trip_continues_the_sequence():
    P, A, B = pairs(100)
    ann = SimulatedAnnotator(length_utility, flip_prob=0.4, seed=2)
    ann.compare(P, A, B)
    state = json.loads(json.dumps(ann.state_dict()))  # JSON-friendly (trainer checkpoints)
    expected = ann.compare(P, A, B)
    resumed = SimulatedAnnotator(length_utility, flip_prob=0.4, seed=99)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.compare(P, A, B), expected)
    assert resumed.seed == 2


def test_bradley_terry_temperature():
    # utility difference d: label 1 with probability sigmoid(d / T)
    n, d, T = 4000, 2.0, 2.0
    ann = SimulatedAnnotator(lambda p, c: float(len(c)), bt_temperature=T, seed=3)
    rate = float(ann.compare(["p"] * n, ["xx"] * n, [""] * n).mean())
    expected = 1 / (1 + math.exp(-d / T))
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    # close pairs are noisier than clear ones; a low temperature is nearly deterministic
    far = float(SimulatedAnnotator(length_utility, bt_temperature=2.0).compare(["p"] * n, ["x" * 12] * n,
                                                                               [""] * n).mean())
    assert far > rate + 0.15
    cold = SimulatedAnnotator(length_utility, bt_temperature=0.01).compare(["p"] * n, ["x"] * n, [""] * n)
    assert float(cold.mean()) == 1.0


def test_argument_errors():
    for kw in (dict(flip_prob=-0.1), dict(flip_prob=0.6), dict(bt_temperature=-1.0), dict(bt_temperature=math.inf)):
        with pytest.raises(ValueError, match="SimulatedAnnotator"):
            SimulatedAnnotator(length_utility, **kw)
    with pytest.raises(TypeError, match="callable"):
        SimulatedAnnotator(3)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        SimulatedAnnotator(length_utility).compare(["a", "b"], ["c"], ["d", "e"])


def test_friendly_concise():
    friendly = "Sure, happy to help! Try a warm bath before bed. Good luck!"
    rude = "Whatever, figure it out yourself, it's not my problem, stupid."
    neutral = "Go to bed at the same time every night."
    long_friendly = friendly + " " + " ".join(["word"] * 60)
    u = [friendly_concise("q", c) for c in (friendly, rude, neutral, long_friendly, "")]
    assert u[0] > u[2] > u[1]
    assert u[3] < u[0] and u[3] == pytest.approx(u[0] - 0.5 * (len(long_friendly.split()) - 30) / 30)
    assert u[4] == -1.0
    assert "friendly" in friendly_concise.description and "beyond target_words words" in friendly_concise.description
