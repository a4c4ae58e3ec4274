"""Pieces of ``fastrlhf loop`` checked on their own (the loop end to end is in test_cli.py)."""

from __future__ import annotations

import torch

from fastrlhf import ops
from fastrlhf.generation import GenerationConfig
from fastrlhf.loop import policy_kl
from fastrlhf.models import LoRALinear, apply_lora, lora_disabled
from fastrlhf.trainers import rollout as ro

from helpers.rl import toy_policy, toy_tokenizer


def test_policy_kl_from_sampling_logprobs_is_the_two_forward_kl():
    """The loop's KL reuses the log-probs recorded while sampling (with the adapters folded in) for
    the policy side: the same number as a training forward of the policy and one of the base."""
    policy = apply_lora(toy_policy(), r=4, alpha=8)
    with torch.no_grad():
        for mod in policy.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    r = ro.sample(policy, toy_tokenizer(), ["abc", "xyz ab"], GenerationConfig(max_new_tokens=8, seed=0),
                  group_size=2)
    lp = ro.response_logprobs(policy, r, temperature=1.0)
    with lora_disabled(policy):
        ref = ro.response_logprobs(policy, r, temperature=1.0)
    m = r.response_mask
    want = float((ops.kl_penalty(lp, ref) * m).sum() / m.sum())
    assert want > 1e-3
    assert abs(policy_kl(policy, r, 1.0) - want) < 1e-5
