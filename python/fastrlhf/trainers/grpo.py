"""GRPO and its relatives: several completions per prompt, advantages from the group's scores,
no value model, the KL to the reference inside the loss.

``advantage``:

* ``grpo``: ``(s - mean_group) / std_group`` (Shao et al. 2024);
* ``dr_grpo``: ``s - mean_group`` (Liu et al. 2025; pair with ``agg="seq-mean-token-sum-norm"``);
* ``rloo``: ``s - mean(others in the group)`` (Ahmadian et al. 2024);
* ``reinforce++``: token rewards ``-kl_coef * k1 + score at the last token``, discounted returns
  (``ops.discounted_returns``), whitened over the global batch (Hu 2025); the KL then lives in the
  reward, not the loss.

DAPO's options: ``clip_high`` (clip-higher) and ``dynamic_sampling`` (groups whose rewards are all
equal carry no signal and are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastrlhf import ops
from fastrlhf.config import ConfigError, option
from fastrlhf.trainers import rollout as ro
from fastrlhf.trainers.rl import Batch, RLConfig, RLTrainer


@dataclass
class GRPOConfig(RLConfig):
    """GRPO / Dr. GRPO / RLOO / REINFORCE++."""

    group_size: int = option(4, "completions per prompt", min=1)
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce++"] = option("grpo", "how scores become advantages")
    gamma: float = option(1.0, "discount of REINFORCE++ returns", min=0.0, max=1.0)
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards are all equal")
    kl_coef: float = option(0.0, "KL-to-reference weight (GRPO's beta; in the loss, in the reward for "
                            "reinforce++)", min=0.0)

    def validate(self):
        super().validate()
        if self.advantage in ("grpo", "dr_grpo", "rloo") and self.group_size < 2:
            raise ConfigError(f"GRPOConfig: advantage={self.advantage!r} needs group_size >= 2")


class GRPOTrainer(RLTrainer):
    """GRPO-family policy optimization of a :class:`~fastrlhf.models.CausalLM`.

    Args:
        policy: the model to improve (LoRA applied when ``config.lora_r > 0``).
        tokenizer: its tokenizer.
        prompts: rows with a ``prompt`` field (a path :func:`~fastrlhf.data.load_rows` reads, or rows).
        judge: a :class:`~fastrlhf.feedback.Judge` (or ``CompositeFeedback``) scoring completions.
        config: a :class:`GRPOConfig`.
        reference: an explicit frozen reference model (default: per ``config.reference``).
    """

    name = "grpo"

    def __init__(self, policy, tokenizer, prompts, judge, config: GRPOConfig, *, reference=None):
        self.group_size = config.group_size
        super().__init__(policy, tokenizer, prompts, judge, config, reference=reference)

    def kl_in_loss(self) -> bool:
        return self.config.advantage != "reinforce++"

    def advantages(self, rollout: ro.Rollout) -> Batch:
        cfg, G = self.config, self.group_size
        scores = rollout.scores
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        metrics = {}
        if cfg.dynamic_sampling:
            groups = scores.view(-1, G)
            keep = (groups.max(1).values > groups.min(1).values).repeat_interleave(G)
            metrics["kept_groups"] = float(keep.view(-1, G)[:, 0].sum())
            rollout = rollout.select(keep.nonzero().squeeze(1))
            scores = scores[keep]
        if cfg.advantage == "reinforce++":
            mask = rollout.response_mask
            rewards = torch.zeros_like(rollout.logprobs)
            if rollout.ref_logprobs is not None and self.kl.value > 0:
                rewards = -self.kl.value * ops.kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator="k1")
                metrics["kl"] = float((ops.kl_penalty(rollout.logprobs, rollout.ref_logprobs) * mask).sum()
                                      / mask.sum().clamp(min=1))
            last = (rollout.response_lengths - 1).clamp(min=0)
            rewards = rewards * mask
            rewards[torch.arange(rewards.shape[0]), last] += scores
            returns = ops.discounted_returns(rewards, mask.bool(), gamma=cfg.gamma)
            adv = self.reducer.whiten(returns, mask.bool())
        else:
            adv = ops.group_advantages(scores, G, normalize="std" if cfg.advantage == "grpo" else "none",
                                       leave_one_out=cfg.advantage == "rloo")
        return Batch(rollout, adv, rollout.logprobs, {"metrics": metrics})
