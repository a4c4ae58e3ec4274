"""Direct preference optimization: DPO (sigmoid), IPO and hinge losses on offline preference
pairs, and online DPO, whose pairs are sampled from the current policy every step and labeled by
a judge (the simplest form of the iterative feedback loop).

A pair's score is the summed log-prob of its completion tokens. Chosen and rejected sequences are
interleaved (``[c0, r0, c1, r1, ...]``) and go through ``CausalLM.token_loss`` in chunks of whole
pairs, so ``ops.preference_loss`` is the loss function of each chunk and the LM head's gradients
are made in the forward (three matmuls, one chunk of logits). Reference log-probs of offline data
are computed once, before the first step, and cached.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from fastrlhf import ops
from fastrlhf.config import ConfigError, option
from fastrlhf.data import Rows, encode_pair, load_rows, pad
from fastrlhf.generation import GenerationConfig
from fastrlhf.models import lora_disabled
from fastrlhf.ops.preference_loss import PreferenceLossType
from fastrlhf.trainers import rollout as ro
from fastrlhf.trainers.base import BatchSampler, TrainConfig, Trainer, micro_batches, prepare_model


@dataclass
class DPOConfig(TrainConfig):
    """DPO / IPO / hinge on preference pairs."""

    learning_rate: float = option(5e-6, "peak learning rate (AdamW)", min=0.0, min_exclusive=True)
    beta: float = option(0.1, "DPO's beta: the KL strength of the implicit reward", min=0.0, min_exclusive=True)
    loss_type: PreferenceLossType = option("sigmoid", "sigmoid (DPO), ipo, hinge")
    label_smoothing: float = option(0.0, "cDPO: the assumed probability that a label is flipped", min=0.0, max=0.5)
    batch_size: int = option(8, "pairs per optimizer step", min=1)
    max_length: int = option(512, "tokens of prompt + completion at most (the prompt's start is cut first)", min=2)
    reference: Literal["auto", "copy", "lora_base"] = option(
        "auto", "the reference policy: the LoRA-disabled base (no weight copy) or a frozen copy; auto picks by LoRA")


@dataclass
class OnlineDPOConfig(DPOConfig):
    """Online DPO: two completions per prompt sampled each step, labeled by a judge."""

    prompts_per_step: int = option(8, "prompts sampled per step (each gives one pair)", min=1)
    max_new_tokens: int = option(64, "tokens generated per completion at most", min=1)
    temperature: float = option(1.0, "sampling temperature", min=0.0, min_exclusive=True)
    top_p: float = option(1.0, "nucleus sampling", min=0.0, max=1.0, min_exclusive=True)
    max_prompt_length: int | None = option(None, "keep the last N prompt tokens", min=1)
    min_preference: float = option(0.0, "skip pairs whose judged probability is within this of 0.5 (ties)",
                                   min=0.0, max=0.5)


class DPOTrainer(Trainer):
    """DPO-family training on preference pairs.

    Args:
        policy: the model to train (LoRA applied when ``config.lora_r > 0``).
        tokenizer: its tokenizer.
        data: preference rows (``prompt``/``chosen``/``rejected``; string or conversational), or a path.
        config: a :class:`DPOConfig`.
        reference: an explicit frozen reference model (default: per ``config.reference``).
    """

    name = "dpo"

    def __init__(self, policy, tokenizer, data, config: DPOConfig, *, reference=None):
        self.policy = prepare_model(policy, config)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reference = self._reference(reference, config)
        super().__init__(config, {"policy": self.policy})
        self.pairs: list[tuple[list[int], list[int], int, int]] = []  # chosen ids, rejected ids, prompt lengths
        if data is not None:
            rows = data if isinstance(data, Rows) else load_rows(data)
            if rows.format != "preference":
                raise ConfigError(f"DPOTrainer: data must be preference rows, got {rows.format!r} ({rows.source})")
            self.pairs = [self._encode(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
            self.sampler = BatchSampler(len(self.pairs), config.batch_size, seed=config.seed)
            self.ref_cache = self._reference_logprobs(self.pairs)  # [n, 2], once

    def _reference(self, reference, config):
        kind = config.reference
        if kind == "auto":
            kind = "lora_base" if config.lora_r > 0 else "copy"
        if reference is not None:
            return reference
        if kind == "lora_base":
            if config.lora_r == 0:
                raise ConfigError("DPOConfig.reference='lora_base' needs LoRA (lora_r > 0)")
            return None
        ref = copy.deepcopy(self.policy).eval()
        ref.requires_grad_(False)
        return ref

    # ---- data
    def _encode(self, prompt, chosen, rejected):
        L = self.config.max_length

        def ids(completion):
            p, c = encode_pair(self.tokenizer, prompt, completion)
            keep = max(L - len(c), 1)
            p = p[-keep:]
            return (p + c)[:L], len(p)

        (c, pc), (r, pr) = ids(chosen), ids(rejected)
        return c, r, pc, pr

    def _batch(self, pairs):
        """Interleaved ``[2b, T]`` ids / mask and the completion-token mask of the targets ``[2b, T - 1]``."""
        seqs, starts = [], []
        for c, r, pc, pr in pairs:
            seqs += [c, r]
            starts += [pc, pr]
        ids, mask = pad(seqs, self.pad_id, side="right")
        pos = torch.arange(ids.shape[1] - 1)
        targets = (pos[None, :] >= torch.tensor(starts)[:, None] - 1) & mask[:, 1:].bool()  # (2b, T - 1)
        return ids, mask, targets.float()

    @torch.no_grad()
    def _sequence_logprobs(self, model, pairs) -> torch.Tensor:
        """``[n, 2]`` summed completion log-probs of (chosen, rejected) under ``model``."""
        out = []
        was = model.training
        model.eval()
        for sl in micro_batches(len(pairs), self.config.micro_batch_size):
            ids, mask, tm = self._batch(pairs[sl])
            lp = model.token_logprobs(ids.to(self.device), mask.to(self.device))  # (2b, T - 1)
            out.append((lp * tm.to(lp.device)).sum(1).view(-1, 2))
        model.train(was)
        return torch.cat(out) if out else torch.zeros(0, 2)

    def _reference_logprobs(self, pairs) -> torch.Tensor:
        if self.reference is not None:
            return self._sequence_logprobs(self.reference, pairs)
        with lora_disabled(self.policy):
            return self._sequence_logprobs(self.policy, pairs)

    # ---- the update
    def update(self, pairs, ref: torch.Tensor) -> dict[str, float]:
        """One optimizer step of the preference loss on ``pairs`` (reference log-probs ``ref [n, 2]``)."""
        cfg, dev = self.config, self.device
        normalizer = max(self.reducer.count(torch.ones(len(pairs))), 1.0)
        total, stats = 0.0, {}
        for sl in micro_batches(len(pairs), cfg.micro_batch_size):
            ids, mask, tm = self._batch(pairs[sl])
            ids, mask, tm, rf = ids.to(dev), mask.to(dev), tm.to(dev), ref[sl].to(dev)
            chunk_stats: list = []
            loss_fn = pair_loss_fn(tm, rf, normalizer, cfg, chunk_stats)
            with self.autocast():
                out = self.policy.token_loss(ids, loss_fn, mask, chunk_rows=2 * max(1, _pairs_per_chunk(ids, self)))
            out.loss.backward()
            total += out.loss.item()
            for n, st in chunk_stats:
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + float(v) * n / (2 * len(pairs))
        return {"loss": total, **stats, **self.optimizer_step()}

    def train_step(self) -> dict[str, float]:
        idx = self.sampler.next()
        with self.timed("train"):
            return self.update([self.pairs[i] for i in idx], self.ref_cache[idx])

    def final_model(self):
        return self.policy, self.tokenizer

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if hasattr(self, "sampler") else {}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])


def pair_loss_fn(target_mask: torch.Tensor, ref: torch.Tensor, normalizer: float, cfg: DPOConfig, sink: list):
    """The ``loss_fn`` of ``token_loss`` for interleaved pairs: a chunk's summed completion
    log-probs -> ``ops.preference_loss`` against the cached reference; each chunk's stats are
    appended to ``sink`` as ``(rows, stats)``.

    Args:
        target_mask: ``[2b, T - 1]`` 1 on completion targets.
        ref: ``[b, 2]`` reference log-probs (chosen, rejected).
        normalizer: the step's global pair count.
        cfg: the DPO settings (beta, loss type, label smoothing).
        sink: a list collecting the chunks' stats.
    """
    def loss_fn(lp, ent, rows):  # rows: whole pairs (an even slice of the interleaved batch)
        s = (lp * target_mask[rows]).sum(1).view(-1, 2)  # (pairs, 2): chosen, rejected
        r = ref[rows.start // 2: rows.stop // 2]
        loss, st = ops.preference_loss(s[:, 0], s[:, 1], r[:, 0], r[:, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                                       label_smoothing=cfg.label_smoothing, normalizer=normalizer)
        sink.append((rows.stop - rows.start, st))
        return loss
    return loss_fn


def _pairs_per_chunk(ids: torch.Tensor, trainer) -> int:
    """Pairs per LM-head chunk: about 2^24 logits, at least one pair."""
    V = trainer.policy.config.vocab_size
    return max(1, (1 << 24) // max(1, 2 * ids.shape[1] * V))


class OnlineDPOTrainer(DPOTrainer):
    """Online DPO: each step samples two completions per prompt from the current policy, asks the
    judge which is better (``compare``), and takes a DPO step on the labeled pairs.

    Args:
        policy: the model to train.
        tokenizer: its tokenizer.
        prompts: rows with a ``prompt`` field, or a path.
        judge: a :class:`~fastrlhf.feedback.Judge` (a reward model, an AI judge, a simulated annotator,
            ``CompositeFeedback``).
        config: an :class:`OnlineDPOConfig`.
        reference: an explicit frozen reference model.
    """

    name = "online_dpo"

    def __init__(self, policy, tokenizer, prompts, judge, config: OnlineDPOConfig, *, reference=None):
        super().__init__(policy, tokenizer, None, config, reference=reference)
        rows = prompts if isinstance(prompts, Rows) else load_rows(prompts)
        self.prompts = [r["prompt"] for r in rows]
        self.judge = judge
        self.sampler = BatchSampler(len(self.prompts), config.prompts_per_step, seed=config.seed)
        self.gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                           top_p=config.top_p, stop_token_ids=ro.stop_token_ids(policy, tokenizer),
                                           pad_token_id=tokenizer.pad_token_id)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        prompts = [self.prompts[i] for i in self.sampler.next()]
        self.gen_config.seed = cfg.seed * 1_000_003 + self.step
        with self.timed("generate"):
            r = ro.sample(self.policy, self.tokenizer, prompts, self.gen_config, group_size=2,
                          max_prompt_length=cfg.max_prompt_length)
        with self.timed("score"):
            p = self.judge.compare(prompts, r.completions[0::2], r.completions[1::2]).float()
        keep = (p - 0.5).abs() > cfg.min_preference
        pairs = []
        for i in keep.nonzero().flatten().tolist():
            a, b = r.completions[2 * i], r.completions[2 * i + 1]
            chosen, rejected = (a, b) if p[i] > 0.5 else (b, a)
            pairs.append(self._encode(prompts[i], chosen, rejected))
        metrics = {"pairs": float(len(pairs)), "judge_prob_mean": float(p.mean()),
                   "response_length": float(r.response_lengths.float().mean())}
        if not pairs:
            return {**metrics, "skipped": 1.0}
        with self.timed("reference"):
            ref = self._reference_logprobs(pairs)
        with self.timed("train"):
            metrics.update(self.update(pairs, ref))
        return metrics
