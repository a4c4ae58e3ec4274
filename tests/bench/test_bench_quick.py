"""Every benchmark script runs end to end with --quick (a few seconds) and reports every
provider; speed targets live in the benchmarks themselves, never in tests."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
SCRIPTS = ["gae", "group_advantages", "whiten", "td_targets", "token_logprobs", "losses", "preference_loss", "sample",
           "attention", "generate"]
PROVIDERS = {
    "gae": {"kernel", "loop", "vectorized", "reference"},
    "group_advantages": {"kernel", "eager", "reference"},
    "whiten": {"kernel", "eager_trl", "reference"},
    "td_targets": {"kernel", "eager", "reference"},
    "token_logprobs": {"kernel", "eager", "reference"},
    "losses": {"kernel", "eager"},
    "preference_loss": {"kernel", "eager_trl", "reference"},
    "sample": {"kernel", "sort_based", "reference"},
    "attention": {"kernel", "sdpa", "reference"},
    "generate": {"fastrlhf", "fastrlhf_hf_adapter", "transformers"},
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_quick_runs(name):
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, f"{name}.py"), "--quick", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "copy_bandwidth_GBps" in out.stdout
    table = out.stdout.split("\n")
    for provider in PROVIDERS[name]:
        assert any(f" {provider} " in line for line in table), f"{provider} missing:\n{out.stdout}"


def test_bench_all_quick_one_table(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "all.py"), "--quick", "--device", "cpu", "--only", "gae,whiten"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== all benchmarks" in out.stdout
    tail = out.stdout.split("== all benchmarks")[1]
    assert "gae" in tail and "whiten" in tail and "group_advantages" not in tail


def test_bench_all_rejects_unknown():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "all.py"), "--only", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown benchmark" in out.stderr


def test_harness_writes_results(tmp_path, monkeypatch):
    sys.path.insert(0, BENCH)
    try:
        import _harness as H
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setattr(H, "RESULTS_DIR", str(tmp_path))
    args = H.parser("x").parse_args(["--device", "cpu"])
    rows = [H.Row("op", "1x1", "fp32", "kernel", 1.0), H.Row("op", "1x1", "fp32", "eager", 3.0)]
    H.add_speedups(rows, "eager")
    assert rows[0].speedup == pytest.approx(3.0) and rows[0].vs == "eager"
    H.report("unit", rows, args, {"k": 1})
    data = json.load(open(tmp_path / "unit-cpu.json"))
    assert data["rows"][0]["provider"] == "kernel" and data["context"] == {"k": 1}
