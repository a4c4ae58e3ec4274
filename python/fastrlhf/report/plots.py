"""PNG charts of a run directory: per-step policy metrics (``metrics.jsonl``) and per-round numbers
of the iterative loop (``rounds.jsonl``).

Two layouts are read:

- a single run: ``RUN_DIR/metrics.jsonl`` (one object per optimizer step, written by
  :class:`fastrlhf.trainers.metrics.MetricsLogger`);
- the iterative loop: one sub-run per round and phase (``RUN_DIR/round-01/policy/metrics.jsonl``,
  ``RUN_DIR/round-01/reward_model/metrics.jsonl``, ...) plus ``RUN_DIR/rounds.jsonl``. The policy
  phase's metrics are concatenated in round order on one global step axis, with a dashed line at
  each round boundary.

Figures are drawn on matplotlib's Agg canvas through :class:`matplotlib.figure.Figure` (no pyplot,
no display, no global backend switch), at ``FIGSIZE`` inches and ``DPI`` dots per inch, so every
PNG is ``FIGSIZE * DPI`` pixels. Missing values (``null``, NaN, +-Inf) are left out of a line; a
chart whose metrics never have a finite value is not written.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastrlhf.trainers.metrics import METRICS_FILE, read_metrics

ROUNDS_FILE = "rounds.jsonl"
PLOTS_DIR = "plots"
FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> 800 x 450 pixels
_ROUND_DIR = re.compile(r"^round[-_]?(\d+)$")
_POLICY_PHASE = "policy"
_MAX_WINDOW = 50  # moving-average window cap, in steps
_MAX_ROUND_LABELS = 12  # more rounds than this: boundary lines without "r<k>" labels


@dataclass(frozen=True)
class _StepChart:
    name: str  # file stem
    title: str
    ylabel: str
    keys: tuple[str, ...]  # metric -> line; "reward/*" expands to every per-signal reward
    labels: tuple[str, ...] = ()


_STEP_CHARTS = (
    _StepChart("reward", "Reward per feedback signal", "mean reward", ("reward", "reward/*")),
    _StepChart("kl", "KL divergence to the reference policy", "KL (nats / token)", ("kl", "loss/kl"),
               ("kl", "kl (in the loss)")),
    _StepChart("entropy", "Policy entropy", "entropy (nats / token)", ("entropy",)),
    _StepChart("response_length", "Response length", "tokens", ("response_length",)),
    _StepChart("clipfrac", "PPO clip fraction", "fraction of tokens clipped", ("clipfrac",)),
    _StepChart("value_loss", "Value loss", "value loss", ("value_loss",)),
)


@dataclass(frozen=True)
class SubRun:
    """One ``metrics.jsonl`` under a run directory."""

    path: Path  # the metrics.jsonl
    round: int | None  # from a ``round-NN`` directory on the way, else None
    phase: str  # the directories below the round (``policy``, ``reward_model``); "" at the top


def find_runs(run_dir: str | Path) -> list[SubRun]:
    """Every ``metrics.jsonl`` under ``run_dir`` (itself included), in (round, phase) order."""
    run_dir = Path(run_dir)
    runs = []
    for path in run_dir.rglob(METRICS_FILE):
        parts = path.parent.relative_to(run_dir).parts
        rnd, phase = None, []
        for p in parts:
            m = _ROUND_DIR.match(p)
            if m and rnd is None:
                rnd = int(m.group(1))
            else:
                phase.append(p)
        runs.append(SubRun(path, rnd, "/".join(phase)))
    return sorted(runs, key=lambda r: (-1 if r.round is None else r.round, r.phase, str(r.path)))


def _value(v) -> float:
    """A metric value as a float; NaN for null, non-numbers and +-Inf."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def _records(path: Path) -> list[dict]:
    """The records of one metrics.jsonl, one per step (a step logged twice, as the final evaluation
    is, merged: the later record wins per key), in step order."""
    by_step: dict[int, dict] = {}
    for rec in read_metrics(path.parent):
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            continue
        by_step.setdefault(int(step), {}).update(rec)
    return [{**by_step[s], "step": s} for s in sorted(by_step)]


