"""Batched sampling from logits, fused: penalties -> temperature -> top-k -> top-p -> min-p ->
draw, with epsilon-greedy exploration, per-row parameters and counter-based seeding.

Processing order (Hugging Face's, so users get what they expect):

1. penalties on the logits of tokens in ``token_history`` (``[B, L]``, -1 = padding):
   repetition ``x < 0 ? x * r : x / r``; presence ``x -= p``; frequency ``x -= f * count``;
2. temperature ``x / T`` (``T = 0`` means greedy);
3. top-k: keep the k most likely tokens (``k = 1`` means greedy; ties at the boundary kept);
4. top-p on the renormalized top-k distribution: keep the smallest set of most likely tokens
   whose mass reaches ``top_p``;
5. min-p: keep tokens with probability >= ``min_p`` times the largest one;
6. draw from ``q = (1 - epsilon) * filtered + epsilon * uniform(V)``.

Every parameter is a Python scalar or a per-row tensor ``[B]`` (FlashInfer's "tensor or
scalar"). Returns ``SampleOutput(tokens [B] int64, logprobs [B], raw_logprobs [B])``:
``logprobs`` = log q(token) (the distribution actually sampled from); ``raw_logprobs`` = the
plain temperature-1 log-softmax of the unmodified logits at the token (both fp32).

Bad logits: a row with a NaN, a ``+inf`` or only ``-inf`` logits defines no distribution (a
``+inf`` is a certainty we cannot weigh against the other tokens; to force a token, set the others
to ``-inf``). Such a row raises a ValueError naming it: always with the reference and with
``validate=True``; without validation the CPU kernel still raises (its launcher reports the row)
and the CUDA kernel trips a device-side check.

Randomness: Philox keyed by ``seed``; the counter is ``(offset, row)``, so a call is
reproducible and a row's draw does not depend on the other rows. ``row_ids [B]`` (int64) replaces
the row index in the counter: a generation loop that drops finished rows passes each row's
original index, so its draws do not depend on which other rows are still in the batch.
``seed=None`` takes one from torch's default generator (``torch.manual_seed`` makes it
reproducible). Advance ``offset`` per decoding step. CPU and CUDA draw different tokens from the
same distribution.

No sort of the vocabulary: CPU thresholds come from a histogram of the probabilities plus a
quickselect inside one bin; CUDA bisects on the float bits with block reductions.
Math in ``csrc/kernels/sample.h``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrlhf import _ext
from fastrlhf.ops import reference
from fastrlhf.ops._common import Impl, check_index, check_tensor, use_kernel


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32: log q(token), the processed distribution
    raw_logprobs: torch.Tensor  # [B] fp32: log softmax(logits)(token), unmodified, temperature 1


# name: (default, dtype of a per-row tensor, bad(x) -> bool, requirement). bad() works on a Python
# number and elementwise on a per-row tensor, so both are held to the same rule.
_PARAMS = {
    "temperature": (1.0, torch.float32, lambda x: x < 0, "must be >= 0 (0: greedy)"),
    "top_k": (0, torch.int64, lambda x: x < 0, "must be >= 0 (0: off, 1: greedy)"),
    "top_p": (1.0, torch.float32, lambda x: (x <= 0) | (x > 1), "must be in (0, 1]"),
    "min_p": (0.0, torch.float32, lambda x: (x < 0) | (x > 1), "must be in [0, 1]"),
    "epsilon": (0.0, torch.float32, lambda x: (x < 0) | (x > 1), "must be in [0, 1]"),
    "repetition_penalty": (1.0, torch.float32, lambda x: x <= 0, "must be > 0 (1: off)"),
    "presence_penalty": (0.0, torch.float32, None, ""),
    "frequency_penalty": (0.0, torch.float32, None, ""),
}


def _param(name, value, B, device, validate):
    """-> (per-row tensor or None, scalar value)."""
    default, dtype, bad_value, requirement = _PARAMS[name]
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if tuple(value.shape) != (B,):
                raise ValueError(f"fastrlhf.ops.sample: {name} must be a scalar or a [B] = [{B}] tensor, got shape "
                                 f"{tuple(value.shape)}")
            if value.device != device:
                raise ValueError(f"fastrlhf.ops.sample: {name} is on {value.device} but logits are on {device}")
            if dtype == torch.int64 and value.is_floating_point():
                raise TypeError(f"fastrlhf.ops.sample: {name} must be an integer tensor, got {value.dtype}")
            t = value.to(dtype)
            if validate:
                bad = ~torch.isfinite(t.double()) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
                if bad_value is not None:
                    bad = bad | bad_value(t)
                for i in torch.nonzero(bad).flatten()[:1].tolist():
                    v = t[i].item()
                    ok = v == v and abs(v) != float("inf")
                    why = requirement if ok else "must be finite"
                    raise ValueError(f"fastrlhf.ops.sample: {name}[{i}] = {v} {why}")
            return t, default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastrlhf.ops.sample: {name} must be a number or a [B] tensor, got {type(value).__name__}")
    if dtype == torch.int64 and not float(value).is_integer():
        raise TypeError(f"fastrlhf.ops.sample: {name} must be an integer, got {value}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"fastrlhf.ops.sample: {name} must be finite, got {value}")
    if bad_value is not None and bad_value(v):
        raise ValueError(f"fastrlhf.ops.sample: {name} {requirement}, got {value}")
    return None, (int(v) if dtype == torch.int64 else v)


def check_logits_rows(logits: torch.Tensor) -> None:
    """Every row of ``logits [B, V]`` must define a distribution: no NaN, no +inf, not all -inf.
    Raises a ValueError naming the first bad row (this reads the values: a GPU sync)."""
    x = logits.float()
    bad = x.isnan().any(1) | x.isposinf().any(1) | x.isneginf().all(1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        row = x[b]
        if bool(row.isnan().any()):
            why = "holds NaN"
        elif bool(row.isposinf().any()):
            tok = int(row.isposinf().nonzero()[0, 0])
            why = f"holds +inf at token {tok} (to force a token, set the others to -inf)"
        else:
            why = "is all -inf (no token is allowed)"
        raise ValueError(f"fastrlhf.ops.sample: row {b} of logits {why}; it defines no distribution to sample from")


def sample(
    logits: torch.Tensor,
    *,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    epsilon=None,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    token_history: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    row_ids: torch.Tensor | None = None,
    validate: bool = True,
    impl: Impl = "auto",
) -> SampleOutput:
    """Draw one token per row of ``logits [B, V]``; see the module docstring for semantics.
    ``validate=False`` skips the value checks of per-row tensors and of ``token_history`` (they
    synchronize with a GPU); shapes and scalars are always checked."""
    op = "sample"
    check_tensor(op, "logits", logits, ndim=2)
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"fastrlhf.ops.{op}: logits must have V >= 1 columns, got {tuple(logits.shape)}")
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, epsilon=epsilon,
                 repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty)
    args = {name: _param(name, v, B, logits.device, validate) for name, v in given.items()}
    if token_history is not None:
        check_tensor(op, "token_history", token_history, ndim=2, floating=False)
        if token_history.shape[0] != B:
            raise ValueError(f"fastrlhf.ops.{op}: token_history must be [B, L] with B = {B}, got "
                             f"{tuple(token_history.shape)}")
        if token_history.device != logits.device:
            raise ValueError(f"fastrlhf.ops.{op}: token_history is on {token_history.device} but logits are on "
                             f"{logits.device}")
        if token_history.is_floating_point() or token_history.dtype == torch.bool:
            raise TypeError(f"fastrlhf.ops.{op}: token_history must be an integer tensor, got {token_history.dtype}")
        token_history = token_history.long()
        if validate and token_history.numel() and ((token_history < -1) | (token_history >= V)).any():
            raise ValueError(f"fastrlhf.ops.{op}: token_history ids must be in [0, V) = [0, {V}) or -1 (padding)")
    if row_ids is not None:
        row_ids = check_index(op, "row_ids", row_ids, "logits[:, 0]", logits, shape=(B,))
        if validate and bool((row_ids < 0).any()):
            raise ValueError(f"fastrlhf.ops.{op}: row_ids must be >= 0")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"fastrlhf.ops.{op}: seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**63:
        raise ValueError(f"fastrlhf.ops.{op}: offset must be an int in [0, 2**63), got {offset!r}")
    kernel = use_kernel(op, impl, logits.device, logits.dtype)
    if (validate or not kernel) and not torch.compiler.is_compiling():
        check_logits_rows(logits)
    if kernel:
        flat = [x for name in _PARAMS for x in args[name]]
        return SampleOutput(*torch.ops.fastrlhf.sample.default(logits, *flat, token_history, seed, offset, row_ids))
    kw = {name: (t if t is not None else v) for name, (t, v) in args.items()}
    return SampleOutput(*reference.sample(logits, seed=seed, offset=offset, row_ids=row_ids,
                                          token_history=token_history,
                                          **kw))


if _ext.extension_available():

    @torch.library.register_fake("fastrlhf::sample")
    def _sample_fake(logits, *rest):
        B = logits.shape[0]
        return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32),
                logits.new_empty((B,), dtype=torch.float32))
