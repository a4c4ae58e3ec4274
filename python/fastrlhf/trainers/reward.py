"""Reward-model training: a :class:`~fastrlhf.models.RewardModel` (a CausalLM trunk with a scalar
head) learns from preferences (Bradley-Terry, with optional margins), ratings (MSE) or binary
labels (BCE), with accuracy / MSE on a held-out split.

After training, the mean and std of its scores over the training completions are stored in the
model's config (``score_mean`` / ``score_std``, saved in ``config.json``), so downstream rewards
(:class:`~fastrlhf.feedback.judges.RewardModelJudge`) are centred and scaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fastrlhf import ops
from fastrlhf.config import ConfigError, option
from fastrlhf.data import Rows, encode_pair, load_rows, pad
from fastrlhf.models import RewardModel
from fastrlhf.trainers.base import BatchSampler, TrainConfig, Trainer, micro_batches, prepare_model


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model training."""

    learning_rate: float = option(1e-5, "peak learning rate (AdamW)", min=0.0, min_exclusive=True)
    loss: Literal["auto", "bradley_terry", "mse", "bce"] = option(
        "auto", "auto: Bradley-Terry for preference rows, MSE for ratings, BCE for binary labels")
    batch_size: int = option(16, "pairs (or rows) per optimizer step", min=1)
    max_length: int = option(512, "tokens of prompt + completion at most (the prompt's start is cut first)", min=2)
    eval_fraction: float = option(0.1, "share of rows held out for evaluation (preference rows: whole prompts, so "
                                  "pairs sharing an answer stay on one side)", min=0.0, max=0.9)
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)", min=0)
    center_rewards: bool = option(True, "store the mean / std of the scores with the model to centre rewards")


