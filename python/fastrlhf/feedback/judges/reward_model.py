"""A trained :class:`~fastrlhf.models.RewardModel` as a judge: :class:`RewardModelJudge`."""

from __future__ import annotations

from typing import Literal

import torch

from fastrlhf.data import as_conversation, encode_pair
from fastrlhf.feedback.base import Judge
from fastrlhf.feedback.judges._common import check_lengths


def score_normalization(model) -> tuple[float, float]:
    """``(mean, std)`` of the score normalization stored with a reward model: the attributes
    ``score_mean`` / ``score_std`` when the model has them, else the ``config.extra`` keys of the
    same names (saved in ``config.json``), else ``(0.0, 1.0)``.

    Raises:
        ValueError: a stored ``score_std`` that is not > 0.
    """
    extra = getattr(getattr(model, "config", None), "extra", None) or {}
    mean = getattr(model, "score_mean", None)
    std = getattr(model, "score_std", None)
    mean = float(extra.get("score_mean", 0.0) if mean is None else mean)
    std = float(extra.get("score_std", 1.0) if std is None else std)
    if not std > 0:
        raise ValueError(f"RewardModelJudge: the model's score_std must be > 0, got {std}")
    return mean, std


class RewardModelJudge(Judge):
    """Scores ``prompt + completion`` with a reward model: the score head read at the last token.

    Pairs are tokenized as :func:`fastrlhf.data.encode_pair` does (conversations through the chat
    template, up to the end-of-turn token; string pairs as they are, the completion followed by
    EOS), which is how the reward trainer tokenizes its data.

    Args:
        model: a :class:`~fastrlhf.models.RewardModel` (put in eval mode).
        tokenizer: its :class:`~fastrlhf.models.Tokenizer`.
        batch_size: sequences per forward (>= 1).
        max_length: tokens per sequence at most; longer ones keep their last ``max_length`` tokens
            (the score is read at the end).
        normalize: return ``(raw - score_mean) / score_std`` with the normalization stored with the
            model (:func:`score_normalization`; identity when none is stored).
        padding_side: how batches are padded (the score is read at each row's last valid token
            either way).
        chat: send string prompts through the chat template too (as one-turn conversations).
        name: the judge's name in metrics.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 1024, normalize: bool = True,
                 padding_side: Literal["left", "right"] = "right", chat: bool = False, name: str = "reward_model"):
        if batch_size < 1:
            raise ValueError(f"RewardModelJudge: batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"RewardModelJudge: max_length must be >= 1, got {max_length}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"RewardModelJudge: padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self.padding_side, self.chat, self.name = padding_side, chat, name
        score_normalization(model)  # fail early on a bad stored std

    def encode(self, prompt, completion: str) -> list[int]:
        """The token ids the model scores for one pair (truncated to ``max_length``)."""
        p, c = encode_pair(self.tokenizer, as_conversation(prompt) if self.chat else prompt, completion)
        return (list(p) + list(c))[-self.max_length:]

    @torch.no_grad()
    def raw_scores(self, prompts, completions) -> torch.Tensor:
        """``[N]`` fp32 (CPU) scores of the reward model before normalization."""
        check_lengths(self.name, prompts, completions)
        rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
        out, dev = [], self.model.device
        for i in range(0, len(rows), self.batch_size):
            enc = self.tokenizer.pad(rows[i:i + self.batch_size], padding_side=self.padding_side)
            out.append(self.model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).float().cpu())  # (b,)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts, completions) -> torch.Tensor:
        """``[N]`` fp32 rewards (normalized when ``normalize``).

        Args:
            prompts: N prompts (strings or conversations).
            completions: N answers.
        """
        s = self.raw_scores(prompts, completions)
        if self.normalize:
            mean, std = score_normalization(self.model)
            s = (s - mean) / std
        return s