def _policy_group(runs: list[SubRun]) -> list[SubRun]:
    """The sub-runs holding the policy's training: phase ``policy`` if there is one, else the phase
    whose records carry the most policy metrics (the top-level metrics.jsonl of a single run)."""
    groups: dict[str, list[SubRun]] = {}
    for r in runs:
        groups.setdefault(r.phase, []).append(r)
    if _POLICY_PHASE in groups:
        return groups[_POLICY_PHASE]
    keys = {k for c in _STEP_CHARTS for k in c.keys if not k.endswith("*")}

    def score(group: list[SubRun]) -> int:  # records with at least one policy metric
        return sum(any(k in keys or k.startswith("reward/") for k in rec) for r in group for rec in _records(r.path))

    best = max(groups, key=lambda p: (score(groups[p]), p == ""), default=None)
    return groups[best] if best is not None else []


def load_policy_metrics(run_dir: str | Path) -> tuple[list[dict], list[tuple[int, float]]]:
    """The policy's per-step records on one global step axis, and where each round starts.

    Returns:
        ``(records, rounds)``: ``records`` in step order, each with ``step`` replaced by the global
        step (a round's steps follow the previous round's last; steps already global are kept) and
        ``round`` added for the loop layout; ``rounds``: ``(round, first global step)`` per round
        (empty for a single run).
    """
    records, rounds, end = [], [], None
    for run in _policy_group(find_runs(run_dir)):
        recs = _records(run.path)
        if not recs:
            continue
        first = recs[0]["step"]
        shift = 0 if end is None else max(0, end - first + 1)
        for rec in recs:
            records.append({**rec, "step": rec["step"] + shift, **({} if run.round is None else {"round": run.round})})
        if run.round is not None:
            rounds.append((run.round, float(first + shift)))
        end = records[-1]["step"]
    return records, rounds


