"""Rows -> token ids and batches: the chat template for conversations, completion-only loss
masks, padding (left for generation, right for training) and packing with ``cu_seqlens``.

TRL's convention: a conversation (a list of messages) is rendered with the tokenizer's chat
template; a plain string is tokenized as it is (a completion string then ends with EOS). Use
:func:`as_conversation` to send plain instructions through an instruct model's template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastrlhf.data.formats import is_conversation


def as_conversation(prompt, *, system: str | None = None) -> list[dict]:
    """A plain prompt string -> a one-turn user conversation (optionally after a system turn);
    conversations pass through."""
    if is_conversation(prompt):
        return list(prompt)
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": str(prompt)}]


def _assistant_turn(completion) -> list[dict]:
    return list(completion) if is_conversation(completion) else [{"role": "assistant", "content": str(completion)}]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: a conversation through the chat template with the generation prompt
    (what an instruct model answers after), a string as it is."""
    if is_conversation(prompt):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return tokenizer.encode(prompt)


def encode_pair(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of a prompt and its answer.

    A conversation prompt renders ``prompt + the assistant turn`` with the chat template; the
    completion ids are what follows the prompt's ids (the template's end-of-turn token included).
    When the answer's first characters merge with the prompt's last token (an answer starting with
    spaces after the template's newline, say), the completion ids are the tokens of the rendered
    text after the prompt's text, as a model that generated the answer after the prompt's ids saw
    them. A string prompt and string completion are tokenized as they are, the completion followed
    by EOS.

    Raises:
        ValueError: the template renders the prompt's text differently when an answer follows.
    """
    if is_conversation(prompt) or is_conversation(completion):
        conv = as_conversation(prompt)
        prompt_ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv + _assistant_turn(completion))
        if full[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full[len(prompt_ids):]
        prompt_text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(conv + _assistant_turn(completion), tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("encode_pair: the chat template renders the prompt differently when an answer follows; "
                             "completion-only masks need the prompt's text to be a prefix")
        return prompt_ids, tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False)
    ids = tokenizer.encode(completion, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return tokenizer.encode(prompt), ids + ([eos] if eos is not None else [])


def encode_text(tokenizer, row: dict) -> list[int]:
    """A ``text`` row (a string, or ``messages``: a conversation) -> ids ending with EOS (strings)."""
    if "messages" in row and "text" not in row:
        return tokenizer.apply_chat_template(row["messages"])
    ids = tokenizer.encode(row["text"])
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])


def pad(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
        max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``(ids [B, T], mask [B, T])`` int64 (``side``: where the padding
    goes; ``max_length`` truncates, keeping the start for right padding and the end for left)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad: side must be 'left' or 'right', got {side!r}")
    if max_length is not None:
        seqs = [s[-max_length:] if side == "left" else s[:max_length] for s in seqs]
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
            mask[i, sl] = 1
    return ids, mask


@dataclass
class TokenBatch:
    """Right-padded training sequences: ``input_ids``, ``attention_mask`` and ``loss_mask``, all
    ``[B, T]``; ``loss_mask[b, t]`` = 1 where token t is a target (scored given tokens < t)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def target_mask(self) -> torch.Tensor:
        """``[B, T - 1]``: the loss mask of next-token targets (position t predicts token t + 1)."""
        return self.loss_mask[:, 1:]


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, *, completion_only: bool = True,
                  max_length: int | None = None) -> TokenBatch:
    """``(prompt_ids, completion_ids)`` pairs -> a right-padded :class:`TokenBatch` whose loss mask
    covers the completion tokens (or every token but the first with ``completion_only=False``)."""
    seqs, masks = [], []
    for p, c in pairs:
        seqs.append(list(p) + list(c))
        masks.append([0] * len(p) + [1] * len(c) if completion_only else [0] + [1] * (len(p) + len(c) - 1))
    ids, attn = pad(seqs, pad_id, side="right", max_length=max_length)
    loss, _ = pad(masks, 0, side="right", max_length=max_length)
    return TokenBatch(ids, attn, loss * attn)


@dataclass
class PackedBatch:
    """Sequences packed into one row: ``input_ids [N]``, ``cu_seqlens [S + 1]`` (int64) and
    ``loss_mask [N]``; attention never crosses a sequence boundary (``ops.attention`` varlen), and
    :meth:`target_mask` drops the targets that would cross one."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    loss_mask: torch.Tensor

    def target_mask(self) -> torch.Tensor:
        """``[N - 1]``: position i predicts token i + 1 only inside a sequence."""
        m = self.loss_mask[1:].clone()
        starts = self.cu_seqlens[1:-1]  # the first token of every sequence but the first
        m[starts - 1] = 0
        return m


def pack(seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], max_tokens: int) -> list[PackedBatch]:
    """Greedy packing in order: sequences are appended to a pack until the next one would pass
    ``max_tokens`` (a longer sequence is truncated to it and packed alone).

    Args:
        seqs: token ids per sequence.
        loss_masks: 1 where a token is a target, per sequence (same lengths as ``seqs``).
        max_tokens: tokens per pack at most.
    """
    if max_tokens < 2:
        raise ValueError(f"pack: max_tokens must be >= 2, got {max_tokens}")
    packs, cur, cur_mask, bounds = [], [], [], [0]

    def flush():
        if cur:
            packs.append(PackedBatch(torch.tensor(cur, dtype=torch.long), torch.tensor(bounds, dtype=torch.long),
                                     torch.tensor(cur_mask, dtype=torch.long)))

    for s, m in zip(seqs, loss_masks):
        if len(s) != len(m):
            raise ValueError(f"pack: a sequence has {len(s)} tokens but {len(m)} loss-mask entries")
        s, m = list(s)[:max_tokens], list(m)[:max_tokens]
        if not s:
            continue
        if len(cur) + len(s) > max_tokens:
            flush()
            cur, cur_mask, bounds = [], [], [0]
        cur += s
        cur_mask += m
        bounds.append(len(cur))
    flush()
    return packs
