"""Inputs shared by several op tests."""

from __future__ import annotations

import torch

# ---- LM-head inputs (linear_token_logprobs, linear_token_loss) -------------------------------


def lm_head_inputs(lead, H, V, *, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """hidden ~ N(0, 1) [*lead, H], weight ~ N(0, 1/H) [V, H] (logits ~ N(0, 1)), bias ~ N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    hidden = torch.randn(*lead, H, **f64).to(device, dtype)
    weight = (torch.randn(V, H, **f64) * 2.0 / H**0.5).to(device, dtype)
    b = (torch.randn(V, **f64) * 0.5).to(device, dtype) if bias else None
    tokens = torch.randint(0, V, tuple(lead), generator=g).to(device)
    return dict(hidden=hidden, weight=weight, bias=b, tokens=tokens)