def read_rounds(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/rounds.jsonl`` in round order (blank and unparsable lines skipped, a
    row without a ``round`` numbered by its position)."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i + 1}: not JSON, skipped", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    for i, row in enumerate(rows):
        if isinstance(row.get("round"), bool) or not isinstance(row.get("round"), (int, float)):
            row["round"] = i + 1
    return sorted(rows, key=lambda r: r["round"])


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global step, value, round) of the records with a finite ``key``."""
    x, y, seg = [], [], []
    for rec in records:
        v = _value(rec.get(key))
        if not math.isnan(v):
            x.append(rec["step"])
            y.append(v)
            seg.append(rec.get("round", -1))
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(seg)


def smoothing_window(n: int) -> int:
    """The moving-average window for a series of ``n`` points: a tenth of it, at most 50 steps; 1
    (no smoothing) below 20 points."""
    return max(1, min(_MAX_WINDOW, n // 10))


def moving_average(y: np.ndarray, window: int, segments: np.ndarray | None = None) -> np.ndarray:
    """Centered moving average over ``window`` points (fewer at the ends), restarted where
    ``segments`` changes (a round boundary), so one round's values never blur into the next's."""
    y = np.asarray(y, dtype=np.float64)
    out = np.empty_like(y)
    if segments is None or len(segments) == 0:
        bounds = [0, len(y)]
    else:
        change = np.flatnonzero(np.asarray(segments)[1:] != np.asarray(segments)[:-1]) + 1
        bounds = [0, *change.tolist(), len(y)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = np.concatenate([[0.0], np.cumsum(y[a:b])])
        i = np.arange(b - a)
        lo = np.maximum(i - window // 2, 0)
        hi = np.minimum(i - window // 2 + window, b - a)
        out[a:b] = (c[hi] - c[lo]) / (hi - lo)
    return out


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("fastrlhf.report.plot_run needs matplotlib: pip install 'fastrlhf[report]' "
                          "(or pip install matplotlib)") from e


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _chart_keys(chart: _StepChart, present: set[str]) -> list[tuple[str, str]]:
    """(metric, legend label) of the chart's lines, in order; per-signal rewards sorted by name,
    their ``_std`` companions left out."""
    out = []
    for i, key in enumerate(chart.keys):
        if key.endswith("*"):
            prefix = key[:-1]
            names = sorted(k for k in present if k.startswith(prefix))
            out += [(k, k[len(prefix):]) for k in names
                    if not (k.endswith("_std") and k[: -len("_std")] in present)]
        else:
            label = chart.labels[i] if i < len(chart.labels) else key
            out.append((key, "total" if chart.name == "reward" and key == "reward" else label))
    return out


def _plot_step_chart(chart: _StepChart, records: list[dict], rounds: list[tuple[int, float]], path: Path) -> bool:
    present = {k for rec in records for k, v in rec.items() if not math.isnan(_value(v))}
    lines = [(k, label, *_series(records, k)) for k, label in _chart_keys(chart, present) if k in present]
    if not lines:
        return False
    fig, ax = _figure()
    windows = set()
    for i, (key, label, x, y, seg) in enumerate(lines):
        color = f"C{i % 10}"
        bold = chart.name == "reward" and key == "reward" and len(lines) > 1
        lw = 2.2 if bold else 1.5
        w = smoothing_window(len(y))
        if w > 1:
            ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, moving_average(y, w, seg), color=color, lw=lw, label=label)
            windows.add(w)
        else:
            ax.plot(x, y, color=color, lw=lw, marker="o" if len(y) <= 20 else None, ms=3, label=label)
    for k, (rnd, x0) in enumerate(rounds):
        if k > 0:
            ax.axvline(x0 - 0.5, color="0.45", ls="--", lw=0.9)
        if len(rounds) <= _MAX_ROUND_LABELS:
            ax.text(x0, 0.99, f" r{rnd}", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8,
                    color="0.35")
    title = chart.title
    if windows:
        title += f" (moving average over {max(windows)} steps; raw faint)"
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step (across rounds)" if rounds else "step")
    ax.set_ylabel(chart.ylabel)
    if len(lines) > 1:
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path, format="png")
    return True


def _plot_round_chart(title: str, ylabel: str, rows: list[dict], keys: list[tuple[str, str, str]],
                      chance: float | None, path: Path) -> bool:
    lines = []
    for key, label, style in keys:  # a key's confidence interval, when logged, is key/low .. key/high
        pts = [(r["round"], _value(r.get(key)), _value(r.get(f"{key}/low")), _value(r.get(f"{key}/high")))
               for r in rows]
        pts = [p for p in pts if not math.isnan(p[1])]
        if pts:
            lines.append((label, style, *zip(*pts)))
    if not lines:
        return False
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    values = [v for *_, ys, lows, highs in lines for v in ys]
    for i, (label, style, xs, ys, lows, highs) in enumerate(lines):
        ax.plot(xs, ys, style, color=f"C{i}", lw=1.8, ms=6, label=label)
        bars = [(x, y, lo, hi) for x, y, lo, hi in zip(xs, ys, lows, highs) if not (math.isnan(lo) or math.isnan(hi))]
        if bars:
            bx, by, blo, bhi = zip(*bars)
            ax.errorbar(bx, by, yerr=[[y - lo for y, lo in zip(by, blo)], [hi - y for y, hi in zip(by, bhi)]],
                        fmt="none", ecolor=f"C{i}", elinewidth=1.0, capsize=4, alpha=0.7)
    if all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(-0.02, 1.02)
        if chance is not None:
            ax.axhline(chance, color="0.45", ls=":", lw=1.0, label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, format="png")
    return True


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the charts of a run directory as PNGs.

    Per-step charts of the policy (a moving average over noisy series, the raw values as a faint
    line): reward per feedback signal (``reward/<signal>`` and the total ``reward``), KL to the
    reference, entropy, response length, clip fraction, value loss. Per-round charts from
    ``rounds.jsonl``: reward-model accuracy (with the agreement with a hidden true preference and
    the label agreement when logged) and win-rate, with confidence intervals as error bars when
    logged (``<key>/low``, ``<key>/high``).
    A chart whose metrics are absent (or never finite) is skipped.

    Args:
        run_dir: a run directory (``metrics.jsonl`` at the top, or the loop's ``round-NN/<phase>/``
            sub-runs and ``rounds.jsonl``).
        out_dir: where the PNGs go (created); default ``run_dir / "plots"``.

    Returns:
        The paths written, in chart order.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ImportError: matplotlib is not installed (the ``report`` extra).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"plot_run: run_dir {str(run_dir)!r} is not a directory")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    records, rounds = load_policy_metrics(run_dir)
    rows = read_rounds(run_dir)
    if not records and not rows:
        return []
    _require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in _STEP_CHARTS:
        path = out_dir / f"{chart.name}.png"
        if _plot_step_chart(chart, records, rounds, path):
            written.append(path)
    if _plot_round_chart("Reward-model accuracy per round", "accuracy", rows,
                         [("rm_accuracy", "reward-model accuracy (held-out labels)", "o-"),
                          ("rm_true_accuracy", "agreement with the true preference", "^-"),
                          ("agreement", "label agreement", "s--")],
                         None, out_dir / "rm_accuracy.png"):
        written.append(out_dir / "rm_accuracy.png")
    if _plot_round_chart("Policy win rate per round", "win rate", rows, [("win_rate", "win rate", "o-")], 0.5,
                         out_dir / "win_rate.png"):
        written.append(out_dir / "win_rate.png")
    return written
