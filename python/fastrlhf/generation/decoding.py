"""The decoding machinery shared by every ``generate`` path (the native engine and the Hugging
Face adapter): :class:`SamplingPlan` validates one call's per-row settings, :class:`Decoder`
samples a token for every running row, records it and ends rows on stop tokens or limits.

A path supplies only the model's forward and cache; everything that decides which tokens a row
gets lives here, so both paths return the same ``GenerationOutput`` for the same logits.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from fastrlhf import ops
from fastrlhf.generation.config import GenerationConfig, GenerationOutput

SAMPLING_PARAMS = ("temperature", "top_k", "top_p", "min_p", "epsilon", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def model_default(model, name):
    """``name`` (eos_token_id, pad_token_id) from the model's generation config (a transformers
    GenerationConfig, or the dict of a checkpoint's generation_config.json), else its config."""
    gen = getattr(model, "generation_config", None)
    value = gen.get(name) if isinstance(gen, dict) else getattr(gen, name, None)
    return value if value is not None else getattr(getattr(model, "config", None), name, None)


def _nontrivial(v, default):
    if isinstance(v, torch.Tensor):
        return bool((v != default).any())
    return v != default


def _vocab_size(model) -> int | None:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) else None


class SamplingPlan:
    """The validated per-row settings of one ``generate`` call.

    Args:
        input_ids: ``[B, P]`` left-padded prompts (int).
        attention_mask: ``[B, P]`` 1 on prompt tokens, or None (no padding).
        config: the call's :class:`GenerationConfig`.
        model: the model (its generation config / config give default stop and pad ids, and its
            ``vocab_size`` bounds the stop ids).
    """

    def __init__(self, input_ids, attention_mask, config: GenerationConfig, model):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"generate: input_ids must be an int [B, P] tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, P = input_ids.shape
        dev = input_ids.device
        if B == 0 or P == 0:
            raise ValueError(f"generate: need at least one row and one prompt position, got [B, P] = [{B}, {P}]")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
        if tuple(mask.shape) != (B, P):
            raise ValueError(f"generate: attention_mask must be [B, P] = [{B}, {P}], got {tuple(mask.shape)}")
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("generate: every row needs at least one prompt token")
        expected = (torch.arange(P, device=dev) >= P - lengths[:, None]).long()
        if not torch.equal(mask, expected):
            raise ValueError("generate: prompts must be left-padded (each mask row = zeros then ones; use "
                             "padding_side='left' when tokenizing)")
        vocab = _vocab_size(model)
        self.B, self.P, self.mask, self.lengths = B, P, mask, lengths
        self.max_new = self._per_row_int("max_new_tokens", config.max_new_tokens, B, dev)
        if bool((self.max_new < 1).any()):
            raise ValueError("generate: max_new_tokens must be >= 1")
        self.L = int(self.max_new.max())
        stop = config.stop_token_ids
        self.stop = self._stop_table(model_default(model, "eos_token_id") if stop is None else stop, B, dev, vocab,
                                     given=stop is not None)
        pad = config.pad_token_id
        if pad is None:
            pad = model_default(model, "pad_token_id")
        if pad is None and self.stop.numel():  # as transformers: pad with the (first) end token
            pad = int(self.stop[0, 0])
        self.pad = 0 if pad is None else int(pad)
        self.sampling = {}
        for k in SAMPLING_PARAMS:
            v = getattr(config, k)
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                v = v.item()
            if isinstance(v, torch.Tensor) and tuple(v.shape) != (B,):
                raise ValueError(f"generate: {k} must be a scalar or a [B] = [{B}] tensor, got {tuple(v.shape)}")
            self.sampling[k] = v
        self.penalties = any(_nontrivial(self.sampling[k], d) for k, d in
                             (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)))
        seed = config.seed
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.request_ids = None
        if config.request_ids is not None:
            self.request_ids = self._per_row_int("request_ids", config.request_ids, B, dev)
            if config.request_ids is not None and bool((self.request_ids < 0).any()):
                raise ValueError("generate: request_ids must be >= 0")
        self.sync = config.synchronize_timings and dev.type == "cuda"
        self.timings = {"prefill": 0.0, "decode": 0.0, "sample": 0.0}

    @staticmethod
    def _per_row_int(name, value, B, dev):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"generate: {name} must hold integers, got a {value.dtype} tensor")
        else:
            flat = value if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in flat if isinstance(v, bool) or not isinstance(v, int)]
            if bad:
                raise TypeError(f"generate: {name} must be an int or one int per row, got {bad[0]!r}")
        t = torch.as_tensor(value, dtype=torch.long, device=dev)
        if t.dim() == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"generate: {name} must be an int or one per row ({B}), got shape {tuple(t.shape)}")
        return t.clone()

    @staticmethod
    def _stop_table(stop, B, dev, vocab, *, given: bool):
        """-> [B, S] int64 stop ids per row, -1 padded (S may be 0)."""
        if stop is None:
            stop = []
        if isinstance(stop, torch.Tensor):
            stop = stop.tolist()
        if isinstance(stop, int):
            stop = [stop]
        rows = stop if (len(stop) and isinstance(stop[0], (list, tuple))) else [list(stop)] * B
        if len(rows) != B:
            raise ValueError(f"generate: stop_token_ids per row must have B = {B} lists, got {len(rows)}")
        for i, r in enumerate(rows):
            for tok in r:
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise TypeError(f"generate: stop_token_ids must be ints, got {tok!r}")
                if tok < 0 or (vocab is not None and tok >= vocab):
                    where = "stop_token_ids" if given else "the model's eos_token_id (the default stop_token_ids)"
                    raise ValueError(f"generate: {where} of row {i} holds {tok}, outside the vocabulary "
                                     f"[0, {vocab}): such a token can never be sampled, so the row would never stop")
        S = max((len(r) for r in rows), default=0)
        table = torch.full((B, S), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return table.to(dev)

    def select(self, name, rows):
        """Sampling parameter ``name`` for the batch rows ``rows`` (original row ids)."""
        v = self.sampling[name]
        return v.to(rows.device)[rows] if isinstance(v, torch.Tensor) and v.dim() == 1 else v

    def stream_ids(self, rows):
        """The ids keying the random streams of ``rows``: ``request_ids`` if given, else the row index."""
        return rows if self.request_ids is None else self.request_ids.to(rows.device)[rows]

    @contextmanager
    def timed(self, phase):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.timings[phase] += time.perf_counter() - t0


def sample_step(plan: SamplingPlan, logits: torch.Tensor, rows: torch.Tensor, step: int,
                history: torch.Tensor | None):
    """One token per row from ``logits [b, V]`` for the batch rows ``rows [b]`` (original ids).
    -> (tokens [b], logprobs [b] under softmax(logits / T), sampling logprobs [b])."""
    kw = {name: plan.select(name, rows) for name in SAMPLING_PARAMS}
    out = ops.sample(logits, seed=plan.seed, offset=step, row_ids=plan.stream_ids(rows), token_history=history,
                     validate=step == 0, **kw)
    temp = kw["temperature"]
    if isinstance(temp, torch.Tensor):  # per-row temperatures: plain log-softmax, T = 1 where greedy
        t = torch.where(temp > 0, temp, torch.ones_like(temp)).float()[:, None]
        lp = torch.log_softmax(logits.float() / t, dim=-1).gather(1, out.tokens[:, None]).squeeze(1)
    elif temp > 0 and temp != 1.0:
        lp = ops.token_logprobs(logits, out.tokens, temperature=float(temp))
    else:
        lp = out.raw_logprobs
    return out.tokens, lp, out.logprobs


class Decoder:
    """The bookkeeping of one generate call, shared by the native and the adapter paths: sample a
    token for every batch row, record it for rows still live, end rows on stop tokens / limits.

    Args:
        plan: the call's :class:`SamplingPlan`.
        input_ids: ``[B, P]`` the prompts (the penalties' token history starts with them).
    """

    def __init__(self, plan: SamplingPlan, input_ids: torch.Tensor):
        B, P, L, dev = plan.B, plan.P, plan.L, input_ids.device
        self.plan = plan
        self.tokens = torch.full((B, L), plan.pad, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((B, L), dtype=torch.float32, device=dev)
        self.sampling_logprobs = torch.zeros((B, L), dtype=torch.float32, device=dev)
        self.response_lengths = plan.max_new.to(dev).clone()
        self.stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.max_new, self.stop = plan.max_new.to(dev), plan.stop.to(dev)
        self.history = None
        if plan.penalties:  # prompt + generated tokens, -1 = empty (the penalties' token history)
            self.history = torch.full((B, P + L), -1, dtype=torch.long, device=dev)
            self.history[:, :P] = torch.where(plan.mask.to(dev).bool(), input_ids, -1)

    def step(self, t: int, logits: torch.Tensor, rows: torch.Tensor):
        """Sample step ``t`` for batch rows ``rows`` (original ids) from ``logits [b, V]``.
        -> (tokens [b], keep [b] bool: rows that go on)."""
        P = self.plan.P
        with self.plan.timed("sample"):
            history = None if self.history is None else self.history[rows]
            tok, lp, slp = sample_step(self.plan, logits, rows, t, history)
            live = ~self.done[rows]  # finished rows may still sit in the batch: leave their record alone
            r = rows[live]
            self.tokens[r, t], self.logprobs[r, t], self.sampling_logprobs[r, t] = tok[live], lp[live], slp[live]
            if self.history is not None:
                self.history[r, P + t] = tok[live]
            hit = live & (tok[:, None] == self.stop[rows]).any(1) if self.stop.shape[1] else torch.zeros_like(live)
            ends = live & (hit | (t + 1 >= self.max_new[rows]))
            self.stopped[rows] |= hit
            self.response_lengths[rows] = torch.where(ends, torch.full_like(tok, t + 1), self.response_lengths[rows])
            self.done[rows] |= ends
        return tok, ~self.done[rows]

    def output(self, input_ids) -> GenerationOutput:
        """Stack prompt and responses; pad after each row's end."""
        plan, L = self.plan, self.tokens.shape[1]
        resp_mask = (torch.arange(L, device=self.tokens.device) < self.response_lengths[:, None]).long()
        valid = resp_mask.bool()
        tokens = torch.where(valid, self.tokens, torch.full_like(self.tokens, plan.pad))
        zero = torch.zeros((), dtype=torch.float32, device=tokens.device)
        return GenerationOutput(
            sequences=torch.cat([input_ids, tokens], dim=1),
            attention_mask=torch.cat([plan.mask.to(tokens.device), resp_mask], dim=1),
            response_mask=resp_mask,
            logprobs=torch.where(valid, self.logprobs, zero),
            sampling_logprobs=torch.where(valid, self.sampling_logprobs, zero),
            response_lengths=self.response_lengths,
            stopped=self.stopped,
            prompt_length=plan.P,
            timings={**plan.timings, "tokens": int(self.response_lengths.sum())},
        )
