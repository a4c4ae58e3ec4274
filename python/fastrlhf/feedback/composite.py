"""Several feedback signals as one reward: :class:`CompositeFeedback`.

``f = sum_i w_i * clip(normalize_i(f_i))`` where ``normalize_i`` standardizes signal i by the
running mean and standard deviation of every score it has produced (Welford's algorithm, kept in
:meth:`CompositeFeedback.state_dict` so trainers checkpoint it). Stochastic judges can be asked
``repeats`` times and their answers aggregated (mean or median). How much the signals agree is
measured on every call and reported in ``last_stats``; :meth:`CompositeFeedback.compare` can drop
the pairs whose signals disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from fastrlhf.feedback.base import Judge, distinct_answers
from fastrlhf.feedback.judges._common import check_lengths

Aggregate = Literal["mean", "median"]


class RunningStats:
    """Count, mean and sum of squared deviations (Welford / Chan's parallel update, fp64) of every
    finite value seen; ``std`` is the population standard deviation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of values (non-finite ones are skipped)."""
        x = values.detach().double().flatten().cpu()
        x = x[torch.isfinite(x)]
        n = x.numel()
        if n == 0:
            return
        mean_b, m2_b = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``[N]`` (fp64, 0-based) with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    _, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two ``[N]`` tensors (NaN when N < 2 or either is constant)."""
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok].double().cpu(), y[ok].double().cpu()
    if x.numel() < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def _parse_signals(signals) -> dict[str, tuple[Judge, float]]:
    items = list(signals.items()) if isinstance(signals, Mapping) else list(signals)
    out: dict[str, tuple[Judge, float]] = {}
    for item in items:
        if isinstance(signals, Mapping):
            name, spec = item
            judge, weight = (spec, 1.0) if not isinstance(spec, (tuple, list)) else spec
        else:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise ValueError("CompositeFeedback: signals as a list take (name, judge, weight) tuples, "
                                 f"got {item!r}")
            name, judge, weight = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"CompositeFeedback: signal names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"CompositeFeedback: the signal name {name!r} appears twice")
        if not (hasattr(judge, "score") and hasattr(judge, "compare")):
            raise TypeError(f"CompositeFeedback: signal {name!r} is a {type(judge).__name__}, not a Judge")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"CompositeFeedback: signal {name!r} needs a finite number as weight, got {weight!r}")
        out[name] = (judge, float(weight))
    if not out:
        raise ValueError("CompositeFeedback: signals is empty")
    return out


def _scores_by_default_compare(judge) -> bool:
    """True when the judge compares by Bradley-Terry on its scores (it did not override compare)."""
    return getattr(type(judge), "compare", None) is Judge.compare


