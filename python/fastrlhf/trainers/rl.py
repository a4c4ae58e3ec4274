"""The part PPO and GRPO share: a step samples prompts, rolls the policy out, scores the
completions, computes reference log-probs, lets the algorithm turn scores into advantages, then
runs ``epochs`` x mini-batch updates of the clipped policy loss (plus a value loss in PPO).

The policy loss runs through ``CausalLM.token_loss`` (its LM-head gradients made chunk by chunk
in the forward) with ``ops.policy_loss`` as the loss function, normalized by the mini-batch's
global count, so micro-batches add up to the mini-batch gradient exactly.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from fastrlhf import ops
from fastrlhf.config import ConfigError, option
from fastrlhf.data import Rows, load_rows
from fastrlhf.generation import GenerationConfig
from fastrlhf.ops import AggMode, KLEstimator
from fastrlhf.trainers import rollout as ro
from fastrlhf.trainers.base import BatchSampler, TrainConfig, Trainer, micro_batches, prepare_model
from fastrlhf.trainers.guardrails import GuardrailConfig, Guardrails
from fastrlhf.trainers.kl_control import KLController


@dataclass
class RLConfig(TrainConfig):
    """Sampling, clipping, KL and update settings shared by PPO and GRPO."""

    learning_rate: float = option(1e-6, "peak learning rate (AdamW)", min=0.0, min_exclusive=True)
    prompts_per_step: int = option(16, "prompts sampled per step", min=1)
    max_prompt_length: int | None = option(None, "keep the last N prompt tokens (None: whole prompts)", min=1)
    max_new_tokens: int = option(128, "tokens generated per completion at most", min=1)
    temperature: float = option(1.0, "sampling temperature (also the temperature of every log-prob)", min=0.0,
                                min_exclusive=True)
    top_p: float = option(1.0, "nucleus sampling", min=0.0, max=1.0, min_exclusive=True)
    top_k: int = option(0, "top-k sampling (0: off)", min=0)
    epochs: int = option(1, "passes over each rollout batch (PPO epochs / GRPO iterations)", min=1)
    num_minibatches: int = option(1, "optimizer steps per epoch (the rollout batch split in this many)", min=1)
    clip_low: float = option(0.2, "PPO's epsilon: the ratio clipped below at 1 - clip_low", min=0.0, max=1.0)
    clip_high: float | None = option(None, "upper clip 1 + clip_high (DAPO's clip-higher; None: clip_low)", min=0.0)
    dual_clip: float | None = option(None, "dual-clip PPO's c > 1 for negative advantages (None: off)", min=1.0,
                                     min_exclusive=True)
    agg: AggMode = option("token-mean", "how token losses become a scalar (ops.policy_loss's agg)")
    entropy_coef: float = option(0.0, "entropy bonus weight", min=0.0)
    kl_coef: float = option(0.0, "KL-to-reference weight (GRPO: in the loss; PPO: in the reward)", min=0.0)
    kl_estimator: KLEstimator = option("k3", "per-token KL estimator of the KL term")
    missing_eos_penalty: float | None = option(None, "added to the score of completions that hit max_new_tokens "
                                               "without a stop token")
    reward_clip: float | None = option(None, "clip scores to [-c, c] after normalization (None: no clip)", min=0.0,
                                       min_exclusive=True)
    target_kl: float | None = option(None, "stop the step's updates early when approx_kl exceeds this", min=0.0,
                                     min_exclusive=True)
    rollout_is: Literal["off", "on"] = option("off", "truncated importance sampling between rollout and training "
                                              "log-probs (for bf16 rollouts); on: an extra forward per step")
    rollout_is_cap: float = option(2.0, "the truncation of the importance weight", min=1.0)
    rollout_is_threshold: float = option(1e-4, "rollout_is stays off while max |log-prob gap| is below this",
                                         min=0.0)
    reference: Literal["auto", "copy", "lora_base"] = option(
        "auto", "the KL reference: the LoRA-disabled base (no weight copy) or a frozen copy; auto picks by LoRA")
    guardrails: GuardrailConfig = option(default_factory=GuardrailConfig, help="KL / entropy / reward / length "
                                         "detectors")

    def validate(self):
        if self.agg == "seq-mean-token-sum-norm" and self.max_new_tokens < 1:
            raise ConfigError("RLConfig: seq-mean-token-sum-norm needs max_new_tokens")


@dataclass
class Batch:
    """What the update loop needs per row (``[B, L]`` unless noted)."""

    rollout: ro.Rollout
    advantages: torch.Tensor  # [B] per sequence or [B, L] per token
    old_logprobs: torch.Tensor
    extras: dict = field(default_factory=dict)  # algorithm-specific (values, returns)


class RLTrainer(Trainer):
    """Shared loop of :class:`~fastrlhf.trainers.PPOTrainer` and
    :class:`~fastrlhf.trainers.GRPOTrainer`; subclasses implement :meth:`advantages` (and, for a
    critic, :meth:`extra_loss`)."""

    group_size = 1

    def __init__(self, policy, tokenizer, prompts, judge, config: RLConfig, *, reference=None,
                 extra_modules: dict | None = None):
        self.policy = prepare_model(policy, config)
        self.tokenizer = tokenizer
        self.judge = judge
        rows = prompts if isinstance(prompts, Rows) else load_rows(prompts)
        if rows.format not in ("prompt", "prompt_completion", "preference", "rating", "binary"):
            raise ConfigError(f"{type(self).__name__}: prompts must be rows with a 'prompt' field, got {rows.format!r}")
        self.prompts = [r["prompt"] for r in rows]
        self.reference = self._reference(reference, config)
        super().__init__(config, {"policy": self.policy, **(extra_modules or {})})
        self.sampler = BatchSampler(len(self.prompts), config.prompts_per_step, seed=config.seed)
        self.kl = KLController(config.kl_coef)
        self.guardrails = Guardrails(config.guardrails, config.max_new_tokens)
        self.rollbacks = 0
        eos = ro.stop_token_ids(policy, tokenizer)
        self.gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                           top_p=config.top_p, top_k=config.top_k, stop_token_ids=eos,
                                           pad_token_id=tokenizer.pad_token_id)

    def _reference(self, reference, config: RLConfig):
        if config.kl_coef == 0 and reference is None:
            return None
        kind = config.reference
        if kind == "auto":
            kind = "lora_base" if config.lora_r > 0 else "copy"
        if reference is not None or kind == "lora_base":
            if kind == "lora_base" and config.lora_r == 0 and reference is None:
                raise ConfigError("RLConfig.reference='lora_base' needs LoRA (lora_r > 0)")
            return reference
        ref = copy.deepcopy(self.policy).eval()
        ref.requires_grad_(False)
        return ref

    def final_model(self):
        return self.policy, self.tokenizer

    def updates_per_step(self) -> int:
        return self.config.epochs * self.config.num_minibatches

    # ---- what the algorithms provide
    def advantages(self, rollout: ro.Rollout) -> Batch:
        raise NotImplementedError

    def extra_loss(self, batch: Batch, rows: torch.Tensor, hidden: torch.Tensor | None, normalizer: float):
        """An additional loss for ``rows`` (PPO's value loss), given the policy's hidden states when
        :meth:`needs_hidden`; -> ``(loss or None, stats)``."""
        return None, {}

    def needs_hidden(self) -> bool:
        return False

    # ---- one step
    def make_rollout(self) -> ro.Rollout:
        cfg = self.config
        prompts = [self.prompts[i] for i in self.sampler.next()]
        self.gen_config.seed = cfg.seed * 1_000_003 + self.step + 7919 * self.rollbacks
        with self.timed("generate"):
            rollout = ro.sample(self.policy, self.tokenizer, prompts, self.gen_config, group_size=self.group_size,
                                max_prompt_length=cfg.max_prompt_length)
        with self.timed("score"):
            ro.score(self.judge, rollout, missing_eos_penalty=cfg.missing_eos_penalty)
        if self.kl.value > 0 or self.reference is not None:
            with self.timed("reference"):
                rollout.ref_logprobs = ro.reference_logprobs(self.policy, self.reference, rollout,
                                                             temperature=cfg.temperature,
                                                             micro_batch_size=cfg.micro_batch_size)
        return rollout

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        rollout = self.make_rollout()
        metrics = _rollout_metrics(rollout)
        for k, v in (getattr(self.judge, "last_stats", None) or {}).items():  # composite feedback: agreement, ...
            if isinstance(v, (int, float)):
                metrics[f"feedback/{k}"] = float(v)
        with self.timed("train"):
            batch = self.advantages(rollout)
            metrics.update(batch.extras.pop("metrics", {}))
            if batch.rollout.sequences.shape[0] == 0:  # dynamic sampling dropped every group
                return {**metrics, "skipped": 1.0}
            if cfg.rollout_is == "on":
                self._importance_weights(batch, metrics)
            for k, v in self._update(batch).items():  # the update's kl (in-loss) does not replace the reward's
                metrics[k if k not in metrics else f"loss/{k}"] = v
        tokens = float(rollout.response_mask.sum())
        metrics["tokens_per_s"] = tokens / max(sum(self.timings.values()), 1e-9)
        metrics["kl_coef"] = self.kl.value
        return metrics

    def _importance_weights(self, batch: Batch, metrics: dict) -> None:
        """Truncated importance sampling: old log-probs recomputed by a training forward, advantages
        weighted by min(pi_train / pi_rollout, cap) - only when the gap is above the threshold."""
        cfg, r = self.config, batch.rollout
        train_lp = ro.response_logprobs(self.policy, r, temperature=cfg.temperature,
                                        micro_batch_size=cfg.micro_batch_size)
        gap = ro.logprob_gap(train_lp, r.logprobs, r.response_mask)
        metrics["rollout_is/gap"] = gap
        if gap < cfg.rollout_is_threshold:
            metrics["rollout_is/active"] = 0.0
            return
        w = torch.exp(train_lp - r.logprobs).clamp(max=cfg.rollout_is_cap) * r.response_mask
        adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(w)
        batch.advantages = adv * w
        batch.old_logprobs = train_lp
        metrics["rollout_is/active"] = 1.0
        metrics["rollout_is/weight_mean"] = float((w * r.response_mask).sum() / r.response_mask.sum().clamp(min=1))

    def _update(self, batch: Batch) -> dict[str, float]:
        cfg, r = self.config, batch.rollout
        B, P = r.sequences.shape[0], r.prompt_length
        dev = self.device
        stats_sum: dict[str, float] = {}
        n_updates, gap, stop_early = 0, None, False
        for epoch in range(cfg.epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed + 7919 * self.step + epoch))
            for mb in torch.tensor_split(order, cfg.num_minibatches):
                if mb.numel() == 0:
                    continue
                mask = r.response_mask[mb]
                normalizer = (self.reducer.count(mask) if cfg.agg == "token-mean"
                              else self.reducer.count(mask.any(1)))
                normalizer = max(normalizer, 1.0)
                for sl in micro_batches(mb.numel(), cfg.micro_batch_size):
                    rows = mb[sl].to(dev)
                    out, extra = self._micro_step(batch, rows, normalizer, P)
                    if epoch == 0 and gap is None and cfg.rollout_is == "off":
                        gap = ro.logprob_gap(out.logprobs, r.logprobs[rows], r.response_mask[rows])
                    for k, v in extra.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * rows.numel() / mb.numel()
                upd = self.optimizer_step()
                n_updates += 1
                for k, v in upd.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v
                if cfg.target_kl is not None and stats_sum.get("approx_kl", 0.0) / n_updates > cfg.target_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        out = {k: v / max(n_updates, 1) for k, v in stats_sum.items()}
        out["updates"] = n_updates
        out["early_stop"] = float(stop_early)
        if gap is not None:
            out["logprob_gap"] = gap
        return out

    def _micro_step(self, batch: Batch, rows: torch.Tensor, normalizer: float, P: int):
        """Forward + backward of ``rows``: policy loss (+ the algorithm's extra loss)."""
        cfg, r = self.config, batch.rollout
        seqs, attn = r.sequences[rows], r.attention_mask[rows]
        old, mask = batch.old_logprobs[rows], r.response_mask[rows].bool()
        adv = batch.advantages[rows]
        ref = r.ref_logprobs[rows] if (r.ref_logprobs is not None and self.kl_in_loss()) else None
        kl_coef = self.kl.value if ref is not None else 0.0
        stats_out: dict[str, torch.Tensor] = {}

        def loss_fn(lp, ent, chunk):  # lp, ent [b, L]: the response tokens (token_loss starts at P - 1)
            loss, st = ops.policy_loss(
                lp, old[chunk], adv[chunk], mask[chunk], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip, ref_logprobs=None if ref is None else ref[chunk], kl_coef=kl_coef,
                kl_estimator=cfg.kl_estimator, entropy=ent, entropy_coef=cfg.entropy_coef, agg=cfg.agg,
                normalizer=normalizer, norm_length=float(cfg.max_new_tokens))
            for k, v in st.items():
                stats_out[k] = stats_out.get(k, 0.0) + v.detach() * (chunk.stop - chunk.start)
            return loss

        with self.autocast():
            hidden = self.policy(seqs, attn, return_hidden=True) if self.needs_hidden() else None
            out = self.policy.token_loss(seqs, loss_fn, attn, hidden=hidden, temperature=cfg.temperature, start=P - 1)
            loss = out.loss
            extra_loss, extra_stats = self.extra_loss(batch, rows, hidden, normalizer)
            if extra_loss is not None:
                loss = loss + extra_loss
        loss.backward()
        n = rows.numel()
        stats = {k: float(v) / n for k, v in stats_out.items()}
        stats["loss"] = float(loss.detach())
        stats.update({k: float(v) for k, v in extra_stats.items()})
        return out, stats

    def kl_in_loss(self) -> bool:
        """GRPO: the KL term sits in the loss; PPO: in the reward (overridden)."""
        return True

    def after_step(self, metrics: dict) -> bool:
        alarms = self.guardrails.check(metrics)
        for a in alarms:
            metrics[f"guardrail/{a.detector}"] = 1.0
        if not alarms:
            return False
        g = self.config.guardrails
        if g.action == "raise_kl":
            self.kl.scale(g.kl_raise_factor)
        elif g.action == "rollback":
            if self.rollbacks >= g.max_rollbacks:
                warnings.warn(f"guardrails: {self.rollbacks} rollbacks did not help; stopping the run", RuntimeWarning,
                              stacklevel=2)
                return True
            self.rollbacks += 1
            # the last checkpoint (save_every sets how far back); later samples differ: their seed counts rollbacks
            metrics["guardrail/rollback_to_step"] = float(self.resume())
        return g.action == "stop"

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "kl": self.kl.state_dict(),
                "guardrails": self.guardrails.state_dict(), "rollbacks": self.rollbacks, **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.kl.load_state_dict(state["kl"])
        self.guardrails.load_state_dict(state["guardrails"])
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))  # a rollback keeps counting
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        state = {}
        if hasattr(self.judge, "state_dict"):
            state["feedback"] = self.judge.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        if "feedback" in state and hasattr(self.judge, "load_state_dict"):
            self.judge.load_state_dict(state["feedback"])


def _rollout_metrics(r: ro.Rollout) -> dict[str, float]:
    m = {"reward": float(r.scores.mean()), "reward_std": float(r.scores.std()) if r.scores.numel() > 1 else 0.0,
         "response_length": float(r.response_lengths.float().mean()),
         "stopped_fraction": float(r.stopped.float().mean())}
    for name, v in r.signals.items():
        m[f"reward/{name}"] = float(v.mean())
        m[f"reward/{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return m
