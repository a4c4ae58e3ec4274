"""Small models for the model, generation and trainer tests (fp32, a few layers, GQA)."""

from __future__ import annotations

import torch

from fastrlhf.models import CausalLM, CausalLMConfig


def tiny_config(**kw) -> CausalLMConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return CausalLMConfig(**base)


def tiny_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny_config(**kw)).eval()


def left_padded(B: int, P: int, vocab: int, lengths, seed: int = 0):
    """Random prompts [B, P], row b left-padded to lengths[b] valid tokens (pads are 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(P) >= P - lengths[:, None]).long()
    ids = torch.randint(1, vocab, (B, P), generator=g) * mask
    return ids, mask