class CompositeFeedback(Judge):
    """A weighted combination of judges.

    :meth:`score_signals` (what the trainers call) and :meth:`score`: every signal scores the batch
    (``repeats`` times, aggregated), its running statistics are updated with the new scores, and
    ``f = sum_i w_i * z_i`` with ``z_i = clip((f_i - mean_i) / std_i)`` (``normalize=True``;
    ``z_i = clip(f_i)`` otherwise). Until a signal has seen two distinct values its std is taken as
    1 (scores are only centred). NaN scores propagate to ``f`` and are kept out of the statistics.

    :meth:`compare`: each signal's probability that ``a`` is better, ``p_i`` (judges that compare
    by Bradley-Terry on their scores get ``sigmoid(z_i(a) - z_i(b))`` on the normalized, clipped
    scale; judges with their own ``compare`` - LLM judges, annotators - give theirs), combined as
    the ``|w_i|``-weighted mean of ``p_i`` (``1 - p_i`` for negative weights), smoothed toward 0.5
    by ``label_smoothing``. A pair's agreement is the weighted fraction of signals preferring the
    same answer as the combination (a signal at exactly 0.5 counts half); with ``min_agreement``,
    pairs below it come back as NaN (``last_mask`` marks the kept ones).

    ``last_stats`` (floats, refreshed by every call): per signal ``<name>/mean``, ``<name>/std``
    (raw scores of the batch), ``<name>/norm_mean`` (of the normalized ones), ``<name>/running_mean``,
    ``<name>/running_std``; per pair of signals ``agreement/<a>|<b>`` (fraction of samples where
    their weighted, centred scores have the same sign; of pairs where their votes match, in
    compare) and ``spearman/<a>|<b>`` (rank correlation of the raw scores, score calls);
    ``agreement``, their mean (1 with one signal); ``kept`` (compare: fraction of pairs kept).

    Args:
        signals: ``{name: (judge, weight)}`` (or ``{name: judge}``, weight 1), or a list of
            ``(name, judge, weight)``.
        normalize: standardize each signal by its running mean / std.
        clip: clip each (normalized) signal to ``[-clip, clip]`` (> 0); None: no clipping.
        repeats: judgments per call of each signal (>= 1), or ``{name: repeats}`` (default 1) -
            for stochastic judges (sampling LLMs, annotators).
        aggregate: how repeats combine: ``"mean"`` or ``"median"``.
        min_agreement: compare: drop (NaN) pairs whose agreement is below this, in [0, 1].
        label_smoothing: compare: ``p <- (1 - ls) * p + ls / 2``, in [0, 1].
        name: the judge's name in metrics.
    """

    def __init__(self, signals, *, normalize: bool = True, clip: float | None = None, repeats=1,
                 aggregate: Aggregate = "mean", min_agreement: float | None = None, label_smoothing: float = 0.0,
                 name: str = "composite"):
        self.signals = _parse_signals(signals)
        if clip is not None and not clip > 0:
            raise ValueError(f"CompositeFeedback: clip must be > 0 or None, got {clip}")
        if aggregate not in ("mean", "median"):
            raise ValueError(f"CompositeFeedback: aggregate must be 'mean' or 'median', got {aggregate!r}")
        if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"CompositeFeedback: min_agreement must be in [0, 1], got {min_agreement}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CompositeFeedback: label_smoothing must be in [0, 1], got {label_smoothing}")
        reps = repeats if isinstance(repeats, Mapping) else {n: repeats for n in self.signals}
        unknown = set(reps) - set(self.signals)
        if unknown:
            raise ValueError(f"CompositeFeedback: repeats names unknown signals {sorted(unknown)}")
        self.repeats = {n: int(reps.get(n, 1)) for n in self.signals}
        for n, r in self.repeats.items():
            if r < 1:
                raise ValueError(f"CompositeFeedback: repeats of {n!r} must be >= 1, got {r}")
        self.normalize, self.clip, self.aggregate = normalize, clip, aggregate
        self.min_agreement, self.label_smoothing, self.name = min_agreement, float(label_smoothing), name
        self.stats = {n: RunningStats() for n in self.signals}
        self.last_stats: dict[str, float] = {}
        self.last_mask: torch.Tensor | None = None

    # ---- pieces
    def _aggregate(self, values: list[torch.Tensor]) -> torch.Tensor:
        if len(values) == 1:
            return values[0]
        stacked = torch.stack(values)  # (repeats, N)
        return stacked.mean(0) if self.aggregate == "mean" else stacked.median(0).values

    def _raw(self, name: str, prompts, completions) -> torch.Tensor:
        judge = self.signals[name][0]
        values = [judge.score(prompts, completions).float().cpu() for _ in range(self.repeats[name])]
        out = self._aggregate(values)
        if out.shape != (len(prompts),):
            raise ValueError(f"CompositeFeedback: signal {name!r} returned shape {tuple(out.shape)} for "
                             f"{len(prompts)} completions")
        return out

    def _raw_pairs(self, name: str, prompts, completions_a, completions_b) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores ``([N], [N])`` of both sides of ``N`` pairs, each distinct answer scored once;
        the running statistics see each distinct answer once."""
        unique_prompts, unique_answers, index = distinct_answers(prompts, completions_a, completions_b)
        unique = self._raw(name, unique_prompts, unique_answers)  # [U]
        self.stats[name].update(unique)
        scores = unique[index]  # [2N]
        return scores[: len(prompts)], scores[len(prompts):]

    def _normalized(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        z = raw
        if self.normalize:
            st = self.stats[name]
            std = st.std if st.std > 1e-12 else 1.0
            z = (raw.double() - st.mean) / std
        if self.clip is not None:
            z = z.clamp(-self.clip, self.clip)
        return z.float()

    def _signal_stats(self, raw: dict[str, torch.Tensor], z: dict[str, torch.Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in raw:
            r = raw[n][torch.isfinite(raw[n])]
            out[f"{n}/mean"] = float(r.mean()) if r.numel() else float("nan")
            out[f"{n}/std"] = float(r.std(unbiased=False)) if r.numel() else float("nan")
            out[f"{n}/norm_mean"] = float(z[n].nanmean()) if z[n].numel() else float("nan")
            out[f"{n}/running_mean"], out[f"{n}/running_std"] = self.stats[n].mean, self.stats[n].std
        return out

    def _pairs(self):
        names = list(self.signals)
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]

    # ---- Judge interface
    def score_signals(self, prompts, completions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scores [N], {name: raw scores [N]})``: the combined reward and each signal's own
        (un-normalized, repeat-aggregated) scores, for the trainers' per-signal metrics.

        Args:
            prompts: N prompts.
            completions: N answers.
        """
        check_lengths(self.name, prompts, completions)
        raw = {n: self._raw(n, prompts, completions) for n in self.signals}
        for n in self.signals:
            self.stats[n].update(raw[n])
        z = {n: self._normalized(n, raw[n]) for n in self.signals}
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for n, (_, w) in self.signals.items():
            total = total + w * z[n]
        stats = self._signal_stats(raw, z)
        agreements = []
        for a, b in self._pairs():
            ca = self.signals[a][1] * (raw[a].double() - self.stats[a].mean)  # centred, oriented by the weight
            cb = self.signals[b][1] * (raw[b].double() - self.stats[b].mean)
            same = (torch.sign(ca) == torch.sign(cb)).double()
            stats[f"agreement/{a}|{b}"] = float(same.mean()) if same.numel() else float("nan")
            stats[f"spearman/{a}|{b}"] = spearman(raw[a], raw[b])
            agreements.append(stats[f"agreement/{a}|{b}"])
        stats["agreement"] = float(sum(agreements) / len(agreements)) if agreements else 1.0
        stats["score/mean"] = float(total.mean()) if total.numel() else float("nan")
        stats["score/std"] = float(total.std(unbiased=False)) if total.numel() else float("nan")
        self.last_stats = stats
        return total, raw

    def score(self, prompts, completions) -> torch.Tensor:
        """``[N]`` combined rewards (see the class docstring).

        Args:
            prompts: N prompts.
            completions: N answers.
        """
        return self.score_signals(prompts, completions)[0]

    def compare(self, prompts, completions_a, completions_b) -> torch.Tensor:
        """``[N]`` probabilities that ``completions_a[i]`` is better (NaN for dropped pairs).

        Args:
            prompts: N prompts.
            completions_a, completions_b: two answers to each.
        """
        check_lengths(self.name, prompts, completions_a, completions_b)
        N = len(prompts)
        probs, raw, z = {}, {}, {}
        for n, (judge, _) in self.signals.items():
            if _scores_by_default_compare(judge):  # Bradley-Terry on the normalized scale
                ra, rb = self._raw_pairs(n, prompts, completions_a, completions_b)
                za, zb = self._normalized(n, ra), self._normalized(n, rb)
                probs[n] = torch.sigmoid(za - zb)
                raw[n], z[n] = torch.cat([ra, rb]), torch.cat([za, zb])
            else:
                values = [judge.compare(prompts, completions_a, completions_b).float().cpu()
                          for _ in range(self.repeats[n])]
                probs[n] = self._aggregate(values)
            if probs[n].shape != (N,):
                raise ValueError(f"CompositeFeedback: signal {n!r} compared {tuple(probs[n].shape)} for {N} pairs")
        total_w = sum(abs(w) for _, w in self.signals.values())
        p = torch.full((N,), 0.5)
        votes = {}
        if total_w > 0:
            p = torch.zeros(N)
            for n, (_, w) in self.signals.items():
                oriented = probs[n] if w >= 0 else 1.0 - probs[n]
                p = p + abs(w) * oriented
                votes[n] = torch.sign(oriented - 0.5)
            p = p / total_w
        combined = torch.sign(p - 0.5)
        agreement = torch.zeros(N)
        for n, (_, w) in self.signals.items():
            if n in votes:
                match = torch.where((votes[n] == 0) | (combined == 0), 0.5, (votes[n] == combined).float())
                agreement = agreement + abs(w) * match
        agreement = agreement / total_w if total_w > 0 else torch.ones(N)
        p = (1.0 - self.label_smoothing) * p + 0.5 * self.label_smoothing
        keep = torch.ones(N, dtype=torch.bool)
        if self.min_agreement is not None:
            keep = agreement >= self.min_agreement - 1e-12
            p = torch.where(keep, p, torch.full_like(p, float("nan")))
        self.last_mask = keep
        stats = self._signal_stats(raw, z)  # the signals compared through their scores
        pair_agreements = []
        for a, b in self._pairs():
            if a in votes and b in votes:
                same = (votes[a] == votes[b]).float()
                stats[f"agreement/{a}|{b}"] = float(same.mean()) if N else float("nan")
                pair_agreements.append(stats[f"agreement/{a}|{b}"])
        stats["agreement"] = float(sum(pair_agreements) / len(pair_agreements)) if pair_agreements else 1.0
        stats["pair_agreement"] = float(agreement.mean()) if N else float("nan")
        stats["kept"] = float(keep.float().mean()) if N else float("nan")
        for n in self.signals:
            stats[f"{n}/prob_mean"] = float(probs[n].mean()) if N else float("nan")
        self.last_stats = stats
        return p

    # ---- checkpoints
    def reset_stats(self) -> None:
        """Forget every signal's running statistics."""
        self.stats = {n: RunningStats() for n in self.signals}

    def state_dict(self) -> dict:
        """The running statistics of every signal (and the ``state_dict()`` of judges that have one)."""
        state = {"stats": {n: s.state_dict() for n, s in self.stats.items()}}
        judges = {n: j.state_dict() for n, (j, _) in self.signals.items() if hasattr(j, "state_dict")
                  and not isinstance(j, torch.nn.Module)}
        if judges:
            state["judges"] = judges
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: ``state`` holds statistics of signals this composite does not have, or
                lacks some of its signals.
        """
        stats = state.get("stats", {})
        if set(stats) != set(self.signals):
            raise ValueError(f"CompositeFeedback.load_state_dict: the state has signals {sorted(stats)}, this "
                             f"composite {sorted(self.signals)}")
        for n, s in stats.items():
            self.stats[n].load_state_dict(s)
        for n, s in state.get("judges", {}).items():
            if n in self.signals and hasattr(self.signals[n][0], "load_state_dict"):
                self.signals[n][0].load_state_dict(s)
