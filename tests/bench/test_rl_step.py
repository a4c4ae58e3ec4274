"""bench/rl_step.py runs end to end with --quick (a tiny model, 8 new tokens) and reports both
providers' GRPO and PPO steps and their phases; the speed target lives in the benchmark itself."""

import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def test_rl_step_quick_reports_both_providers():
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "rl_step.py"), "--quick", "--device", "cpu", "--no-save"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matmul_GFLOPs" in out.stdout and "parameters" in out.stdout
    table = out.stdout.split("\n")
    for op in ("grpo step", "ppo step", "grpo generate", "grpo reference", "grpo train", "ppo generate", "ppo train"):
        for provider in ("fastrlhf", "plain"):
            assert any(line.startswith(op) and f" {provider} " in line for line in table), \
                f"{op} / {provider} missing:\n{out.stdout}"
    assert any(line.startswith("grpo step") and "x vs plain" in line for line in table), out.stdout
