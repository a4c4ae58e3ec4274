"""Generation for any Hugging Face causal LM (the adapter path of ``generate``): the model's own
forward and cache (``past_key_values``), fastrlhf's sampling and bookkeeping. Slower than the
native path (transformers' per-step overhead), same outputs contract.

Requirements on ``model``: ``model(input_ids=, attention_mask=, position_ids=, cache=,
use_cache=True)`` returning ``.logits [B, T, V]`` and ``.cache`` (transformers >= 5.2x), or the
older spelling ``past_key_values`` in and out - every ``transformers`` ``*ForCausalLM``. Finished rows are
dropped when the cache has
``batch_select_indices`` (transformers' ``DynamicCache``), else kept (fed padding).
"""

from __future__ import annotations

import inspect

import torch

from fastrlhf.generation.config import GenerationConfig, GenerationOutput
from fastrlhf.generation.decoding import Decoder, SamplingPlan


@torch.no_grad()  # not inference_mode: the outputs feed training forwards (autograd)
def generate_hf(model, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
    if not callable(model) or not hasattr(model, "config"):
        raise TypeError(f"generate: expected a fastrlhf CausalLM or a transformers causal LM, "
                        f"got {type(model).__name__}")
    dev = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no [B, P, V] prefill logits
    input_ids = input_ids.to(dev)
    plan = SamplingPlan(input_ids, attention_mask, config, model)
    B, L = plan.B, plan.L
    mask = plan.mask.to(dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: prompts start at position 0

    dec = Decoder(plan, input_ids)
    with plan.timed("prefill"):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
        past, logits = getattr(out, cache_kw), out.logits[:, -1].float()  # (B, V)
    rows = torch.arange(B, device=dev)
    next_pos = positions[:, -1] + 1  # (B,)
    can_drop = config.drop_finished and hasattr(past, "batch_select_indices")

    for t in range(L):
        tok, keep = dec.step(t, logits, rows)
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
    return dec.output(input_ids)
