"""Batched generation with a preallocated KV cache.

``generate(model, input_ids, attention_mask, config)`` for a :class:`~fastrlhf.models.CausalLM`:

1. prompts arrive left-padded (``[B, P]``, Hugging Face's convention); each row is moved to the
   start of its cache row, so the cache holds no padding and row b's keys are ``[0, len_b)``;
2. prefill: one forward over the prompts through ``ops.attention`` writes the cache;
3. decode: per step, ``ops.sample`` draws one token per row from the last logits (penalties,
   temperature, top-k/p, min-p, epsilon), the log-prob of the token under ``softmax(logits / T)``
   is kept (what a training forward recomputes), and one forward of the new tokens runs through
   ``ops.decode_attention``. Rows that hit a stop token or their ``max_new_tokens`` leave the batch
   together with their cache rows (``drop_finished``), so they cost nothing more.

Randomness: Philox keyed by ``config.seed``; step t of row b uses counter (t, b), b the row's
index in the call's input, so a row's tokens depend only on the seed, its prompt and its own
settings - not on which other rows are in the batch or have finished.

Any Hugging Face causal LM works through :func:`fastrlhf.generation.hf.generate_hf` (dispatched
automatically): its own forward and cache, the same sampling and bookkeeping (finished rows are
dropped where its cache supports ``batch_select_indices``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from fastrlhf import ops
from fastrlhf.generation.config import GenerationConfig, GenerationOutput

_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "epsilon", "repetition_penalty", "presence_penalty",
             "frequency_penalty")


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig | None = None, **overrides) -> GenerationOutput:
    """Sample continuations of left-padded prompts ``input_ids [B, P]`` (``attention_mask [B, P]``,
    1 on prompt tokens). ``overrides`` replace fields of ``config``. See the module docstring."""
    from dataclasses import replace

    from fastrlhf.models.llama import CausalLM

    config = replace(config or GenerationConfig(), **overrides)
    if isinstance(model, CausalLM):
        return _generate_native(model, input_ids, attention_mask, config)
    from fastrlhf.generation.hf import generate_hf
    return generate_hf(model, input_ids, attention_mask, config)


# ---------------------------------------------------------------------------------------------
# shared by both paths


class _Plan:
    """Validated per-row settings of one call."""

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
        self.B, self.P, self.mask, self.lengths = B, P, mask, lengths
        self.max_new = self._per_row_int("max_new_tokens", config.max_new_tokens, B, dev)
        if bool((self.max_new < 1).any()):
            raise ValueError("generate: max_new_tokens must be >= 1")
        self.L = int(self.max_new.max())
        stop = config.stop_token_ids
        self.stop = self._stop_table(_model_default(model, "eos_token_id") if stop is None else stop, B, dev)
        pad = config.pad_token_id
        if pad is None:
            pad = _model_default(model, "pad_token_id")
        if pad is None and self.stop.numel():  # as transformers: pad with the (first) end token
            pad = int(self.stop[0, 0])
        self.pad = 0 if pad is None else int(pad)
        self.sampling = {}
        for k in _SAMPLING:
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
        self.sync = config.synchronize_timings and dev.type == "cuda"
        self.timings = {"prefill": 0.0, "decode": 0.0, "sample": 0.0}

    @staticmethod
    def _per_row_int(name, value, B, dev):
        t = torch.as_tensor(value, dtype=torch.long, device=dev)
        if t.dim() == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"generate: {name} must be an int or one per row ({B}), got shape {tuple(t.shape)}")
        return t.clone()

    @staticmethod
    def _stop_table(stop, B, dev):
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
        S = max((len(r) for r in rows), default=0)
        table = torch.full((B, S), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return table.to(dev)

    def select(self, name, rows):
        """Sampling parameter ``name`` for the batch rows ``rows`` (original row ids)."""
        v = self.sampling[name]
        return v.to(rows.device)[rows] if isinstance(v, torch.Tensor) and v.dim() == 1 else v

    @contextmanager
    def timed(self, phase):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.timings[phase] += time.perf_counter() - t0


def _model_default(model, name):
    """``name`` (eos_token_id, pad_token_id) from the model's generation config (a transformers
    GenerationConfig, or the dict of a checkpoint's generation_config.json), else its config."""
    gen = getattr(model, "generation_config", None)
    value = gen.get(name) if isinstance(gen, dict) else getattr(gen, name, None)
    return value if value is not None else getattr(getattr(model, "config", None), name, None)


def _nontrivial(v, default):
    if isinstance(v, torch.Tensor):
        return bool((v != default).any())
    return v != default


def _sample(plan: _Plan, logits: torch.Tensor, rows: torch.Tensor, step: int, history: torch.Tensor | None):
    """One token per row from ``logits [b, V]`` for the batch rows ``rows [b]`` (original ids).
    -> (tokens [b], logprobs [b] under softmax(logits / T), sampling logprobs [b])."""
    kw = {name: plan.select(name, rows) for name in _SAMPLING}
    out = ops.sample(logits, seed=plan.seed, offset=step, row_ids=rows, token_history=history, validate=step == 0, **kw)
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
    token for every batch row, record it for rows still live, end rows on stop tokens / limits."""

    def __init__(self, plan: _Plan, input_ids: torch.Tensor):
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
            tok, lp, slp = _sample(self.plan, logits, rows, t, None if self.history is None else self.history[rows])
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


# ---------------------------------------------------------------------------------------------
# native path


@torch.no_grad()  # not inference_mode: the outputs feed training forwards (autograd)
def _generate_native(model, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
    input_ids = input_ids.to(model.device)
    plan = _Plan(input_ids, attention_mask, config, model)
    B, P, L, dev = plan.B, plan.P, plan.L, input_ids.device
    lengths = plan.lengths.to(dev)
    need = int((lengths + plan.max_new.to(dev)).max())  # the longest row: prompt + new tokens
    if need > model.config.max_position_embeddings:
        raise ValueError(f"generate: a prompt plus its max_new_tokens ({need}) exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    # right-padded copy of the prompts: row b's tokens at [0, len_b)
    src = (P - lengths)[:, None] + torch.arange(P, device=dev)  # (B, P)
    prompt = input_ids.gather(1, src.clamp(max=P - 1))
    prompt_mask = (torch.arange(P, device=dev) < lengths[:, None]).long()
    cache = model.new_cache(B, max(need, P))  # prefill writes P (padded) positions
    dec = Decoder(plan, input_ids)

    with plan.timed("prefill"):
        hidden = model.model(prompt, prompt_mask, cache=cache)  # (B, P, C)
        logits = model.logits(hidden[torch.arange(B, device=dev), lengths - 1])  # (B, V)
    rows = torch.arange(B, device=dev)  # original id of each batch row
    with model.decode_weights():
        for t in range(L):
            tok, keep = dec.step(t, logits, rows)
            n_keep = int(keep.sum())
            if n_keep == 0:
                break
            if config.drop_finished and n_keep < rows.numel():
                idx = keep.nonzero().squeeze(1)
                cache.select(idx)
                rows, tok = rows[idx], tok[idx]
            with plan.timed("decode"):
                logits = model(tok[:, None], cache=cache)[:, 0]  # (b, V)
    return dec.output(input_ids)
