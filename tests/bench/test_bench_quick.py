"""Every benchmark script runs end to end with --quick (a few seconds) and reports every
provider; speed targets live in the benchmarks themselves, never in tests. Results go to --out
(never to the committed bench/results/), bench/all.py prints each row once and its summary keeps
the rows of the benchmarks it did not run."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
RESULTS = os.path.join(BENCH, "results")
SCRIPTS = ["gae", "group_advantages", "whiten", "td_targets", "token_logprobs", "losses", "preference_loss", "sample",
           "attention", "generate", "allocator"]
PROVIDERS = {
    "gae": {"kernel", "loop", "vectorized", "reference"},
    "group_advantages": {"kernel", "eager", "reference"},
    "whiten": {"kernel", "eager_trl", "reference"},
    "td_targets": {"kernel", "eager", "reference"},
    "token_logprobs": {"kernel", "eager", "reference"},
    "losses": {"kernel", "eager"},
    "preference_loss": {"kernel", "eager_trl", "reference"},
    "sample": {"kernel", "sort_based", "reference"},
    "attention": {"kernel", "sdpa", "sdpa_packed_gqa", "sdpa_repeat_kv", "reference"},
    "generate": {"fastrlhf", "fastrlhf_hf_adapter", "transformers"},
    "allocator": {"glibc default", "retained"},
}


@pytest.fixture
def harness():
    sys.path.insert(0, BENCH)
    try:
        import _harness as H
    finally:
        sys.path.remove(BENCH)
    return H


def results_state():
    """Names and modification times of the committed results: no test may change them."""
    return {f: os.stat(os.path.join(RESULTS, f)).st_mtime_ns for f in sorted(os.listdir(RESULTS))}


def run(args, timeout=300):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_quick_runs(name, tmp_path):
    out = run([os.path.join(BENCH, f"{name}.py"), "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert "copy_bandwidth_GBps" in out.stdout
    assert "CUDA" not in out.stderr, out.stderr
    table = out.stdout.split("\n")
    for provider in PROVIDERS[name]:
        assert any(f" {provider} " in line for line in table), f"{provider} missing:\n{out.stdout}"
    assert os.listdir(tmp_path) == [f"{name}-cpu-quick.json"]
    data = json.load(open(tmp_path / f"{name}-cpu-quick.json"))
    assert data["quick"] and data["date"] and {r["provider"] for r in data["rows"]} >= PROVIDERS[name]


def test_bench_all_quick_one_table(tmp_path):
    before = results_state()
    out = run([os.path.join(BENCH, "all.py"), "--quick", "--device", "cpu", "--only", "gae,whiten",
               "--out", str(tmp_path)])
    assert results_state() == before
    assert "== all benchmarks" in out.stdout
    head, tail = out.stdout.split("== all benchmarks")
    assert "gae" in tail and "whiten" in tail and "group_advantages" not in tail
    # each row printed once: the scripts print no table of their own under all.py
    assert "provider" not in head and " kernel " not in head
    assert sorted(os.listdir(tmp_path)) == ["gae-cpu-quick.json", "summary-cpu-quick.txt", "whiten-cpu-quick.json"]


def test_bench_all_summary_keeps_earlier_rows(tmp_path, harness):
    H = harness
    earlier = {"bench": "whiten", "quick": True, "device": "cpu", "date": "2001-02-03T04:05:06+00:00",
               "context": {"copy_bandwidth_GBps": 10.0},
               "rows": [vars(H.Row("whiten", "16x128", "fp32", "kernel", 0.5, gbps=12.0))]}
    (tmp_path / "whiten-cpu-quick.json").write_text(json.dumps(earlier))
    run([os.path.join(BENCH, "all.py"), "--quick", "--device", "cpu", "--only", "gae", "--out", str(tmp_path)])
    summary = (tmp_path / "summary-cpu-quick.txt").read_text()
    assert "kept from earlier runs (their JSON beside this file): whiten (2001-02-03 04:05)" in summary
    whiten = [line for line in summary.splitlines() if line.startswith("whiten ")]
    assert len(whiten) == 1 and "2001-02-03 04:05" in whiten[0] and "120%*" in whiten[0]
    gae = [line for line in summary.splitlines() if line.startswith("gae ")]
    assert gae and not any("2001" in line for line in gae)
    assert json.loads((tmp_path / "whiten-cpu-quick.json").read_text()) == earlier  # untouched


def test_bench_all_rejects_unknown():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "all.py"), "--only", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown benchmark" in out.stderr


def test_quick_results_never_go_to_committed_results(harness):
    with pytest.raises(SystemExit):
        harness.parser("x").parse_args(["--quick", "--device", "cpu", "--out", harness.RESULTS_DIR])
    args = harness.parser("x").parse_args(["--quick", "--device", "cpu", "--out", harness.RESULTS_DIR, "--no-save"])
    assert args.no_save
    assert harness.parser("x").parse_args([]).out == harness.OUT_DIR


def test_device_cpu_asks_nothing_of_cuda(harness, monkeypatch):
    def fail():
        raise AssertionError("torch.cuda.is_available() called with --device cpu")

    monkeypatch.setattr(harness.torch.cuda, "is_available", fail)
    assert harness.parser("x").parse_args(["--device", "cpu"]).device == "cpu"


def test_harness_writes_results(tmp_path, harness):
    H = harness
    args = H.parser("x").parse_args(["--device", "cpu", "--out", str(tmp_path)])
    rows = [H.Row("op", "1x1", "fp32", "kernel", 1.0), H.Row("op", "1x1", "fp32", "eager", 3.0)]
    H.add_speedups(rows, "eager")
    assert rows[0].speedup == pytest.approx(3.0) and rows[0].vs == "eager"
    H.report("unit", rows, args, {"k": 1})
    data = json.load(open(tmp_path / "unit-cpu.json"))
    assert data["rows"][0]["provider"] == "kernel" and data["context"] == {"k": 1}
    result, loaded = H.load_result(str(tmp_path / "unit-cpu.json"))
    assert loaded == rows and H.run_date(str(tmp_path / "unit-cpu.json"), result) == data["date"][:16].replace("T", " ")


def test_table_names_the_ceiling_and_flags_fractions_above_it(harness):
    H = harness
    rows = [H.Row("op", "a", "fp32", "kernel", 1.0, gbps=45.0), H.Row("op", "b", "fp32", "kernel", 1.0, gbps=15.0)]
    H.set_ceilings(rows, {"copy_bandwidth_GBps": 30.0})
    table = H.format_table(rows)
    lines = table.splitlines()
    assert "ceiling GB/s" in lines[0]
    assert "30.0" in lines[2] and "150%*" in lines[2] and "50%" in lines[3] and "50%*" not in lines[3]
    assert any(line.startswith("* above the run's measured copy ceiling") for line in lines)
    assert "above" not in H.format_table(rows[1:])


def test_speedups_also_against_other_baselines(harness):
    H = harness
    rows = [H.Row("d", "s", "fp32", p, ms) for p, ms in (("kernel", 1.0), ("sdpa", 4.0), ("sdpa_packed_gqa", 2.0))]
    H.add_speedups(rows, "sdpa", also=("sdpa_packed_gqa",))
    assert rows[0].speedup == pytest.approx(4.0) and rows[0].vs == "sdpa"
    assert rows[0].extra["speedup_also"] == {"sdpa_packed_gqa": pytest.approx(2.0)}
    assert "2.0x vs sdpa_packed_gqa" in H.format_table(rows)
