"""Supervised fine-tuning (and pretraining): next-token cross-entropy on ``text``,
``prompt``/``completion`` or conversational rows.

Per step: a batch of ``batch_size`` rows; the loss is the mean over the batch's target tokens
(the normalizer counted over the whole batch, so micro-batches add up to the full-batch
gradient), computed through ``CausalLM.token_loss`` (no ``[B, T, V]`` logits). With
``packing`` the batch's rows are packed into rows of ``pack_tokens`` tokens with ``cu_seqlens``:
no padding, and no attention or target crosses a sequence boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.config import ConfigError, option
from fastrlhf.data import Rows, encode_pair, encode_text, load_rows, pack, pad
from fastrlhf.trainers.base import BatchSampler, TrainConfig, Trainer, micro_batches, prepare_model


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning."""

    learning_rate: float = option(2e-5, "peak learning rate (AdamW)", min=0.0, min_exclusive=True)
    batch_size: int = option(16, "rows per optimizer step", min=1)
    max_length: int = option(512, "tokens per row at most (longer rows are truncated)", min=2)
    completion_only: bool = option(True, "loss on completion tokens only (prompt_completion / conversations)")
    packing: bool = option(False, "pack rows into pack_tokens-token rows with cu_seqlens (no padding)")
    pack_tokens: int = option(2048, "tokens per packed row", min=2)


def nll_sum(target_mask: torch.Tensor, normalizer: float):
    """The ``loss_fn`` of ``token_loss`` for SFT: the masked negative log-likelihood of a chunk of
    rows divided by the whole batch's target count (so chunks and micro-batches add up)."""
    def loss_fn(logprobs, entropy, rows):
        return -(logprobs * target_mask[rows]).sum() / normalizer
    return loss_fn


class SFTTrainer(Trainer):
    """Supervised fine-tuning of a :class:`~fastrlhf.models.CausalLM`.

    Args:
        model: the model (LoRA is applied when ``config.lora_r > 0``).
        tokenizer: a :class:`~fastrlhf.models.Tokenizer` (its chat template renders conversations).
        data: rows of the ``text`` or ``prompt_completion`` format, or a path :func:`load_rows` reads.
        config: an :class:`SFTConfig`.
    """

    name = "sft"

    def __init__(self, model, tokenizer, data, config: SFTConfig):
        self.model = prepare_model(model, config)
        self.tokenizer = tokenizer
        rows = data if isinstance(data, Rows) else load_rows(data)
        if rows.format not in ("text", "prompt_completion"):
            raise ConfigError(f"SFTTrainer: data must be text or prompt_completion rows, got {rows.format!r} "
                              f"({rows.source})")
        self.examples = [self._encode(r, rows.format) for r in rows]
        super().__init__(config, {"policy": self.model})
        self.sampler = BatchSampler(len(self.examples), config.batch_size, seed=config.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _encode(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        """-> (prompt ids, completion ids); a text row is all completion."""
        if fmt == "text":
            return [], encode_text(self.tokenizer, row)
        return encode_pair(self.tokenizer, row["prompt"], row["completion"])

    def _batch_targets(self, idx: list[int]):
        """The step's sequences and loss masks (truncated), and the global target count."""
        cfg = self.config
        seqs, masks = [], []
        for i in idx:
            p, c = self.examples[i]
            seq = (list(p) + list(c))[: cfg.max_length]
            m = ([0] * len(p) + [1] * len(c) if cfg.completion_only and p else [0] + [1] * (len(seq) - 1))
            seqs.append(seq)
            masks.append(m[: len(seq)])
        n_targets = self.reducer.count(torch.tensor([sum(m[1:]) for m in masks], dtype=torch.float64))
        return seqs, masks, n_targets

    def train_step(self) -> dict[str, float]:
        cfg, dev = self.config, self.device
        seqs, masks, n_targets = self._batch_targets(self.sampler.next())
        n_targets = max(n_targets, 1.0)
        total, tokens = 0.0, 0
        with self.timed("train"):
            if cfg.packing:
                for p in pack(seqs, masks, cfg.pack_tokens):
                    ids, cu = p.input_ids.to(dev), p.cu_seqlens.to(dev)
                    tm = p.target_mask().to(dev).float()  # [N - 1]
                    with self.autocast():
                        out = self.model.token_loss(ids, nll_sum(tm, n_targets), cu_seqlens=cu)
                    out.loss.backward()
                    total += out.loss.item()
                    tokens += ids.numel()
            else:
                all_ids, all_attn = pad(seqs, self.pad_id, side="right")  # (B, T)
                loss_mask, _ = pad(masks, 0, side="right")
                for sl in micro_batches(len(seqs), cfg.micro_batch_size):
                    ids, attn = all_ids[sl].to(dev), all_attn[sl].to(dev)
                    tm = loss_mask[sl, 1:].to(dev).float()  # (b, T - 1): targets t + 1
                    with self.autocast():
                        out = self.model.token_loss(ids, nll_sum(tm, n_targets), attn)
                    out.loss.backward()
                    total += out.loss.item()
                    tokens += int(attn.sum())
        stats = self.optimizer_step()
        return {"loss": total, "tokens": tokens, "target_tokens": n_targets, **stats}

    def final_model(self):
        return self.model, self.tokenizer

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
