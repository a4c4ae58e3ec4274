"""Generation for any Hugging Face causal LM (the adapter path of ``generate``): the model's own
forward and cache (``past_key_values``), fastrlhf's sampling and bookkeeping. Slower than the
native path (transformers' per-step overhead), same outputs contract.

Requirements on ``model``: ``model(input_ids=, attention_mask=, position_ids=, cache=,
use_cache=True)`` returning ``.logits [B, T, V]`` and ``.cache`` (transformers >= 5.2x), or the
older spelling ``past_key_values`` in and out - every ``transformers`` ``*ForCausalLM``. Finished rows are dropped when the cache has
``batch_select_indices`` (transformers' ``DynamicCache``), else kept (fed padding).
"""

from __future__ import annotations

import inspect

import torch

from fastrlhf.generation.config import GenerationConfig, GenerationOutput
from fastrlhf.generation.engine import _Plan, assemble, sample_step


@torch.inference_mode()
def generate_hf(model, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
    if not callable(model) or not hasattr(model, "config"):
        raise TypeError(f"generate: expected a fastrlhf CausalLM or a transformers causal LM, got {type(model).__name__}")
    dev = next(model.parameters()).device
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    input_ids = input_ids.to(dev)
    plan = _Plan(input_ids, attention_mask, config, model.config)
    B, P, L = plan.B, plan.P, plan.L
    mask = plan.mask.to(dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: prompts start at position 0

    history = None
    if plan.penalties:
        history = torch.full((B, P + L), -1, dtype=torch.long, device=dev)
        history[:, :P] = torch.where(mask.bool(), input_ids, -1)

    with plan.timed("prefill"):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, logits = getattr(out, cache_kw), out.logits[:, -1].float()  # (B, V)

    tokens = torch.full((B, L), plan.pad, dtype=torch.long, device=dev)
    logprobs = torch.zeros((B, L), dtype=torch.float32, device=dev)
    sampling_logprobs = torch.zeros((B, L), dtype=torch.float32, device=dev)
    response_lengths = plan.max_new.to(dev).clone()
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    max_new, stop = plan.max_new.to(dev), plan.stop.to(dev)
    next_pos = positions[:, -1] + 1  # (B,)
    can_drop = config.drop_finished and hasattr(past, "batch_select_indices")

    for t in range(L):
        with plan.timed("sample"):
            tok, lp, slp = sample_step(plan, logits, rows, t, None if history is None else history[rows])
            live = ~done[rows]  # rows kept in the batch after finishing must not be overwritten
            tokens[rows[live], t], logprobs[rows[live], t], sampling_logprobs[rows[live], t] = tok[live], lp[live], slp[live]
            if history is not None:
                history[rows[live], P + t] = tok[live]
            hit = ((tok[:, None] == stop[rows]).any(1) if stop.shape[1] else torch.zeros_like(live)) & live
            ends = (hit | (t + 1 >= max_new[rows])) & live
            stopped[rows] |= hit
            response_lengths[rows] = torch.where(ends, torch.full_like(tok, t + 1), response_lengths[rows])
            done[rows] |= ends
            keep = ~done[rows]
            n_keep = int(keep.sum())
        if n_keep == 0:
            break
        if can_drop and n_keep < rows.numel():
            idx = keep.nonzero().squeeze(1)
            past.batch_select_indices(idx)
            rows, tok, mask, next_pos = rows[idx], tok[idx], mask[idx], next_pos[idx]
        with plan.timed("decode"):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_kw: past})
            past, logits = getattr(out, cache_kw), out.logits[:, -1].float()
            next_pos = next_pos + 1
    return assemble(plan, input_ids, tokens, logprobs, sampling_logprobs, response_lengths, stopped)
