"""Reference token log-probs / entropy: log_softmax in the accumulator dtype + gather, and the
LM-head composition (hidden @ weight^T + bias) for linear_token_logprobs and linear_token_loss.
Differentiable."""

from __future__ import annotations

import torch

from fastrlhf.ops.reference._acc import acc_dtype


def token_logprobs(
    logits: torch.Tensor,  # [..., V]
    tokens: torch.Tensor,  # [...] int64
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logprobs [...], entropy [...]) in fp32 (fp64 for fp64 logits)."""
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    logp = torch.log_softmax(x, dim=-1)  # (..., V)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    # 0 * log 0 = 0 for -inf logits, with finite gradients (no 0 * -inf in the backward)
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return lp, entropy


def linear_token_logprobs(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    tokens: torch.Tensor,  # [...]
    *,
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (..., V): materialized
    return token_logprobs(logits, tokens, temperature=temperature)


def linear_token_loss(
    hidden: torch.Tensor,  # [R, ..., H]
    weight: torch.Tensor,  # [V, H]
    tokens: torch.Tensor,  # [R, ...]
    loss_fn,  # (logprobs [R, ...], entropy [R, ...], rows: slice) -> loss []
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [], logprobs [R, ...] detached, entropy [R, ...] detached): one loss_fn call
    on the materialized logits' log-probs."""
    lp, ent = linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature)
    loss = loss_fn(lp, ent, slice(0, hidden.shape[0]))
    return loss, lp.detach(), ent.detach()
