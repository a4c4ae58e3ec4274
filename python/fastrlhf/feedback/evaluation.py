"""Evaluation with error bars: win-rates and agreement rates over prompts, with bootstrap
confidence intervals.

A win-rate over 24 prompts with one answer each moves by about 10 points between runs from
sampling alone. Here every rate comes as an :class:`Estimate` (the rate, a confidence interval,
how many comparisons and prompts it rests on), and the comparisons may hold several samples per
prompt. The interval is a *cluster* bootstrap: prompts are resampled, not single comparisons,
because answers to the same prompt are correlated (resampling comparisons would understate the
error).

* :func:`win_rate`: how often new answers beat old ones under a judge's scores or a hidden truth.
* :func:`agreement`: how often a judge orders pairs as a hidden truth does.
* :func:`rate_estimate`: the estimate itself, for any 0 / 0.5 / 1 outcomes grouped by prompt.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import torch

from fastrlhf.feedback.base import Prompt


@dataclass(frozen=True)
class Estimate:
    """A rate with a (percentile, cluster-bootstrap) confidence interval.

    Attributes:
        value: the rate (mean outcome), NaN when there are no comparisons.
        low, high: the interval's ends.
        n: the number of comparisons.
        groups: the number of distinct prompts they come from.
        confidence: the interval's level (0.95: 95%).
    """

    value: float
    low: float
    high: float
    n: int
    groups: int
    confidence: float = 0.95

    def as_metrics(self, name: str) -> dict[str, float]:
        """``{name: value, name/low: low, name/high: high, name/n: n}`` for a summary or a JSONL log."""
        return {name: self.value, f"{name}/low": self.low, f"{name}/high": self.high, f"{name}/n": float(self.n)}

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return (f"{self.value:.0%} ({self.confidence:.0%} CI {self.low:.0%}-{self.high:.0%}, "
                f"{self.n} comparisons over {self.groups} prompts)")

    def to_dict(self) -> dict:
        return asdict(self)


def _group_ids(groups: Sequence[Hashable] | None, n: int) -> torch.Tensor:
    if groups is None:
        return torch.arange(n)
    if len(groups) != n:
        raise ValueError(f"rate_estimate: got {n} outcomes but {len(groups)} group keys")
    index: dict = {}
    return torch.tensor([index.setdefault(g if isinstance(g, Hashable) else repr(g), len(index)) for g in groups],
                        dtype=torch.long)


def rate_estimate(outcomes: torch.Tensor, groups: Sequence[Hashable] | None = None, *, confidence: float = 0.95,
                  resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of ``outcomes`` with a cluster-bootstrap confidence interval.

    Each resample draws as many groups as there are, with replacement, and takes the mean outcome
    over all the comparisons of the drawn groups; the interval is the resampled means'
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.

    Args:
        outcomes: ``[N]`` outcomes (1 win, 0.5 tie, 0 loss; any float works).
        groups: ``N`` keys, one per outcome: outcomes with the same key (answers to one prompt) are
            resampled together. None: every outcome is its own group.
        confidence: the interval's level, in (0, 1).
        resamples: bootstrap resamples.
        seed: the resampling's seed (the interval is reproducible).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"rate_estimate: confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"rate_estimate: resamples must be >= 1, got {resamples}")
    x = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("rate_estimate: outcomes must be finite")
    n = x.numel()
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, confidence)
    gid = _group_ids(groups, n)
    g = int(gid.max()) + 1
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, gid, x)  # [G] outcome sum per group
    counts = torch.bincount(gid, minlength=g).double()  # [G]
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, g, (resamples, g), generator=gen)  # [R, G] groups drawn per resample
    means = sums[draw].sum(1) / counts[draw].sum(1)  # [R]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return Estimate(float(x.mean()), low, high, n, g, confidence)


def _scores(scorer, prompts, completions) -> torch.Tensor:
    """A hidden truth's utility (a SimulatedAnnotator) or a judge's scores."""
    fn = scorer.utility if hasattr(scorer, "utility") else scorer.score
    return fn(list(prompts), list(completions)).double()


def win_rate(scorer, prompts: Sequence[Prompt], new: Sequence[str], old: Sequence[str], *, samples: int = 1,
             groups: Sequence[Hashable] | None = None, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """How often ``new`` answers beat ``old`` ones to the same prompt (ties count half).

    With ``samples = 1`` answer ``new[i]`` meets ``old[i]``. With ``samples = k`` the lists hold
    ``k`` adjacent answers per prompt (``prompts[i * k : (i + 1) * k]`` the same prompt) and each
    new answer meets each old answer of its prompt: ``k * k`` comparisons a prompt from ``2 * k``
    scores, a lower-variance estimate of the same rate.

    Args:
        scorer: a :class:`~fastrlhf.feedback.SimulatedAnnotator` (its hidden utility decides) or any
            judge with ``score``.
        prompts: N prompts (a prompt may repeat: several samples of it).
        new, old: N answers each.
        samples: answers per prompt (>= 1, dividing N) compared all against all.
        groups: the cluster of each prompt's comparisons for the interval, N keys (default: the
            prompt's text, so several samples of one prompt are resampled together).
        confidence: the interval's level.
        seed: the bootstrap's seed.
    """
    n = len(prompts)
    if not n == len(new) == len(old):
        raise ValueError(f"win_rate: got {n} prompts, {len(new)} new and {len(old)} old answers")
    if samples < 1 or n % samples:
        raise ValueError(f"win_rate: samples must be >= 1 and divide the {n} answers, got {samples}")
    k = samples
    s_new = _scores(scorer, prompts, new).view(-1, k, 1)  # [P, k, 1]
    s_old = _scores(scorer, prompts, old).view(-1, 1, k)  # [P, 1, k]
    outcomes = ((s_new > s_old).double() + 0.5 * (s_new == s_old).double()).flatten()  # [P * k * k]
    keys = groups if groups is not None else [repr(p) for p in prompts]
    if len(keys) != n:
        raise ValueError(f"win_rate: got {n} answers but {len(keys)} group keys")
    keys = [key for key in keys for _ in range(k)]  # comparison (i, j) of a prompt goes with new answer i
    return rate_estimate(outcomes, keys, confidence=confidence, seed=seed)


def agreement(judge, truth, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str], *,
              groups: Sequence[Hashable] | None = None, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """How often ``judge`` orders the pair ``(a[i], b[i])`` as ``truth`` does; pairs the truth
    scores equal are left out, and the judge's exact ties count half.

    Args:
        judge: a judge with ``score`` (a reward model, say).
        truth: a :class:`~fastrlhf.feedback.SimulatedAnnotator` (its hidden utility) or a judge.
        prompts: N prompts; a, b: two answers to each.
        groups: the cluster of each pair for the interval (default: the prompt's text).
        confidence: the interval's level.
        seed: the bootstrap's seed.
    """
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"agreement: got {len(prompts)} prompts, {len(a)} and {len(b)} answers")
    ja, jb = _scores(judge, prompts, a), _scores(judge, prompts, b)
    ta, tb = _scores(truth, prompts, a), _scores(truth, prompts, b)
    keep = ta != tb
    outcomes = ((ja > jb) == (ta > tb)).double() * (ja != jb).double() + 0.5 * (ja == jb).double()
    keys = groups if groups is not None else [repr(p) for p in prompts]
    return rate_estimate(outcomes[keep], [k for k, m in zip(keys, keep.tolist()) if m], confidence=confidence,
                         seed=seed)
