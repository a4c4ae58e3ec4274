"""fastrlhf.report: charts of synthetic run directories (a single run and the loop's rounds) and the
report.md that links them."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastrlhf.config import Config, option
from fastrlhf.report import plot_run, summarize_rounds, write_report
from fastrlhf.report import report as report_module
from fastrlhf.report.plots import DPI, FIGSIZE, load_policy_metrics, moving_average

STEP_CHARTS = ["reward", "kl", "entropy", "response_length", "clipfrac", "value_loss"]
ROUND_CHARTS = ["rm_accuracy", "win_rate"]
PIXELS = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))  # rows, columns


def policy_record(step: int, rng: np.random.Generator, **override) -> dict:
    rec = {"step": step, "reward": float(rng.normal(step * 0.05, 0.3)), "reward_std": 0.3,
           "reward/helpful": float(rng.random()), "reward/helpful_std": 0.2, "reward/length": float(rng.random()),
           "kl": 0.01 * step, "entropy": 2.0 - 0.01 * step, "response_length": float(rng.integers(10, 40)),
           "clipfrac": float(rng.random() * 0.2), "value_loss": 1.0 / (1 + step), "approx_kl": 1e-3,
           "time/generate": 0.1, "time/step": 0.3}
    rec.update(override)
    return rec


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN / Infinity as JSON's extensions


ROUNDS = [
    {"round": 1, "feedback_pairs": 64, "agreement": 0.8, "rm_accuracy": 0.625, "win_rate": 0.55, "reward": 0.1,
     "kl": 0.02},
    {"round": 2, "feedback_pairs": 128, "agreement": 0.8, "rm_accuracy": 0.7, "win_rate": float("nan"),
     "reward": 0.3, "kl": 0.05},
    {"round": 3, "feedback_pairs": 192, "agreement": 0.82, "rm_accuracy": 0.74, "win_rate": 0.6875, "reward": 0.5,
     "kl": 0.07},
]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> Path:
    """A single PPO run: every charted metric, with nulls, NaN and Inf mixed in, and the final
    evaluation logged at the last step again."""
    run = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(0)
    rows = [policy_record(s, rng) for s in range(1, 61)]
    rows[3]["kl"] = None
    rows[4]["entropy"] = float("nan")
    rows[5]["value_loss"] = float("inf")
    rows[6]["reward/helpful"] = None
    rows.append({"step": 60, "eval/reward": 0.9})
    write_jsonl(run / "metrics.jsonl", rows)
    return run


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory) -> Path:
    """The loop's layout: three rounds, each a reward-model phase and a policy phase, and rounds.jsonl."""
    run = tmp_path_factory.mktemp("loop")
    rng = np.random.default_rng(1)
    for r in (1, 2, 3):
        write_jsonl(run / f"round-{r:02d}" / "reward_model" / "metrics.jsonl",
                    [{"step": s, "loss": 0.7 / s, "accuracy": 0.6, "reward": 123.0} for s in range(1, 6)])
        write_jsonl(run / f"round-{r:02d}" / "policy" / "metrics.jsonl",
                    [policy_record(s, rng) for s in range(1, 21)])
    write_jsonl(run / "rounds.jsonl", ROUNDS)
    return run


def check_png(path: Path) -> None:
    mpimg = pytest.importorskip("matplotlib.image")
    assert path.is_file() and path.stat().st_size > 0, path
    img = mpimg.imread(path)
    assert img.shape[:2] == PIXELS, (path.name, img.shape)
    assert float(np.var(img[..., :3])) > 0, f"{path.name} is blank"


@pytest.fixture(scope="module")
def flat_plots(flat_run):
    pytest.importorskip("matplotlib")
    return plot_run(flat_run)


@pytest.fixture(scope="module")
def rounds_plots(rounds_run):
    pytest.importorskip("matplotlib")
    return plot_run(rounds_run)


def test_flat_run_writes_every_step_chart(flat_run, flat_plots):
    assert flat_plots == [flat_run / "plots" / f"{name}.png" for name in STEP_CHARTS]
    for path in flat_plots:
        check_png(path)
    assert not (flat_run / "plots" / "win_rate.png").exists()  # no rounds.jsonl: no per-round charts


def test_rounds_layout_writes_step_and_round_charts(rounds_run, rounds_plots):
    assert [p.stem for p in rounds_plots] == STEP_CHARTS + ROUND_CHARTS
    assert all(p.parent == rounds_run / "plots" for p in rounds_plots)
    for path in rounds_plots:
        check_png(path)


