"""A token-level loss straight from the last hidden states and the LM-head weight, with the
gradients computed in the same pass (the "fused linear loss" of Liger-Kernel): three matmuls,
one ``[chunk, V]`` logits buffer.

:func:`~fastrlhf.ops.linear_token_logprobs` returns per-token log-probs whose upstream gradient
is unknown until the loss is built, so its backward must recompute every logit: four matmuls.
When the loss is known up front it can be differentiated chunk by chunk instead. For each chunk
of rows (slices of ``hidden``'s first dim):

1. ``logits_c = hidden_c @ weight.T + bias`` (ATen matmul into one reused buffer);
2. ``logprobs_c, entropy_c`` with the fused :func:`~fastrlhf.ops.token_logprobs` kernel;
3. ``loss_c = loss_fn(logprobs_c, entropy_c, rows)``, and its gradient w.r.t. ``logprobs_c`` and
   ``entropy_c`` by autograd (a ``[rows, ...]``-sized graph);
4. ``dlogits_c`` written over ``logits_c`` by the ``token_logprobs`` backward kernel, then
   ``grad_hidden_c = dlogits_c @ weight``, ``grad_weight += dlogits_c.T @ hidden_c`` (fp32
   accumulator for 16-bit weights) and ``grad_bias += dlogits_c.sum(0)``.

The backward only scales the stored gradients by the upstream gradient of the loss, so it runs
once (no ``retain_graph`` re-runs, no double backward).

**The loss must be a sum over rows**: ``loss = sum over chunks of loss_fn(chunk)``, a chunk
being ``chunk_rows`` rows of ``hidden``'s first dim. Means must use the whole batch's
normalizer, which all of fastrlhf's losses accept. For a token-separable loss (token-mean, SFT)
pass flat tokens, ``hidden [N, H]``, so chunks can be any size; a loss over whole sequences
(``agg="seq-mean-*"``, normalizer ``B``) takes ``hidden [B, T, H]``, and then a chunk holds at
least one sequence's ``[T, V]`` logits (a warning says so when that is over 2^26 logits). PPO,
token-mean::

    n = int(mask.sum())                                     # the whole batch's valid tokens
    def ppo(lp, ent, rows):                                 # lp, ent [r]; rows slices N
        return policy_loss(lp[:, None], old_lp[rows, None], adv[rows, None], mask[rows, None],
                           normalizer=n)[0]
    out = linear_token_loss(hidden.flatten(0, -2), lm_head.weight, tokens.flatten(), ppo)
    out.loss.backward()

Supervised fine-tuning: ``lambda lp, ent, rows: -(lp * mask[rows]).sum() / n``. Anything else
``loss_fn`` uses must be a constant: with grad mode on, a tensor that requires grad in its
graph raises (its gradient would be lost).

The gradients live from the forward to the backward: with gradient accumulation, call
``backward`` on each micro-batch's loss before the next forward, not on a sum of them.

Memory: the chunk's logits (default about 2^24 logits, 64 MiB in fp32; 16-bit weights add an
fp32 copy of the chunk's dlogits for the fp32 ``grad_weight`` accumulator) plus the gradients
every implementation returns. Device-generic: the matmuls are ATen's, the fused part is the
device's ``token_logprobs`` kernels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_chunk_size, check_lm_head, check_temperature, use_kernel
from fastrlhf.ops.reference._acc import acc_dtype

LossFn = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]

DEFAULT_CHUNK_LOGITS = 1 << 24
LARGE_ROW_LOGITS = 1 << 26  # a row (sequence) bigger than this: warn that chunks cannot be smaller


class LinearTokenLossOutput(NamedTuple):
    loss: torch.Tensor  # [] the sum of loss_fn over chunks, differentiable w.r.t. hidden, weight, bias
    logprobs: torch.Tensor  # [R, ...] fp32 (fp64 for fp64), detached: for logging / stats
    entropy: torch.Tensor  # [R, ...] same


def linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: LossFn,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    impl: Impl = "auto",
) -> LinearTokenLossOutput:
    """``hidden [R, ..., H]``, ``weight [V, H]`` (``nn.Linear`` layout), ``tokens [R, ...]``,
    ``loss_fn(logprobs [r, ...], entropy [r, ...], rows: slice) -> loss []`` called on chunks of
    ``chunk_rows`` rows of the first dim (default: about 2^24 logits, at least one row) ->
    ``(loss, logprobs, entropy)``.

    ``loss`` equals ``loss_fn(lp, ent, slice(0, R))`` on the full ``lp, ent =
    token_logprobs(hidden @ weight.T + bias, tokens, temperature=..., return_entropy=True)``
    when ``loss_fn`` is a sum over rows (see the module doc); the gradients of ``hidden``,
    ``weight`` and ``bias`` are computed during the forward when they require grad.
    ``impl="reference"`` materializes the logits and calls ``loss_fn`` once (plain autograd:
    no checks on what ``loss_fn`` uses, backward as often as wanted).

    Args:
        hidden: ``[R, ..., H]`` float (at least 2 dims), the last hidden states; chunks are slices
            of the first dim. Gets a gradient when it requires grad.
        weight: ``[V, H]`` LM-head weight, same device and dtype as ``hidden``.
        tokens: ``[R, ...]`` integer (``hidden``'s shape without the last dim), token ids in
            ``[0, V)``.
        loss_fn: ``(logprobs [r, ...], entropy [r, ...], rows: slice) -> loss []``, a 0-dim float
            tensor; ``rows`` is the chunk's slice of the first dim, to index per-row constants
            (old log-probs, advantages, masks). Must be a sum over rows (see the module doc); on
            the fused path every other tensor it uses must not require grad.
        bias: ``[V]`` LM-head bias, same dtype as ``hidden``. Default: none.
        temperature: finite, > 0; the logits are divided by it before the softmax.
        chunk_rows: rows of the first dim per chunk (a positive int); None: about 2^24 logits per
            chunk, at least one row.
        impl: ``"auto"`` (the fused chunked path when the extension supports the device and
            dtype, else the reference), ``"kernel"`` or ``"reference"``.

    Returns:
        ``LinearTokenLossOutput(loss, logprobs, entropy)``: ``loss []`` (the sum of ``loss_fn``
        over chunks, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; on the fused path
        its backward runs once), and the detached ``[R, ...]`` log-probs and entropies in fp32
        (fp64 for fp64), for logging.
    """
    op = "linear_token_loss"
    tokens = check_lm_head(op, hidden, weight, tokens, bias)
    if hidden.dim() < 2:
        raise ValueError(f"fastrlhf.ops.{op}: hidden must be [R, ..., H] (chunks are rows of the first dim), "
                         f"got {tuple(hidden.shape)}")
    if not callable(loss_fn):
        raise TypeError(f"fastrlhf.ops.{op}: loss_fn must be callable (logprobs, entropy, rows) -> loss, "
                        f"got {type(loss_fn).__name__}")
    temperature = check_temperature(op, temperature)
    chunk_rows = check_chunk_size(op, chunk_rows, name="chunk_rows")
    if not use_kernel(op, impl, hidden.device, hidden.dtype):
        loss, lp, ent = reference.linear_token_loss(hidden, weight, tokens, loss_fn, bias=bias,
                                                    temperature=temperature)
        _check_loss_value(loss)
        return LinearTokenLossOutput(loss, lp, ent)
    row_logits = math.prod(hidden.shape[1:-1]) * weight.shape[0]
    if chunk_rows == 0:
        chunk_rows = max(1, DEFAULT_CHUNK_LOGITS // max(1, row_logits))
    if row_logits > LARGE_ROW_LOGITS:
        warnings.warn(
            f"fastrlhf.ops.{op}: one row of hidden {tuple(hidden.shape)} is {row_logits} logits, the smallest "
            "chunk; for a token-separable loss pass flat tokens (hidden [N, H]) for smaller chunks",
            stacklevel=2,
        )
    grads_wanted = torch.is_grad_enabled()  # apply() runs forward with grad mode off
    loss, lp, ent = _LinearTokenLoss.apply(hidden, weight, bias, tokens, loss_fn, temperature, chunk_rows,
                                           grads_wanted)
    return LinearTokenLossOutput(loss, lp, ent)


def _check_loss_value(loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = f"shape {tuple(loss.shape)} {loss.dtype}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"fastrlhf.ops.linear_token_loss: loss_fn must return a 0-dim float tensor, got {what}")


def _check_no_other_leaves(loss: torch.Tensor, allowed: tuple[torch.Tensor, ...]) -> None:
    """The graph of loss_fn's result must have no leaf requiring grad besides ``allowed`` (the
    chunk's logprobs / entropy): another one would lose its gradient."""
    def refuse(t: torch.Tensor):
        raise RuntimeError(
            f"fastrlhf.ops.linear_token_loss: loss_fn uses a tensor of shape {tuple(t.shape)} that requires "
            "grad; only hidden, weight and bias get gradients here (pass it detached, or compute that part "
            "of the loss outside)"
        )

    if loss.requires_grad and loss.grad_fn is None:  # loss_fn returned a leaf
        refuse(loss)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":  # a leaf
            if not any(fn.variable is a for a in allowed):
                refuse(fn.variable)
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)


