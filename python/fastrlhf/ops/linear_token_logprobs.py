"""Token log-probs (and entropies) straight from the last hidden states and the LM-head weight,
never materializing the ``[N, V]`` logits.

CPU, fp32/fp64: a tiled kernel (``csrc/kernels/linear_token_logprobs.h``). For each chunk of
``chunk_size`` tokens (default 512) and each vocabulary block (about 2^20 logits per tile, 4 MiB
in fp32) one GEMM computes the tile ``W_block @ hidden_chunk.T`` (fp32 in a build for an AVX-512
CPU, ``FASTRLHF_CPU_ARCH=native``: our own register-blocked micro-kernel,
``csrc/kernels/cpu/sgemm.h``; otherwise torch's BLAS); the
per-token log-sum-exp, chosen logit and entropy are updated online across blocks. The backward
recomputes each tile, turns it into ``dlogits`` in place and accumulates ``grad_weight`` and
``grad_hidden`` with two more GEMMs: four matmuls in all against the three of eager code that
keeps the logits, the price of never storing them (:func:`~fastrlhf.ops.linear_token_loss` needs
three when the loss is known up front). Extra memory is the tile (and, fp32 on the micro-kernel,
the chunk's hidden states packed: up to two ``[chunk, H]`` copies).

Other devices and 16-bit CPU dtypes: row chunks of ``chunk_size`` tokens (default about 2^23
logits) through ATen's matmul and the fused :func:`~fastrlhf.ops.token_logprobs` kernels, the
backward likewise recomputing each chunk's logits (``grad_weight`` accumulated in fp32 for
16-bit weights).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_chunk_size, check_lm_head, check_temperature, use_kernel
from fastrlhf.ops.reference._acc import acc_dtype


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    impl: Impl = "auto",
):
    """``hidden [..., H]``, ``weight [V, H]`` (``nn.Linear`` layout), ``tokens [...]`` ->
    ``logprobs [...]`` (and ``entropy [...]``) in fp32 (fp64 for fp64), differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``. Same semantics as
    ``token_logprobs(hidden @ weight.T + bias, tokens)``.

    Args:
        hidden: ``[..., H]`` float, the last hidden states (differentiable).
        weight: ``[V, H]`` LM-head weight, same device and dtype as ``hidden`` (differentiable).
        tokens: ``[...]`` integer (``hidden``'s shape without the last dim), token ids in ``[0, V)``.
        bias: ``[V]`` LM-head bias, same dtype as ``hidden`` (differentiable). Default: none.
        temperature: finite, > 0; the logits are divided by it before the softmax.
        return_entropy: also return the per-position entropy of the tempered softmax.
        chunk_size: tokens per chunk (a positive int); None: the implementation's default (512
            tokens for the CPU fp32/fp64 kernel, about 2^23 logits elsewhere). Trades memory for
            speed, never the result's semantics.
        impl: ``"auto"`` (kernel when available), ``"kernel"`` or ``"reference"`` (materializes
            the logits).

    Returns:
        ``logprobs [...]``, or ``(logprobs, entropy)`` when ``return_entropy``; fp32 (fp64 for
        fp64 inputs).
    """
    op = "linear_token_logprobs"
    tokens = check_lm_head(op, hidden, weight, tokens, bias)
    temperature = check_temperature(op, temperature)
    chunk_size = check_chunk_size(op, chunk_size)
    if use_kernel(op, impl, hidden.device, hidden.dtype):
        lead, H = hidden.shape[:-1], hidden.shape[-1]
        lp, ent, _ = torch.ops.fastrlhf.linear_token_logprobs.default(
            hidden.reshape(lead.numel(), H), weight, tokens.reshape(-1), bias, temperature, chunk_size
        )
        lp, ent = lp.view(lead), ent.view(lead)
    else:
        lp, ent = reference.linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature)
    return (lp, ent) if return_entropy else lp


class LinearTokenLogprobs(nn.Module):
    """An LM head (``nn.Linear(H, V)`` parameters) that returns token log-probs instead of
    logits: ``forward(hidden, tokens)``.

    Args:
        hidden_size: ``H``, the input (hidden state) size.
        vocab_size: ``V``, the number of tokens.
        bias: whether the head has a ``[V]`` bias.
        temperature, return_entropy, chunk_size, impl: as in :func:`linear_token_logprobs`.
    """

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, temperature: float = 1.0,
                 return_entropy: bool = False, chunk_size: int | None = None, impl: Impl = "auto"):
        super().__init__()
        lin = nn.Linear(hidden_size, vocab_size, bias=bias)
        self.weight, self.bias = lin.weight, lin.bias
        self.temperature, self.return_entropy = temperature, return_entropy
        self.chunk_size, self.impl = chunk_size, impl

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor):
        return linear_token_logprobs(hidden, self.weight, tokens, bias=self.bias, temperature=self.temperature,
                                     return_entropy=self.return_entropy, chunk_size=self.chunk_size, impl=self.impl)

    def extra_repr(self) -> str:
        V, H = self.weight.shape
        return f"hidden_size={H}, vocab_size={V}, bias={self.bias is not None}, temperature={self.temperature}"


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::linear_token_logprobs")
    def _fake(hidden, weight, tokens, bias, temperature, chunk_size):
        acc = acc_dtype(hidden.dtype)
        N = hidden.shape[0]
        return hidden.new_empty((N,), dtype=acc), hidden.new_empty((N,), dtype=acc), hidden.new_empty((N, 2), dtype=acc)

    @torch.library.register_fake("fastrlhf::linear_token_logprobs_backward")
    def _backward_fake(grad_logprobs, grad_entropy, hidden, weight, tokens, bias, row_stats, entropy, temperature,
                       chunk_size):
        grad_bias = weight.new_empty(weight.shape[:1] if bias is not None else (0,))
        return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias

    def _setup_context(ctx, inputs, output):
        hidden, weight, tokens, bias, temperature, chunk_size = inputs
        _, entropy, row_stats = output
        ctx.set_materialize_grads(False)  # an unused entropy output -> None: the log-prob-only backward
        ctx.save_for_backward(hidden, weight, tokens, bias, row_stats, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(row_stats)

    def _backward(ctx, grad_logprobs, grad_entropy, _grad_row_stats):
        hidden, weight, tokens, bias, row_stats, entropy = ctx.saved_tensors
        gh, gw, gb = torch.ops.fastrlhf.linear_token_logprobs_backward.default(
            grad_logprobs, grad_entropy, hidden, weight, tokens, bias, row_stats, entropy, ctx.temperature,
            ctx.chunk_size,
        )
        return gh, gw, None, (gb if bias is not None else None), None, None

    torch.library.register_autograd("fastrlhf::linear_token_logprobs", _backward, setup_context=_setup_context)
