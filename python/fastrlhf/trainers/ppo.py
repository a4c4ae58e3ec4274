"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), as CleanRL writes it:
rollouts -> token rewards (the score at the last response token, minus ``kl_coef`` x k1 KL to
the reference at every token) -> values -> GAE -> whitened advantages -> epochs of clipped policy
and value updates.

The critic is a value head on the policy's own trunk (one forward for both losses) or a separate
:class:`~fastrlhf.models.ValueModel`. The KL sits in the reward (k1; ``kl_target`` makes its
coefficient adaptive) or, with ``kl_in_loss``, in the loss (k3, as GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf import ops
from fastrlhf.config import option
from fastrlhf.models import PolicyWithValue, ValueModel
from fastrlhf.trainers import rollout as ro
from fastrlhf.trainers.kl_control import KLController
from fastrlhf.trainers.rl import Batch, RLConfig, RLTrainer


@dataclass
class PPOConfig(RLConfig):
    """PPO with a critic and GAE."""

    epochs: int = option(2, "passes over each rollout batch", min=1)
    num_minibatches: int = option(2, "optimizer steps per epoch", min=1)
    kl_coef: float = option(0.05, "KL-to-reference weight (in the reward, k1; in the loss with kl_in_loss)", min=0.0)
    kl_target: float | None = option(None, "adaptive KL: steer the mean KL per sequence toward this (None: fixed)",
                                     min=0.0, min_exclusive=True)
    kl_horizon: int = option(10000, "adaptive KL horizon in samples", min=1)
    kl_in_loss: bool = option(False, "put the KL in the loss (kl_estimator, k3 by default) instead of the reward")
    gamma: float = option(1.0, "discount", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE lambda", min=0.0, max=1.0)
    vf_coef: float = option(0.1, "value loss weight", min=0.0)
    value_clip: float | None = option(0.2, "clip the value change around the rollout's values (None: off)", min=0.0,
                                      min_exclusive=True)
    whiten_advantages: bool = option(True, "whiten advantages over the batch")
    normalize_rewards: bool = option(False, "divide scores by their running std (and center them) before use")
    critic: str = option("shared", "'shared': a value head on the policy's trunk; 'separate': its own trunk")


class PPOTrainer(RLTrainer):
    """PPO of a :class:`~fastrlhf.models.CausalLM` against a judge.

    Args:
        policy: the model to improve (LoRA applied when ``config.lora_r > 0``).
        tokenizer: its tokenizer.
        prompts: rows with a ``prompt`` field (or a path).
        judge: a :class:`~fastrlhf.feedback.Judge` (or ``CompositeFeedback``).
        config: a :class:`PPOConfig`.
        reference: an explicit frozen reference model (default: per ``config.reference``).
        value_model: a separate critic (default: built per ``config.critic``).
    """

    name = "ppo"

    def __init__(self, policy, tokenizer, prompts, judge, config: PPOConfig, *, reference=None,
                 value_model: ValueModel | None = None):
        if config.critic not in ("shared", "separate"):
            raise ValueError(f"PPOConfig.critic must be 'shared' or 'separate', got {config.critic!r}")
        if value_model is None and config.critic == "separate":
            value_model = ValueModel.from_causal_lm(policy)
        self.pv = PolicyWithValue(policy, value_model)
        critic = self.pv.value_head if self.pv.shared_trunk else self.pv.value_model
        super().__init__(policy, tokenizer, prompts, judge, config, reference=reference,
                         extra_modules={"critic": critic})
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.score_stats = [0, 0.0, 0.0]  # running count, mean, M2 of raw scores (normalize_rewards)

    def kl_in_loss(self) -> bool:
        return self.config.kl_in_loss

    def needs_hidden(self) -> bool:
        return self.pv.shared_trunk

    @torch.no_grad()
    def _values(self, rollout: ro.Rollout) -> torch.Tensor:
        """``[B, L]`` critic values at the positions that predict each response token."""
        P, out = rollout.prompt_length, []
        was = self.pv.training
        self.pv.eval()
        for i in range(0, rollout.sequences.shape[0], self.config.micro_batch_size):
            sl = slice(i, i + self.config.micro_batch_size)
            out.append(self._value_forward(rollout.sequences[sl], rollout.attention_mask[sl], None)[:, P - 1:-1])
        self.pv.train(was)
        return torch.cat(out) * rollout.response_mask

    def _value_forward(self, seqs, attn, hidden):
        if self.pv.shared_trunk:
            if hidden is None:
                hidden = self.pv.policy(seqs, attn, return_hidden=True)
            return self.pv.value_head(hidden)  # (b, P + L)
        return self.pv.value_model(seqs, attn)

    def _normalize(self, scores: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.normalize_rewards:
            n, mean, m2 = self.score_stats
            for x in scores.tolist():  # Welford over every score seen
                n += 1
                d = x - mean
                mean += d / n
                m2 += d * (x - mean)
            self.score_stats = [n, mean, m2]
            std = (m2 / (n - 1)) ** 0.5 if n > 1 else 1.0
            scores = (scores - mean) / max(std, 1e-6)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return scores

    def advantages(self, rollout: ro.Rollout) -> Batch:
        cfg = self.config
        mask = rollout.response_mask.bool()
        scores = self._normalize(rollout.scores)
        rewards = torch.zeros_like(rollout.logprobs)  # (B, L)
        metrics = {}
        if rollout.ref_logprobs is not None:
            kl = ops.kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator="k1") * mask
            seq_kl = float(kl.sum() / max(1, mask.shape[0]))
            metrics["kl"] = float(kl.sum() / mask.sum().clamp(min=1))
            metrics["kl_per_sequence"] = seq_kl
            if not cfg.kl_in_loss:
                rewards = rewards - self.kl.value * kl
            self.kl.update(seq_kl, mask.shape[0])
        last = (rollout.response_lengths - 1).clamp(min=0)
        rewards[torch.arange(rewards.shape[0]), last] += scores
        values = self._values(rollout)
        adv, ret = ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = self.reducer.whiten(adv, mask)
        metrics["value_mean"] = float((values * mask).sum() / mask.sum().clamp(min=1))
        return Batch(rollout, adv, rollout.logprobs, {"values": values, "returns": ret, "metrics": metrics})

    def extra_loss(self, batch: Batch, rows: torch.Tensor, hidden, normalizer: float):
        cfg, r = self.config, batch.rollout
        P = r.prompt_length
        v = self._value_forward(r.sequences[rows], r.attention_mask[rows], hidden)[:, P - 1:-1]  # (b, L)
        loss, stats = ops.value_loss(v.float(), batch.extras["values"][rows], batch.extras["returns"][rows],
                                     r.response_mask[rows].bool(), clip=cfg.value_clip, agg=cfg.agg,
                                     normalizer=normalizer, norm_length=float(cfg.max_new_tokens))
        return cfg.vf_coef * loss, {"value_loss": loss.detach(), "value_clipfrac": stats["clipfrac"],
                                    "explained_variance": stats["explained_variance"]}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "score_stats": self.score_stats}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.score_stats = list(state["score_stats"])
