"""Log-probabilities of chosen tokens (and per-position entropy) from logits, fused.

One pass over the vocabulary per row (max, then exp-sums that reuse the row from cache); the
backward writes ``dlogits`` directly from the saved per-row (max, log-sum) and entropy, in the
logits dtype: for bf16/fp16 logits no fp32 ``[N, V]`` tensor is allocated, forward or backward.
Math in ``csrc/kernels/token_logprobs.h``.

Semantics: ``x = logits / temperature``; ``logprob = x[token] - logsumexp(x)``;
``entropy = -sum softmax(x) * log_softmax(x)`` (0 log 0 = 0, so ``-inf`` logits are fine).
Outputs are fp32 (fp64 for fp64 logits) whatever the logits dtype. A row of all ``-inf`` or
with a NaN gives NaN. Token ids outside ``[0, V)`` raise (CPU) or trip a device-side check (CUDA: a
CUDA error at the next synchronization, like torch.gather).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_index, check_temperature, check_tensor, use_kernel
from fastrlhf.ops.reference._acc import acc_dtype


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: Impl = "auto",
):
    """``logits [..., V]``, ``tokens [...]`` -> ``logprobs [...]`` (and ``entropy [...]`` when
    ``return_entropy``), differentiable w.r.t. ``logits``.

    For a causal LM, shift first: ``token_logprobs(logits[:, :-1], input_ids[:, 1:])``.

    Args:
        logits: ``[..., V]`` float (fp32, fp64, fp16 or bf16), unnormalized scores over a
            vocabulary of ``V``; differentiable.
        tokens: ``[...]`` integer (``logits``' shape without the last dim), the chosen token ids
            in ``[0, V)``.
        temperature: finite, > 0; the logits are divided by it before the softmax.
        return_entropy: also return the per-position entropy of ``softmax(logits / temperature)``.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"``.

    Returns:
        ``logprobs [...]``, or ``(logprobs, entropy)`` when ``return_entropy``; fp32 (fp64 for
        fp64 logits) whatever the logits dtype, both differentiable w.r.t. ``logits``.
    """
    op = "token_logprobs"
    check_tensor(op, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"fastrlhf.ops.{op}: logits must be [..., V] with V >= 1, got {tuple(logits.shape)}")
    tokens = check_index(op, "tokens", tokens, "logits[..., 0]", logits, shape=logits.shape[:-1])
    temperature = check_temperature(op, temperature)
    if use_kernel(op, impl, logits.device, logits.dtype):
        lead, V = logits.shape[:-1], logits.shape[-1]
        lp, ent, _ = torch.ops.fastrlhf.token_logprobs.default(logits.reshape(-1, V), tokens.reshape(-1), temperature)
        lp, ent = lp.view(lead), ent.view(lead)
    else:
        lp, ent = reference.token_logprobs(logits, tokens, temperature=temperature)
    return (lp, ent) if return_entropy else lp


class TokenLogprobs(nn.Module):
    """Module face of :func:`token_logprobs`: ``forward(logits, tokens) -> logprobs`` (or
    ``(logprobs, entropy)``).

    Args:
        temperature, return_entropy, impl: as in :func:`token_logprobs`.
    """

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, impl: Impl = "auto"):
        super().__init__()
        self.temperature, self.return_entropy, self.impl = temperature, return_entropy, impl

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor):
        return token_logprobs(logits, tokens, temperature=self.temperature,
                              return_entropy=self.return_entropy, impl=self.impl)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, return_entropy={self.return_entropy}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::token_logprobs")
    def _token_logprobs_fake(logits, tokens, temperature):
        torch._check(logits.dim() == 2, lambda: "logits must be [N, V]")
        torch._check(tokens.shape == logits.shape[:1], lambda: "tokens must be [N]")
        N, acc = logits.shape[0], acc_dtype(logits.dtype)
        return logits.new_empty((N,), dtype=acc), logits.new_empty((N,), dtype=acc), logits.new_empty((N, 2), dtype=acc)

    @torch.library.register_fake("fastrlhf::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, temperature):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fastrlhf::token_logprobs_backward_")
    def _token_logprobs_backward_inplace_fake(grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy,
                                              temperature):
        return None

    def _setup_context(ctx, inputs, output):
        logits, tokens, temperature = inputs
        _, entropy, row_stats = output
        ctx.save_for_backward(logits, tokens, row_stats, entropy)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(row_stats)

    def _backward(ctx, grad_logprobs, grad_entropy, _grad_row_stats):
        logits, tokens, row_stats, entropy = ctx.saved_tensors
        grad_logits = torch.ops.fastrlhf.token_logprobs_backward.default(
            grad_logprobs, grad_entropy, logits, tokens, row_stats, entropy, ctx.temperature
        )
        return grad_logits, None, None

    torch.library.register_autograd("fastrlhf::token_logprobs", _backward, setup_context=_setup_context)
