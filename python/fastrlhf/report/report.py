"""A run directory's ``report.md``: the summary numbers, the rounds of the loop, the config, the
charts of :func:`fastrlhf.report.plots.plot_run` and sample generations before / after training.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastrlhf.config import Config
from fastrlhf.report.plots import PLOTS_DIR, find_runs, load_policy_metrics, plot_run, read_rounds

REPORT_FILE = "report.md"
CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.json"
# the columns of rounds.jsonl shown first, in this order; other keys follow in file order
_ROUND_COLUMNS = ("round", "feedback_pairs", "agreement", "rm_accuracy", "win_rate", "reward", "kl")
# per-step metrics summarized (last finite value) when no summary is given and there are no rounds
_STEP_SUMMARY = ("reward", "kl", "entropy", "response_length", "clipfrac", "value_loss", "time/step")


def summarize_rounds(run_dir: str | Path) -> list[dict]:
    """One dict per round of ``run_dir/rounds.jsonl``, in round order, with the usual columns
    first (``round, feedback_pairs, agreement, rm_accuracy, win_rate, reward, kl``, those present)
    and NaN / Inf as None. Empty when the run has no rounds."""
    out = []
    for row in read_rounds(run_dir):
        keys = [k for k in _ROUND_COLUMNS if k in row] + [k for k in row if k not in _ROUND_COLUMNS]
        out.append({k: _finite_or_none(row[k]) for k in keys})
    return out


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v) -> str:
    """A table cell for a summary value: numbers to 4 significant digits, None / NaN as a dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if hasattr(v, "item"):  # 0-dim tensors and numpy scalars
        try:
            return _fmt(v.item())
        except (TypeError, ValueError):
            pass
    return md_cell(v)


# markdown's specials; an underscore between two letters or digits never emphasizes, so stays bare
_MD_SPECIAL = re.compile(r"([\\`*\[\]|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_cell(text: Any) -> str:
    """``text`` as the content of one markdown table cell, shown literally: HTML's ``& < >``
    escaped, markdown's ``\\ ` * _ [ ] |`` backslash-escaped (a pipe no longer ends the cell; an
    underscore inside a word is left bare, as it cannot emphasize), line breaks as ``<br>``. None
    is an empty cell."""
    if text is None:
        return ""
    s = html.escape(str(text), quote=False)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _with_intervals(row: Mapping[str, Any]) -> dict[str, str]:
    """A row's cells, a value with an interval (``k``, ``k/low``, ``k/high``) as one cell
    ``"v [low, high]"`` (``k/n``, the number of comparisons, is left out)."""
    out = {}
    for k, v in row.items():
        base, _, part = k.rpartition("/")
        if part in ("low", "high", "n") and base in row and f"{base}/low" in row and f"{base}/high" in row:
            continue
        lo, hi = row.get(f"{k}/low"), row.get(f"{k}/high")
        finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (lo, hi))
        out[k] = f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]" if finite else _fmt(v)
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _fence(text: str, lang: str) -> list[str]:
    """A fenced code block longer than any run of backticks inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence]


def _plain(v):
    """``v`` with only YAML-safe types (tuples -> lists, paths and other objects -> str)."""
    if isinstance(v, Config):
        return _plain(v.to_dict())
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _config_yaml(run_dir: Path, config) -> str | None:
    if config is None:
        path = run_dir / CONFIG_FILE
        return path.read_text() if path.exists() else None
    if isinstance(config, Config):
        return config.to_yaml()
    if isinstance(config, Mapping):
        import yaml

        return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)
    raise TypeError(f"write_report: config must be a fastrlhf.config.Config or a dict, got {type(config).__name__}")


def _load_samples(run_dir: Path, samples) -> list[Mapping]:
    if samples is None:
        path = run_dir / SAMPLES_FILE
        if not path.exists():
            return []
        samples = json.loads(path.read_text())
        if isinstance(samples, Mapping):
            samples = samples.get("samples", [])
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise TypeError(f"write_report: samples must be a list of {{'prompt', 'before', 'after'}} dicts, "
                        f"got {type(samples).__name__}")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping):
            raise TypeError(f"write_report: samples[{i}] must be a dict with 'prompt', 'before', 'after', "
                            f"got {type(s).__name__}")
    return list(samples)


def _default_summary(run_dir: Path, rounds: list[dict]) -> tuple[dict, str]:
    """The final round's numbers, else the last finite value of the main per-step metrics."""
    if rounds:
        last = rounds[-1]
        return {k: v for k, v in last.items() if k != "round"}, f"round {last['round']} (the last)"
    records, _ = load_policy_metrics(run_dir)
    out = {}
    for key in _STEP_SUMMARY:
        for rec in reversed(records):
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[key] = v
                break
    step = records[-1]["step"] if records else None
    return out, f"step {step} (the last)" if step is not None else ""


