"""A toy RL problem for the trainer tests: a byte-level tokenizer trained on a tiny corpus, a
tiny CausalLM, prompt rows and a rule judge (the share of the letter 'a' in a completion)."""

from __future__ import annotations

import torch

from fastrlhf.feedback import CallableJudge
from fastrlhf.models import CausalLM, CausalLMConfig, Tokenizer

_TOK = None


def toy_tokenizer() -> Tokenizer:
    global _TOK
    if _TOK is None:
        _TOK = Tokenizer.train(["abc abd abe xyz " * 5] * 20, vocab_size=262)
    return _TOK


def toy_policy(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=toy_tokenizer().vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    return CausalLM(CausalLMConfig(**cfg))


def a_rate(prompt, completion) -> float:
    return completion.count("a") / max(1, len(completion))


def toy_judge() -> CallableJudge:
    return CallableJudge(a_rate, name="a_rate")


TOY_PROMPTS = [{"prompt": "x"}, {"prompt": "y"}, {"prompt": "z"}, {"prompt": "b"}]