class _LinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, loss_fn, temperature, chunk_rows, grads_wanted):
        R, H, V = hidden.shape[0], hidden.shape[-1], weight.shape[0]
        inner = hidden.shape[1:-1]
        need_h, need_w = grads_wanted and ctx.needs_input_grad[0], grads_wanted and ctx.needs_input_grad[1]
        need_b = grads_wanted and bias is not None and ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        hidden, tokens = hidden.contiguous(), tokens.contiguous()
        acc = acc_dtype(hidden.dtype)
        low = hidden.dtype in (torch.float16, torch.bfloat16)
        logprobs = hidden.new_empty(hidden.shape[:-1], dtype=acc)  # [R, ...]
        entropy = torch.empty_like(logprobs)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32 if low else weight.dtype) if need_w else None
        grad_bias = weight.new_zeros((V,), dtype=grad_weight.dtype if need_w else acc) if need_b else None
        buffer = hidden.new_empty((min(chunk_rows, R) * math.prod(inner), V))  # [n, V], reused by every chunk
        logits = None
        losses = []
        for r0 in range(0, R, chunk_rows) if R > 0 else [0]:  # R = 0: loss_fn still sees the empty batch
            rows = slice(r0, min(R, r0 + chunk_rows))
            h_c = hidden[rows].reshape(-1, H)  # [n, H]
            t_c = tokens[rows].reshape(-1)  # [n]
            logits = buffer[: h_c.shape[0]]  # [n, V]
            if bias is None:
                torch.mm(h_c, weight.t(), out=logits)
            else:
                torch.addmm(bias, h_c, weight.t(), out=logits)
            lp, ent, row_stats = torch.ops.fastrlhf.token_logprobs.default(logits, t_c, temperature)
            lp_c, ent_c = lp.view(rows.stop - r0, *inner), ent.view(rows.stop - r0, *inner)
            logprobs[rows], entropy[rows] = lp_c, ent_c
            # loss_fn sees copies: an in-place edit of its inputs must not reach the backward kernel
            lp_in = lp_c.clone().requires_grad_(grads_wanted)
            ent_in = ent_c.clone().requires_grad_(grads_wanted)
            with torch.set_grad_enabled(grads_wanted):
                loss = loss_fn(lp_in, ent_in, rows)
                _check_loss_value(loss)
                if grads_wanted:
                    _check_no_other_leaves(loss, (lp_in, ent_in))
                grad_lp, grad_ent = (
                    torch.autograd.grad(loss, (lp_in, ent_in), allow_unused=True)
                    if need_any and loss.requires_grad else (None, None)
                )
            losses.append(loss.detach())
            if not need_any:
                continue
            if grad_lp is None and grad_ent is None:  # this chunk's loss does not depend on the logits
                if need_h:
                    grad_hidden[rows] = 0
                continue
            flat = lambda g: None if g is None else g.reshape(-1).to(acc)  # noqa: E731
            torch.ops.fastrlhf.token_logprobs_backward_.default(
                flat(grad_lp), flat(grad_ent), logits, t_c, row_stats, ent, temperature
            )  # logits now hold dlogits [n, V]
            if need_h:
                torch.mm(logits, weight, out=grad_hidden[rows].view(-1, H))
            if need_w:
                if low:
                    grad_weight.addmm_(logits.t().float(), h_c.float())
                else:
                    grad_weight.addmm_(logits.t(), h_c)
            if need_b:
                grad_bias += logits.sum(0, dtype=grad_bias.dtype)
        del buffer, logits  # before the gradients' dtype conversions allocate
        loss = torch.stack(losses).sum()
        # kept as attributes, not saved tensors: the backward hands them over without a copy
        ctx.grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(weight.dtype),
        )
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "fastrlhf.ops.linear_token_loss: the gradients were computed in the forward and handed out "
                "by the first backward; it cannot run twice (retain_graph) -- call linear_token_loss again"
            )
        del ctx.grads
        out = [None if g is None or grad_loss is None else g.mul_(grad_loss) for g in grads]
        return out[0], out[1], out[2], None, None, None, None, None
