"""PPOTrainer: learns the toy task, one update equals a plain-PyTorch PPO step (policy + clipped
value loss with GAE on k1-shaped rewards), the adaptive KL controller moves, a separate critic
works."""

from __future__ import annotations

import copy

import pytest
import torch

from fastrlhf.trainers import PPOConfig, PPOTrainer
from fastrlhf.trainers.kl_control import KLController
from fastrlhf.trainers.metrics import read_metrics

from helpers.rl import TOY_PROMPTS, toy_judge, toy_policy, toy_tokenizer


def make(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=1e-2, prompts_per_step=8,
                max_new_tokens=6, progress=False, tensorboard=False, micro_batch_size=8)
    base.update(kw)
    return PPOTrainer(toy_policy(), toy_tokenizer(), TOY_PROMPTS, toy_judge(), PPOConfig(**base))


def test_ppo_learns_the_toy_task(tmp_path):
    tr = make(tmp_path, max_steps=30, prompts_per_step=32, kl_coef=0.0, lam=1.0, epochs=1, num_minibatches=1)
    tr.train()
    r = [m["reward"] for m in read_metrics(tr.run_dir)]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.15, r


def plain_ppo_step(pv, batch, cfg):
    """The PPO update written with plain PyTorch (CleanRL-style) on the trainer's batch."""
    r = batch.rollout
    P = r.prompt_length
    params = [p for p in pv.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    hidden = pv.policy(r.sequences, r.attention_mask, return_hidden=True)
    logits = pv.policy.logits(hidden)[:, P - 1:-1].float() / cfg.temperature
    lp = torch.log_softmax(logits, -1).gather(-1, r.sequences[:, P:, None]).squeeze(-1)
    mask = r.response_mask.float()
    ratio = torch.exp(lp - batch.old_logprobs)
    adv = batch.advantages
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_low))
    v = pv.value_head(hidden)[:, P - 1:-1]
    old_v, ret = batch.extras["values"], batch.extras["returns"]
    v_clip = old_v + (v - old_v).clamp(-cfg.value_clip, cfg.value_clip)
    vl = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    n = mask.sum()
    loss = (pg * mask).sum() / n + cfg.vf_coef * (vl * mask).sum() / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()


def test_one_update_matches_plain_pytorch(tmp_path):
    # adam_eps=1: AdamW's first step is otherwise lr * sign(g) (see test_grpo)
    tr = make(tmp_path, micro_batch_size=3, adam_eps=1.0, epochs=1, num_minibatches=1, kl_coef=0.1)
    torch.manual_seed(0)
    batch = tr.advantages(tr.make_rollout())
    assert batch.rollout.ref_logprobs is not None
    ref = copy.deepcopy(tr.pv)
    plain_ppo_step(ref, batch, tr.config)
    tr._update(batch)
    for (name, a), (_, b) in zip(tr.pv.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


def test_rewards_are_kl_shaped_with_the_score_at_the_last_token(tmp_path):
    tr = make(tmp_path, kl_coef=0.5, whiten_advantages=False, gamma=1.0, lam=1.0)
    rollout = tr.make_rollout()
    tr._values = lambda r: torch.zeros_like(r.logprobs)  # no critic: advantages are the returns
    batch = tr.advantages(rollout)
    m = rollout.response_mask
    kl = (rollout.logprobs - rollout.ref_logprobs) * m
    want = -0.5 * kl
    want[torch.arange(m.shape[0]), m.sum(1) - 1] += rollout.scores
    returns = want.flip(1).cumsum(1).flip(1) * m  # gamma = lam = 1: reward-to-go
    torch.testing.assert_close(batch.advantages, returns, rtol=1e-5, atol=1e-6)


def test_adaptive_kl_controller():
    c = KLController(0.1, target=1.0, horizon=100)
    assert c.update(3.0, 10) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    c = KLController(0.1, target=1.0, horizon=100)
    assert c.update(0.5, 10) == pytest.approx(0.1 * (1 - 0.02))  # error -0.5 clipped at -0.2
    c = KLController(0.1, target=1.0, horizon=100)
    assert c.update(1.1, 10) == pytest.approx(0.1 * (1 + 0.01))  # error 0.1, 10 of 100 samples
    fixed = KLController(0.1)
    assert fixed.update(5.0, 10) == 0.1 and not fixed.adaptive


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_critic_kinds_run_and_log(tmp_path, critic):
    tr = make(tmp_path, critic=critic, kl_target=0.1)
    out = tr.train()
    assert {"value_loss", "explained_variance", "kl", "clipfrac", "logprob_gap"} <= set(out)
    assert out["logprob_gap"] < 1e-5