def test_policy_metrics_are_concatenated_on_a_global_step_axis(rounds_run):
    records, rounds = load_policy_metrics(rounds_run)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert [r["round"] for r in records] == [1] * 20 + [2] * 20 + [3] * 20
    assert rounds == [(1, 1.0), (2, 21.0), (3, 41.0)]
    assert all("accuracy" not in r and r["reward"] != 123.0 for r in records)  # reward-model phase kept apart


def test_steps_already_global_are_kept(tmp_path):
    rng = np.random.default_rng(2)
    write_jsonl(tmp_path / "round-1" / "policy" / "metrics.jsonl", [policy_record(s, rng) for s in range(1, 4)])
    write_jsonl(tmp_path / "round-2" / "policy" / "metrics.jsonl", [policy_record(s, rng) for s in range(4, 7)])
    write_jsonl(tmp_path / "round-10" / "policy" / "metrics.jsonl", [policy_record(s, rng) for s in range(0, 2)])
    records, rounds = load_policy_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]  # round-10 sorts after round-2, 0-based shifted
    assert rounds == [(1, 1.0), (2, 4.0), (10, 7.0)]


def test_duplicate_steps_merge_and_flat_layout_has_no_rounds(flat_run):
    records, rounds = load_policy_metrics(flat_run)
    assert rounds == [] and len(records) == 60
    assert records[-1]["eval/reward"] == 0.9 and "reward" in records[-1]


