"""GRPOTrainer: learns the toy task, matches a plain-PyTorch GRPO step, keeps rollout and training
log-probs consistent, and every advantage variant runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastrlhf.trainers import GRPOConfig, GRPOTrainer
from fastrlhf.trainers.metrics import read_metrics

from helpers.rl import TOY_PROMPTS, toy_judge, toy_policy, toy_tokenizer


def make(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=1e-2, prompts_per_step=4, group_size=4,
                max_new_tokens=6, progress=False, tensorboard=False, micro_batch_size=8)
    base.update(kw)
    return GRPOTrainer(toy_policy(), toy_tokenizer(), TOY_PROMPTS, toy_judge(), GRPOConfig(**base))


def test_grpo_learns_the_toy_task(tmp_path):
    tr = make(tmp_path, max_steps=20, group_size=8, learning_rate=3e-2)
    tr.train()
    r = [m["reward"] for m in read_metrics(tr.run_dir)]
    assert len(r) == 20
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.3, r


def test_rollout_and_training_logprobs_agree_in_fp32(tmp_path):
    tr = make(tmp_path, max_steps=3)
    tr.train()
    gaps = [m["logprob_gap"] for m in read_metrics(tr.run_dir)]
    assert all(g < 1e-5 for g in gaps), gaps


def plain_grpo_step(model, batch, cfg):
    """The same update written with plain PyTorch: log_softmax + gather, the clipped surrogate,
    token-mean over the mini-batch, grad clipping, AdamW."""
    r = batch.rollout
    P = r.prompt_length
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    logits = model(r.sequences, r.attention_mask)[:, P - 1:-1].float() / cfg.temperature  # (B, L, V)
    lp = torch.log_softmax(logits, -1).gather(-1, r.sequences[:, P:, None]).squeeze(-1)
    ratio = torch.exp(lp - batch.old_logprobs)
    adv = batch.advantages[:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_low))
    mask = r.response_mask.float()
    loss = (pg * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    opt.step()
    return loss


def test_one_update_matches_plain_pytorch(tmp_path):
    # micro-batches of 3 rows exercise gradient accumulation. adam_eps=1: AdamW's first step is otherwise
    # lr * sign(g), which turns rounding-level gradient differences of near-zero entries into lr-sized ones
    tr = make(tmp_path, micro_batch_size=3, adam_eps=1.0)
    torch.manual_seed(0)
    rollout = tr.make_rollout()
    batch = tr.advantages(rollout)
    ref_model = copy.deepcopy(tr.policy)
    plain_grpo_step(ref_model, batch, tr.config)
    tr._update(batch)
    for (name, a), (_, b) in zip(tr.policy.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce++"])
def test_every_advantage_variant_runs_with_kl(tmp_path, advantage):
    agg = "seq-mean-token-sum-norm" if advantage == "dr_grpo" else "token-mean"
    tr = make(tmp_path, advantage=advantage, kl_coef=0.05, agg=agg)
    out = tr.train()
    assert math.isfinite(out["loss"]) and out["updates"] == 1
    assert tr.reference is not None  # full fine-tuning: a frozen copy


def test_lora_reference_is_the_disabled_base_and_kl_grows(tmp_path):
    tr = make(tmp_path, lora_r=4, kl_coef=0.1, max_steps=4)
    assert tr.reference is None  # no second copy of the weights
    tr.train()
    kls = [m["loss/kl"] if "loss/kl" in m else m["kl"] for m in read_metrics(tr.run_dir)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0


def test_dynamic_sampling_drops_groups_with_equal_rewards(tmp_path):
    tr = make(tmp_path, dynamic_sampling=True)
    rollout = tr.make_rollout()
    rollout.scores = torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [0.5] * 4 + [0.2, 0.3, 0.2, 0.2])
    batch = tr.advantages(rollout)
    assert batch.rollout.sequences.shape[0] == 8 and batch.extras["metrics"]["kept_groups"] == 2.0


def test_config_errors_name_the_field():
    from fastrlhf.config import ConfigError

    with pytest.raises(ConfigError, match="group_size >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match=r"GRPOConfig.advantage: must be one of"):
        GRPOConfig(advantage="ppo")
    with pytest.raises(ConfigError, match=r"GRPOConfig.clip_low: must be <= 1.0"):
        GRPOConfig(clip_low=1.5)