def heldout_split(keys: list, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out row indices, training row indices): whole groups of rows with the same key (a
    prompt) held out, in a seeded random order, until ``round(len(keys) * fraction)`` rows are.
    Rows of one prompt (its answers compared pairwise, InstructGPT-style) never straddle the split,
    so the held-out accuracy is not inflated by answers seen in training.

    Args:
        keys: one group key per row.
        fraction: share of rows to hold out, in [0, 1).
        seed: the order's seed.
    """
    n_eval = int(round(len(keys) * fraction))
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    held, train = [], []
    for g in order:
        (held if len(held) < n_eval else train).extend(members[g])
    return held, train


class RewardTrainer(Trainer):
    """Trains a reward model.

    Args:
        model: a :class:`~fastrlhf.models.RewardModel` (e.g. ``RewardModel.from_causal_lm(lm)``); LoRA is
            applied to its trunk when ``config.lora_r > 0`` (the score head always trains).
        tokenizer: the trunk's tokenizer.
        data: preference (``prompt``/``chosen``/``rejected``, optional ``margin``), rating or binary rows,
            or a path.
        config: a :class:`RewardConfig`.
    """

    name = "reward"

    def __init__(self, model: RewardModel, tokenizer, data, config: RewardConfig):
        rows = data if isinstance(data, Rows) else load_rows(data)
        kind = {"preference": "bradley_terry", "rating": "mse", "binary": "bce"}.get(rows.format)
        if kind is None:
            raise ConfigError(f"RewardTrainer: data must be preference, rating or binary rows, got {rows.format!r}")
        if config.loss not in ("auto", kind):
            raise ConfigError(f"RewardConfig.loss={config.loss!r} does not fit {rows.format} rows (use {kind!r})")
        self.kind, self.config = kind, config
        self.model = prepare_model(model, config)
        self.model.score.requires_grad_(True)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.examples = [self._encode(r) for r in rows]
        # a preference row's answers may recur in other pairs of its prompt: hold out whole prompts
        keys = [repr(r["prompt"]) if kind == "bradley_terry" else i for i, r in enumerate(rows)]
        self.eval_idx, self.train_idx = heldout_split(keys, config.eval_fraction, config.seed)
        if not self.train_idx:
            raise ConfigError(f"RewardTrainer: no training rows left after the held-out split ({len(keys)} rows "
                              f"over {len(set(keys))} prompts, eval_fraction={config.eval_fraction})")
        super().__init__(config, {"reward_model": self.model})
        self.sampler = BatchSampler(len(self.train_idx), config.batch_size, seed=config.seed)
        self.last_eval: dict[str, float] = {}

    # ---- data
    def _ids(self, prompt, completion) -> list[int]:
        p, c = encode_pair(self.tokenizer, prompt, completion)
        keep = self.config.max_length - len(c)
        return (p[-keep:] if keep > 0 else []) + c[: self.config.max_length]

    def _encode(self, row: dict):
        if self.kind == "bradley_terry":
            margin = float(row.get("margin") or 0.0)
            return self._ids(row["prompt"], row["chosen"]), self._ids(row["prompt"], row["rejected"]), margin
        target = float(row["rating"]) if self.kind == "mse" else float(bool(row["label"]))
        return self._ids(row["prompt"], row["completion"]), target

    def _scores(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = pad(seqs, self.pad_id, side="right")
        with self.autocast():
            return self.model(ids.to(self.device), mask.to(self.device))  # (n,) fp32

    # ---- training
    def _loss(self, items: list, normalizer: float):
        """-> (summed loss / normalizer, stats) of a micro-batch of examples."""
        if self.kind == "bradley_terry":
            seqs = [s for c, r, _ in items for s in (c, r)]  # chosen, rejected interleaved
            s = self._scores(seqs).view(-1, 2)
            margin = torch.tensor([m for _, _, m in items], device=s.device)
            loss, stats = ops.preference_loss(s[:, 0], s[:, 1], beta=1.0, margin=margin if margin.any() else None,
                                              normalizer=normalizer)
            return loss, {"accuracy": stats["accuracy"], "reward_margin": stats["reward_margin"]}
        s = self._scores([ids for ids, _ in items])
        target = torch.tensor([t for _, t in items], device=s.device)
        if self.kind == "mse":
            loss = F.mse_loss(s, target, reduction="sum") / normalizer
            return loss, {"mse": ((s - target) ** 2).mean().detach()}
        loss = F.binary_cross_entropy_with_logits(s, target, reduction="sum") / normalizer
        return loss, {"accuracy": ((s > 0).float() == target).float().mean()}

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        batch = [self.examples[self.train_idx[i]] for i in self.sampler.next()]
        normalizer = max(self.reducer.count(torch.ones(len(batch))), 1.0)
        total, stats = 0.0, {}
        with self.timed("train"):
            for sl in micro_batches(len(batch), cfg.micro_batch_size):
                loss, st = self._loss(batch[sl], normalizer)
                loss.backward()
                total += loss.item()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + float(v) * (sl.stop - sl.start) / len(batch)
        out = {"loss": total, **stats, **self.optimizer_step()}
        if cfg.eval_every and self.step + 1 < cfg.max_steps and (self.step + 1) % cfg.eval_every == 0:
            out.update(self.evaluate())
        return out

    @torch.no_grad()
    def evaluate(self, idx: list[int] | None = None) -> dict[str, float]:
        """Held-out metrics: ``eval/accuracy`` (preferences, binary) or ``eval/mse`` (ratings), and
        ``eval/loss`` (preferences)."""
        idx = self.eval_idx if idx is None else idx
        if not idx:
            return {}
        was = self.model.training
        self.model.eval()
        hits, n, sq, nll = 0.0, 0, 0.0, 0.0
        for sl in micro_batches(len(idx), self.config.micro_batch_size):
            items = [self.examples[i] for i in idx[sl]]
            if self.kind == "bradley_terry":
                s = self._scores([x for c, r, _ in items for x in (c, r)]).view(-1, 2)
                hits += float((s[:, 0] > s[:, 1]).sum())
                nll += float(ops.preference_loss(s[:, 0], s[:, 1], beta=1.0, normalizer=1.0)[0])
            else:
                s = self._scores([ids for ids, _ in items])
                t = torch.tensor([t for _, t in items], device=s.device)
                hits += float(((s > 0).float() == t).sum())
                sq += float(((s - t) ** 2).sum())
            n += len(items)
        self.model.train(was)
        out = {"eval/mse": sq / n} if self.kind == "mse" else {"eval/accuracy": hits / n}
        if self.kind == "bradley_terry":
            out["eval/loss"] = nll / n  # the Bradley-Terry loss on held-out pairs (without margins)
        self.last_eval = out
        return out

    @torch.no_grad()
    def score_statistics(self) -> tuple[float, float]:
        """Mean and std of the model's scores over the training completions."""
        seqs = []
        for i in self.train_idx:
            ex = self.examples[i]
            seqs += [ex[0], ex[1]] if self.kind == "bradley_terry" else [ex[0]]
        was = self.model.training
        self.model.eval()
        scores = torch.cat([self._scores(seqs[sl]) for sl in micro_batches(len(seqs), self.config.micro_batch_size)])
        self.model.train(was)
        return float(scores.mean()), float(scores.std()) if scores.numel() > 1 else 1.0

    def on_train_end(self) -> dict[str, float]:
        """Evaluate on the held-out split and store the score statistics in the model's config
        (``save_model`` writes it afterwards)."""
        out = self.evaluate()
        if self.config.center_rewards:
            mean, std = self.score_statistics()
            self.model.config.extra.update(score_mean=mean, score_std=max(std, 1e-6))
            out.update(score_mean=mean, score_std=std)
        return out

    def final_model(self):
        return self.model, self.tokenizer

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