def test_a_chart_is_skipped_when_its_metrics_are_absent(tmp_path):
    pytest.importorskip("matplotlib")
    # GRPO-like: no critic (no value_loss), clipfrac always null, one signal; rounds.jsonl without win_rate
    rows = [{"step": s, "reward": 0.1 * s, "reward/rule": 0.1 * s, "kl": None if s == 2 else 0.01 * s,
             "entropy": 1.0, "clipfrac": None, "response_length": 12} for s in range(1, 6)]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    write_jsonl(tmp_path / "rounds.jsonl", [{"round": 1, "rm_accuracy": 0.5}, {"round": 2, "rm_accuracy": None}])
    out = tmp_path / "charts"
    written = plot_run(tmp_path, out)
    assert [p.stem for p in written] == ["reward", "kl", "entropy", "response_length", "rm_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    for path in written:
        check_png(path)


def test_nothing_to_plot(tmp_path):
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()
    with pytest.raises(FileNotFoundError, match="run_dir"):
        plot_run(tmp_path / "missing")


def test_moving_average_is_centered_and_restarts_at_round_boundaries():
    y = np.arange(6, dtype=np.float64)
    np.testing.assert_allclose(moving_average(y, 3), [0.5, 1, 2, 3, 4, 4.5])
    np.testing.assert_allclose(moving_average(y, 1), y)
    np.testing.assert_allclose(moving_average(y, 4, np.array([1, 1, 1, 2, 2, 2])), [0.5, 1, 1, 3.5, 4, 4])


def test_summarize_rounds(rounds_run, tmp_path):
    rows = summarize_rounds(rounds_run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert list(rows[0])[:5] == ["round", "feedback_pairs", "agreement", "rm_accuracy", "win_rate"]
    assert rows[1]["win_rate"] is None  # NaN in the file
    assert rows[2]["win_rate"] == 0.6875
    assert summarize_rounds(tmp_path) == []


@dataclass
class TinyConfig(Config):
    lr: float = option(3e-6, "learning rate")
    signals: tuple = option(("helpful", "length"), "feedback signals")


SAMPLES = [
    {"prompt": "Write a|b table", "before": "col1 | col2\nrow", "after": "*bold* and <tag> & `code`"},
    {"prompt": "second", "before": None, "after": "multi\r\nline"},
]


def test_write_report(rounds_run, rounds_plots):
    summary = {"win_rate": 0.6875, "held-out accuracy": 0.74, "kl": 0.0712345, "time (s)": 93.5, "steps": 60,
               "missing": float("nan")}
    path = write_report(rounds_run, title="Loop demo", config=TinyConfig(), samples=SAMPLES, summary=summary)
    assert path == rounds_run / "report.md"
    text = path.read_text()
    assert text.startswith("# Loop demo\n")
    for line in ["| win_rate | 0.6875 |", "| held-out accuracy | 0.74 |", "| kl | 0.07123 |", "| time (s) | 93.5 |",
                 "| steps | 60 |", "| missing | — |"]:
        assert line in text, line
    # the rounds table: NaN win-rate as a dash
    assert "| 2 | 128 | 0.8 | 0.7 | — | 0.3 | 0.05 |" in text
    # the config, with its help comments, in a YAML block
    block = re.search(r"```yaml\n(.*?)\n```", text, re.S)
    assert block and "# learning rate" in block.group(1) and "lr: 3.0e-06" in block.group(1)
    # every chart linked relatively, and the file is there
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == [f"plots/{p.name}" for p in rounds_plots]
    assert all((rounds_run / link).is_file() for link in links)
    # samples: one row each, pipes escaped, newlines as <br>, markup shown literally
    section = text.split("## Samples", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2
    assert "| 1 | Write a\\|b table | col1 \\| col2<br>row | \\*bold\\* and &lt;tag&gt; &amp; \\`code\\` |" in text
    assert "| 2 | second |  | multi<br>line |" in text
    for row in rows:  # 5 cell separators, no raw pipe inside a cell
        assert len(re.findall(r"(?<!\\)\|", row)) == 5, row


def test_write_report_reads_run_dir_files(flat_run, flat_plots):
    (flat_run / "config.yaml").write_text("# from disk\nlr: 1.0e-05\nmodel: tiny\n")
    (flat_run / "samples.json").write_text(json.dumps({"samples": [{"prompt": "p", "before": "b", "after": "a|z"}]}))
    text = write_report(flat_run).read_text()
    assert text.startswith(f"# Run report: {flat_run.name}\n")
    assert "```yaml\n# from disk\nlr: 1.0e-05\nmodel: tiny\n```" in text
    assert "| 1 | p | b | a\\|z |" in text
    # default summary: the last finite value of the main metrics
    last = json.loads((flat_run / "metrics.jsonl").read_text().splitlines()[-2])
    assert f"| reward | {last['reward']:.4g} |" in text and "| kl | 0.6 |" in text
    for name in STEP_CHARTS:
        assert f"(plots/{name}.png)" in text
    assert "win_rate" not in text


def test_write_report_with_a_dict_config_and_without_matplotlib(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "reward": None, "kl": float("nan")}, {"step": 2, "kl": 0.5}])

    def no_matplotlib(*args, **kwargs):
        raise ImportError("fastrlhf.report.plot_run needs matplotlib")

    monkeypatch.setattr(report_module, "plot_run", no_matplotlib)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_report(tmp_path, config={"lr": 1e-5, "path": Path("/x"), "steps": (1, 2)}, summary={})
    assert any("no charts" in str(w.message) for w in caught)
    text = path.read_text()
    assert "Charts not drawn" in text and "![" not in text
    assert "```yaml\nlr: 1.0e-05\npath: /x\nsteps:\n- 1\n- 2\n```" in text
    assert "## Summary" not in text and "## Samples" not in text
    with pytest.raises(TypeError, match="samples"):
        write_report(tmp_path, samples="not a list")


def test_rates_with_intervals_in_tables_and_charts(tmp_path):
    rows = [{"round": r, "win_rate": w, "win_rate/low": w - 0.1, "win_rate/high": w + 0.1, "win_rate/n": 96.0,
             "rm_accuracy": 0.6, "rm_true_accuracy": 0.55, "rm_true_accuracy/low": 0.4,
             "rm_true_accuracy/high": 0.7, "rm_true_accuracy/n": 45.0} for r, w in [(1, 0.5), (2, 0.75)]]
    write_jsonl(tmp_path / "rounds.jsonl", rows)
    written = plot_run(tmp_path)
    assert {p.stem for p in written} == set(ROUND_CHARTS)
    with_bars = matplotlib_pixels(tmp_path / "plots" / "win_rate.png")
    write_jsonl(tmp_path / "rounds.jsonl", [{k: v for k, v in r.items() if "/" not in k} for r in rows])
    plot_run(tmp_path)
    without = matplotlib_pixels(tmp_path / "plots" / "win_rate.png")
    assert with_bars.shape == without.shape == (*PIXELS, 4)
    assert (with_bars != without).any(axis=-1).sum() > 200  # the error bars are drawn

    write_jsonl(tmp_path / "rounds.jsonl", rows)
    text = write_report(tmp_path, summary=dict(rows[-1])).read_text()
    assert "| win_rate | 0.75 [0.65, 0.85] |" in text and "| rm_true_accuracy | 0.55 [0.4, 0.7] |" in text
    assert "win_rate/low" not in text and "win_rate/n" not in text and "95% bootstrap confidence" in text
    rounds_table = text.split("## Rounds", 1)[1]
    header = next(line for line in rounds_table.splitlines() if line.startswith("| round |"))
    assert header == "| round | rm_accuracy | win_rate | rm_true_accuracy |"
    assert "| 1 | 0.6 | 0.5 [0.4, 0.6] | 0.55 [0.4, 0.7] |" in text


def matplotlib_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))
