"""Win-rates and agreement with cluster-bootstrap confidence intervals (fastrlhf.feedback.evaluation)."""

import math
import random

import pytest
import torch

from fastrlhf.feedback import CallableJudge, SimulatedAnnotator
from fastrlhf.feedback.evaluation import Estimate, agreement, rate_estimate, win_rate


def short_is_better(prompt, completion):
    return -float(len(completion))


def test_rate_estimate_value_and_interval_brackets_it():
    x = torch.tensor([1.0] * 30 + [0.0] * 10)
    est = rate_estimate(x)
    assert est.value == pytest.approx(0.75)
    assert est.n == 40 and est.groups == 40
    assert est.low < 0.75 < est.high
    # the binomial standard error is sqrt(.75 * .25 / 40) = 0.068: a 95% interval about +- 0.13
    assert 0.09 < est.high - 0.75 < 0.17 and 0.09 < 0.75 - est.low < 0.17
    assert rate_estimate(x) == est  # seeded: reproducible


def test_rate_estimate_interval_covers_at_the_nominal_rate():
    """Over many simulated studies with a known rate, the 90% interval covers it about 90% of the time."""
    rng = torch.Generator().manual_seed(0)
    covered = 0
    trials = 300
    for t in range(trials):
        x = (torch.rand(60, generator=rng) < 0.7).double()
        est = rate_estimate(x, confidence=0.9, resamples=500, seed=t)
        covered += est.low <= 0.7 <= est.high
    assert 0.83 <= covered / trials <= 0.96


def test_cluster_bootstrap_is_wider_for_correlated_groups():
    """Four identical outcomes per prompt carry the information of one: resampling prompts (the
    groups) must give a wider interval than treating the 4 x 20 outcomes as independent."""
    per_prompt = torch.tensor([1.0] * 13 + [0.0] * 7)
    x = per_prompt.repeat_interleave(4)  # [80], a prompt's 4 outcomes adjacent
    groups = [i // 4 for i in range(80)]
    naive = rate_estimate(x)
    clustered = rate_estimate(x, groups)
    assert clustered.value == naive.value == pytest.approx(0.65)
    assert clustered.groups == 20 and clustered.n == 80
    assert (clustered.high - clustered.low) > 1.6 * (naive.high - naive.low)  # about 2x (sqrt of 4)


def test_rate_estimate_edge_cases_and_errors():
    empty = rate_estimate(torch.zeros(0))
    assert math.isnan(empty.value) and empty.n == 0 and str(empty) == "n/a"
    const = rate_estimate(torch.ones(10))
    assert const.value == const.low == const.high == 1.0
    with pytest.raises(ValueError, match="confidence"):
        rate_estimate(torch.ones(3), confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        rate_estimate(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="group keys"):
        rate_estimate(torch.ones(3), groups=[0, 1])
    with pytest.raises(ValueError, match="resamples"):
        rate_estimate(torch.ones(3), resamples=0)


def test_estimate_metrics_and_text():
    est = Estimate(0.8, 0.7, 0.9, 96, 24)
    assert est.as_metrics("win_rate") == {"win_rate": 0.8, "win_rate/low": 0.7, "win_rate/high": 0.9,
                                          "win_rate/n": 96.0}
    assert str(est) == "80% (95% CI 70%-90%, 96 comparisons over 24 prompts)"


def test_win_rate_counts_ties_half_and_groups_by_prompt():
    judge = CallableJudge(short_is_better)
    prompts = ["p1", "p1", "p2", "p2"]
    new = ["a", "aaa", "bb", "b"]
    old = ["aa", "aa", "bb", "bbbb"]
    est = win_rate(judge, prompts, new, old)
    assert est.value == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert est.n == 4 and est.groups == 2
    # the hidden truth of a simulated annotator decides, not its noisy labels
    truth = SimulatedAnnotator(short_is_better, flip_prob=0.5, seed=0)
    assert win_rate(truth, prompts, new, old).value == est.value
    with pytest.raises(ValueError, match="3 prompts"):
        win_rate(judge, prompts[:3], new, old)


def test_win_rate_compares_all_samples_of_a_prompt():
    judge = CallableJudge(short_is_better)
    prompts = ["p1", "p1", "p2", "p2"]
    new = ["a", "aaa", "bb", "b"]
    old = ["aa", "aa", "bb", "bbbb"]
    est = win_rate(judge, prompts, new, old, samples=2)
    # p1: a beats aa twice, aaa loses twice; p2: bb ties bb, beats bbbb; b beats both
    assert est.value == pytest.approx((1 + 1 + 0 + 0 + 0.5 + 1 + 1 + 1) / 8)
    assert est.n == 8 and est.groups == 2
    assert win_rate(judge, prompts, new, old, samples=2, groups=["x"] * 4).groups == 1
    with pytest.raises(ValueError, match="divide the 4 answers"):
        win_rate(judge, prompts, new, old, samples=3)


def test_agreement_against_a_truth():
    truth = SimulatedAnnotator(short_is_better)
    rng = random.Random(0)
    a = ["x" * rng.randint(1, 20) for _ in range(200)]
    b = ["x" * rng.randint(1, 20) for _ in range(200)]
    prompts = [f"p{i // 2}" for i in range(200)]
    ties = sum(len(x) == len(y) for x, y in zip(a, b))
    assert agreement(truth, truth, prompts, a, b).value == 1.0
    same = agreement(truth, truth, prompts, a, b)
    assert same.n == 200 - ties  # the truth's ties are left out
    reverse = CallableJudge(lambda p, c: float(len(c)))
    assert agreement(reverse, truth, prompts, a, b).value == 0.0
    constant = CallableJudge(lambda p, c: 0.0)
    assert agreement(constant, truth, prompts, a, b).value == 0.5  # the judge's ties count half
