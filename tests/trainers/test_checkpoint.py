"""Checkpoints: atomic, no pickle, and exact resume: a run stopped and resumed reproduces the
uninterrupted run's metrics for the same seed (SFT, GRPO with LoRA, PPO)."""

from __future__ import annotations

import json

import pytest

from fastrlhf.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from fastrlhf.trainers.checkpoint import latest_checkpoint
from fastrlhf.trainers.metrics import read_metrics

from helpers.rl import TOY_PROMPTS, toy_judge, toy_policy, toy_tokenizer

SFT_ROWS = [{"prompt": f"{a} ", "completion": f"abc {a}"} for a in ("x", "y", "z", "b")] * 2


def build(kind, out, **kw):
    common = dict(output_dir=str(out), progress=False, tensorboard=False, seed=3, **kw)
    if kind == "sft":
        return SFTTrainer(toy_policy(), toy_tokenizer(), SFT_ROWS,
                          SFTConfig(learning_rate=3e-3, batch_size=4, micro_batch_size=2, **common))
    if kind == "grpo":
        return GRPOTrainer(toy_policy(), toy_tokenizer(), TOY_PROMPTS, toy_judge(),
                           GRPOConfig(learning_rate=1e-2, prompts_per_step=2, group_size=4, max_new_tokens=5,
                                      lora_r=4, kl_coef=0.05, epochs=2, num_minibatches=2, **common))
    return PPOTrainer(toy_policy(), toy_tokenizer(), TOY_PROMPTS, toy_judge(),
                      PPOConfig(learning_rate=1e-2, prompts_per_step=4, max_new_tokens=5, kl_target=0.5,
                                normalize_rewards=True, **common))


def strip_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in records]


@pytest.mark.parametrize("kind", ["sft", "grpo", "ppo"])
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, kind):
    full = build(kind, tmp_path / "full", max_steps=4)
    full.train()
    part = build(kind, tmp_path / "part", max_steps=2)
    part.train()
    resumed = build(kind, tmp_path / "part", max_steps=4)  # a fresh process would rebuild everything too
    resumed.train(resume=True)
    a, b = strip_times(read_metrics(tmp_path / "full")), strip_times(read_metrics(tmp_path / "part"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b


def test_checkpoint_layout_is_safetensors_and_json(tmp_path):
    tr = build("grpo", tmp_path / "run", max_steps=2, save_every=1, keep_checkpoints=1)
    tr.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "optimizer.json", "optimizer.safetensors",
                                                      "rng.safetensors", "state.json", "weights.safetensors"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-000002"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and "sampler" in state["trainer"] and "kl" in state["trainer"]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "weights.safetensors"))
    assert weights and all(".lora_" in k for k in weights)  # LoRA: the adapters alone


def test_a_torn_temporary_checkpoint_does_not_replace_latest(tmp_path):
    tr = build("sft", tmp_path / "run", max_steps=1)
    tr.train()
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step-000002-999").mkdir()  # what a kill during the next save leaves behind
    (root / ".tmp-step-000002-999" / "weights.safetensors").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path / "run").name == "step-000001"
    resumed = build("sft", tmp_path / "run", max_steps=2)
    assert resumed.resume() == 1
