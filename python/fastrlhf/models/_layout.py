"""How one forward call of the Llama trunk runs attention (private): padded batch, packed
sequences, prefill into an empty cache, or decode against it. Built once per call from the
inputs and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastrlhf.models.cache import KVCache


@dataclass
class AttnLayout:
    """What every layer of one forward call needs to run attention."""

    mode: Literal["padded", "varlen", "prefill", "decode"]
    key_start: torch.Tensor | None = None  # [B] padded: first valid key (left padding)
    key_lengths: torch.Tensor | None = None  # [B] padded / prefill: end of valid keys
    cu_seqlens: torch.Tensor | None = None  # [S + 1] varlen
    max_seqlen: int | None = None
    cache: KVCache | None = None
    write_pos: torch.Tensor | None = None  # [B, Tn] decode: cache positions of the new tokens
    new_lengths: torch.Tensor | None = None  # [B] cache lengths after this call
    validate: bool = True  # check cu_seqlens in the first layer only


def mask_bounds(attention_mask: torch.Tensor, check: bool):
    """attention_mask ``[B, T]`` (one contiguous block of ones per row) -> (key_start, key_end) ``[B]``."""
    m = attention_mask.to(torch.bool)
    T = m.shape[1]
    start = m.to(torch.int8).argmax(1)  # first one (0 for an all-zero row)
    end = T - m.flip(1).to(torch.int8).argmax(1)  # one past the last one
    if check and not torch.compiler.is_compiling():
        count = m.sum(1)
        if bool(((end - start != count) & (count > 0)).any()):
            raise ValueError("CausalLM: attention_mask must hold one contiguous block of ones per row (left and/or "
                             "right padding); pack sequences with cu_seqlens instead")
    return start, end


def _check_length(T: int | None, max_positions: int, what: str) -> None:
    if T is not None and T > max_positions:
        raise ValueError(f"CausalLM: {what} of {T} positions exceeds max_position_embeddings {max_positions} "
                         "(RoPE positions past it were never trained; truncate the input)")


def attention_layout(input_ids, attention_mask, position_ids, cu_seqlens, cache, *, max_positions: int):
    """The inputs of :meth:`LlamaTrunk.forward` -> ``(AttnLayout, positions)`` (positions ``[B, T]``,
    or ``[N]`` packed)."""
    dev = input_ids.device
    if cu_seqlens is not None:
        if input_ids.dim() != 1 or attention_mask is not None or cache is not None:
            raise ValueError("LlamaTrunk: packed input takes input_ids [N] with cu_seqlens and no "
                             "attention_mask / cache")
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        if position_ids is None:  # restart at 0 in every sequence
            seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths,
                                                   output_size=input_ids.shape[0])
            position_ids = torch.arange(input_ids.shape[0], device=dev) - cu[seq_of_token]
        max_len = int(lengths.max()) if lengths.numel() and not torch.compiler.is_compiling() else None
        _check_length(max_len, max_positions, "a packed sequence")
        return AttnLayout("varlen", cu_seqlens=cu, max_seqlen=max_len), position_ids
    if input_ids.dim() != 2:
        raise ValueError(f"LlamaTrunk: input_ids must be [B, T] (or [N] with cu_seqlens), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"LlamaTrunk: attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
    if cache is None:
        _check_length(T, max_positions, "an input")
        if attention_mask is None:
            pos = torch.arange(T, device=dev).expand(B, T) if position_ids is None else position_ids
            return AttnLayout("padded"), pos
        start, end = mask_bounds(attention_mask, check=True)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return AttnLayout("padded", key_start=start, key_lengths=end), position_ids
    if cache.batch_size != B:
        raise ValueError(f"LlamaTrunk: cache holds {cache.batch_size} rows, input_ids {B}")
    if attention_mask is not None:  # prefill of right-padded prompts into an empty cache
        start, end = mask_bounds(attention_mask, check=True)
        if bool(((start != 0) & (end > 0)).any()) or bool((cache.lengths != 0).any()):
            raise ValueError("LlamaTrunk: with a cache, attention_mask is for prefilling right-padded prompts into "
                             "an empty cache (generation right-aligns left-padded prompts itself)")
        if T > cache.max_length:
            raise ValueError(f"LlamaTrunk: {T} prompt positions exceed the cache length {cache.max_length}")
        pos = torch.arange(T, device=dev).expand(B, T) if position_ids is None else position_ids
        lens = attention_mask.long().sum(1)
        return AttnLayout("prefill", key_lengths=lens, cache=cache, new_lengths=lens), pos
    write_pos = cache.lengths[:, None] + torch.arange(T, device=dev)  # (B, T)
    new_lengths = cache.lengths + T
    if not torch.compiler.is_compiling() and int(new_lengths.max()) > cache.max_length:
        raise ValueError(f"LlamaTrunk: the cache is full (max_length {cache.max_length})")
    pos = write_pos if position_ids is None else position_ids
    return AttnLayout("decode", cache=cache, write_pos=write_pos, new_lengths=new_lengths), pos