def _link(path: Path, run_dir: Path) -> str:
    rel = Path(os.path.relpath(path, run_dir)).as_posix()
    return f"<{rel}>" if re.search(r"[\s()<>]", rel) else rel


def write_report(run_dir: str | Path, *, title: str | None = None, config: Config | Mapping | None = None,
                 samples: Sequence[Mapping] | None = None, summary: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.md`` (and the charts, by :func:`plot_run`, under ``run_dir/plots``).

    Sections, each left out when it has nothing to show: the summary table, the rounds of the loop
    (``rounds.jsonl``), the charts (relative links), sample generations before / after training
    side by side, the config (a YAML block) and the sub-runs found.

    Args:
        run_dir: the run directory.
        title: the report's heading; default ``"Run report: <directory name>"``.
        config: the run's config (a :class:`fastrlhf.config.Config`, written with its field help,
            or a dict); default ``run_dir/config.yaml`` as written.
        samples: ``[{"prompt", "before", "after"}, ...]``; default ``run_dir/samples.json`` (that
            list, or ``{"samples": [...]}``).
        summary: name -> value (win-rate, held-out accuracy, KL, time, ...); default the last
            round's numbers, or the last value of the main per-step metrics of a single run.

    Returns:
        The path of ``report.md``. Without matplotlib the report is written without charts (a
        warning says so).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"write_report: run_dir {str(run_dir)!r} is not a directory")
    rounds = summarize_rounds(run_dir)
    samples = _load_samples(run_dir, samples)
    config_text = _config_yaml(run_dir, config)
    summary_note = ""
    if summary is None:
        summary, summary_note = _default_summary(run_dir, rounds)
    try:
        plots = plot_run(run_dir, run_dir / PLOTS_DIR)
        plots_missing = None
    except ImportError as e:
        warnings.warn(f"write_report: no charts ({e})", stacklevel=2)
        plots, plots_missing = [], str(e)

    lines = [f"# {title if title is not None else f'Run report: {run_dir.resolve().name}'}", ""]
    if summary:
        lines += ["## Summary", ""]
        if summary_note:
            lines += [f"At {summary_note}.", ""]
        if any(k.endswith("/low") for k in summary):
            lines += ["Rates in brackets: 95% bootstrap confidence intervals over the evaluation prompts.", ""]
        lines += _table(["Metric", "Value"], [[md_cell(k), v] for k, v in _with_intervals(summary).items()]) + [""]
    if rounds:
        cells = [_with_intervals(row) for row in rounds]
        cols = list(dict.fromkeys(k for row in cells for k in row))
        lines += ["## Rounds", ""]
        lines += _table([md_cell(c) for c in cols], [[row.get(c, "—") for c in cols] for row in cells]) + [""]
    if plots or plots_missing:
        lines += ["## Charts", ""]
        if plots_missing:
            lines += [f"Charts not drawn: {md_cell(plots_missing)}", ""]
        for p in plots:
            lines += [f"![{p.stem.replace('_', ' ')}]({_link(p, run_dir)})", ""]
    if samples:
        lines += ["## Samples", "", "Generations for the same prompts before and after training.", ""]
        lines += _table(["#", "Prompt", "Before", "After"],
                        [[str(i + 1), md_cell(s.get("prompt")), md_cell(s.get("before")), md_cell(s.get("after"))]
                         for i, s in enumerate(samples)]) + [""]
    if config_text is not None:
        lines += ["## Config", ""] + _fence(config_text, "yaml") + [""]
    runs = find_runs(run_dir)
    if runs:
        lines += ["## Metrics files", ""]
        lines += _table(["File", "Round", "Phase"],
                        [[md_cell(Path(os.path.relpath(r.path, run_dir)).as_posix()),
                          "" if r.round is None else str(r.round), md_cell(r.phase)] for r in runs]) + [""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
