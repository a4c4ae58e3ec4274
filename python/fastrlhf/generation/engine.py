"""Batched generation with a preallocated KV cache.

``generate(model, input_ids, attention_mask, config)`` for a :class:`~fastrlhf.models.CausalLM`:

1. prompts arrive left-padded (``[B, P]``, Hugging Face's convention); each row is moved to the
   start of its cache row, so the cache holds no padding and row b's keys are ``[0, len_b)``;
2. prefill: one forward over the prompts through ``ops.attention`` writes the cache;
3. decode: per step, ``ops.sample`` draws one token per row from the last logits (penalties,
   temperature, top-k/p, min-p, epsilon), the log-prob of the token under ``softmax(logits / T)``
   is kept (what a training forward recomputes), and one forward of the new tokens runs through
   ``ops.decode_attention``. Rows that hit a stop token or their ``max_new_tokens`` leave the batch
   together with their cache rows (``drop_finished``), so they cost nothing more.

A LoRA policy generates with its adapters folded into plain weights for the call
(:func:`~fastrlhf.models.lora_merged`): the base model's cost and fast paths, not one extra pair of
matmuls per projection and token.

Randomness: Philox keyed by ``config.seed``; step t of row b uses counter (t, id_b), where id_b is
``config.request_ids[b]`` when given, else b, the row's index in the call's input. A row's tokens
therefore depend on the seed, its prompt, its own settings and its id - not on which other rows
are in the batch or have finished. Without ``request_ids`` the same prompt drawn at another
index of a batch gets other tokens; pass ``request_ids`` (as vLLM's per-request seeds) to make a
request reproducible wherever it sits.

Any Hugging Face causal LM works through :func:`fastrlhf.generation.hf.generate_hf` (dispatched
automatically): its own forward and cache, the same sampling and bookkeeping (finished rows are
dropped where its cache supports ``batch_select_indices``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastrlhf.generation.config import GenerationConfig, GenerationOutput
from fastrlhf.generation.decoding import Decoder, SamplingPlan
from fastrlhf.generation.hf import generate_hf
from fastrlhf.models import CausalLM, lora_merged


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig | None = None, **overrides) -> GenerationOutput:
    """Sample continuations of left-padded prompts (see the module docstring).

    Args:
        model: a fastrlhf :class:`~fastrlhf.models.CausalLM` (native path) or any ``transformers``
            causal LM (adapter path, slower).
        input_ids: ``[B, P]`` int, left-padded prompts.
        attention_mask: ``[B, P]``, 1 on prompt tokens (None: no padding).
        config: sampling settings (default ``GenerationConfig()``).
        **overrides: fields of ``config`` to replace for this call (``max_new_tokens=32``, ...).

    Returns:
        A :class:`GenerationOutput` (sequences, masks, log-probs, lengths, timings).
    """
    config = replace(config or GenerationConfig(), **overrides)
    if isinstance(model, CausalLM):
        return _generate_native(model, input_ids, attention_mask, config)
    return generate_hf(model, input_ids, attention_mask, config)


# ---------------------------------------------------------------------------------------------
# native path


def _generate_native(model, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
    with lora_merged(model):  # LoRA adapters folded into plain weights: decode at the base model's cost
        return _generate_plain(model, input_ids, attention_mask, config)


@torch.no_grad()  # not inference_mode: the outputs feed training forwards (autograd)
def _generate_plain(model, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
    input_ids = input_ids.to(model.device)
    plan = SamplingPlan(input_ids, attention_mask, config, model)
    B, P, L, dev = plan.B, plan.P, plan.L, input_ids.device
    lengths = plan.lengths.to(dev)
    need = int((lengths + plan.max_new.to(dev)).max())  # the longest row: prompt + new tokens
    if need > model.config.max_position_embeddings:
        raise ValueError(f"generate: a prompt plus its max_new_tokens ({need}) exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    # right-padded copy of the prompts: row b's tokens at [0, len_b)
    src = (P - lengths)[:, None] + torch.arange(P, device=dev)  # (B, P)
    prompt = input_ids.gather(1, src.clamp(max=P - 1))
    prompt_mask = (torch.arange(P, device=dev) < lengths[:, None]).long()
    cache = model.new_cache(B, max(need, P))  # prefill writes P (padded) positions
    dec = Decoder(plan, input_ids)

    with plan.timed("prefill"):
        hidden = model.model(prompt, prompt_mask, cache=cache)  # (B, P, C)
        logits = model.logits(hidden[torch.arange(B, device=dev), lengths - 1])  # (B, V)
    rows = torch.arange(B, device=dev)  # original id of each batch row
    with model.decode_weights():
        for t in range(L):
            tok, keep = dec.step(t, logits, rows)
            n_keep = int(keep.sum())
            if n_keep == 0:
                break
            if config.drop_finished and n_keep < rows.numel():
                idx = keep.nonzero().squeeze(1)
                cache.select(idx)
                rows, tok = rows[idx], tok[idx]
            with plan.timed("decode"):
                logits = model(tok[:, None], cache=cache)[:, 0]  # (b, V)
    return dec.output(input_ids)
