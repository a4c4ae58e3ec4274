"""What ``generate`` takes and returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationConfig:
    """Sampling settings. ``max_new_tokens`` and ``stop_token_ids`` may be per row; the sampling
    parameters may be per-row ``[B]`` tensors (as ``fastrlhf.ops.sample`` takes them).

    Args:
        max_new_tokens: new tokens per row at most: an int, or one per row.
        temperature: softmax temperature (>= 0); 0 means greedy. Also the temperature of the
            returned ``logprobs``.
        top_k: keep the k most likely tokens (0: off, 1: greedy).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose mass reaches
            ``top_p``, in (0, 1] (1: off).
        min_p: keep tokens with probability >= ``min_p`` times the largest one, in [0, 1] (0: off).
        epsilon: epsilon-greedy exploration, in [0, 1]: mix the filtered distribution with a
            uniform one (0: off).
        repetition_penalty: Hugging Face's repetition penalty (> 0, 1: off); it sees the prompt and
            the generated tokens.
        presence_penalty: subtracted from the logit of every token already generated (vLLM /
            OpenAI; generated tokens only; 0: off).
        frequency_penalty: times its count, subtracted from the logit of every token already
            generated (generated tokens only; 0: off).
        stop_token_ids: tokens that end a row (kept as its last response token): one id or list for
            all rows, or a list per row. None: ``eos_token_id`` of the model's generation config,
            else of its config.
        pad_token_id: fills sequences after a row ends. None: the model's ``pad_token_id``
            (generation config, then config), else the first stop token, else 0.
        seed: sampling seed; None draws one from torch's default generator.
        request_ids: one id (int >= 0) per row keying its random stream together with ``seed`` (the
            same id, seed, prompt and settings draw the same tokens anywhere in a batch). None: the
            row's index.
        drop_finished: remove finished rows from the batch (their KV cache too).
        synchronize_timings: on CUDA, synchronize around each phase so ``timings`` measure device
            time.
    """

    max_new_tokens: int | Sequence[int] | torch.Tensor = 128
    """New tokens per row at most: an int, or one per row."""
    temperature: float | torch.Tensor = 1.0
    """0 means greedy. Also the temperature of the returned ``logprobs``."""
    top_k: int | torch.Tensor = 0
    top_p: float | torch.Tensor = 1.0
    min_p: float | torch.Tensor = 0.0
    epsilon: float | torch.Tensor = 0.0
    """Epsilon-greedy exploration: mix the filtered distribution with a uniform one."""
    repetition_penalty: float | torch.Tensor = 1.0
    """Penalties see the prompt and the generated tokens (Hugging Face's repetition penalty does;
    vLLM / OpenAI presence and frequency penalties count generated tokens only)."""
    presence_penalty: float | torch.Tensor = 0.0
    frequency_penalty: float | torch.Tensor = 0.0
    stop_token_ids: int | Sequence[int] | Sequence[Sequence[int]] | None = None
    """Tokens that end a row (kept as its last response token): one id or list for all rows, or a
    list per row. None: ``eos_token_id`` of the model's generation config (a checkpoint's
    generation_config.json: instruct models list their chat end tokens there), else of its config."""
    pad_token_id: int | None = None
    """Fills sequences after a row ends. None: the model's ``pad_token_id`` (generation config, then
    config), else the first stop token, else 0."""
    seed: int | None = None
    """Sampling seed; None draws one from torch's default generator (``torch.manual_seed``)."""
    request_ids: Sequence[int] | torch.Tensor | None = None
    """One id (int >= 0) per row keying its random stream together with ``seed``: a row with the
    same id, seed, prompt and settings draws the same tokens wherever it sits in a batch. None:
    the row's index (so the same prompt at another index draws other tokens)."""
    drop_finished: bool = True
    """Remove finished rows from the batch (their KV cache too) so they cost nothing more."""
    synchronize_timings: bool = False
    """On CUDA, synchronize around each phase so ``timings`` measure device time."""


@dataclass
class GenerationOutput:
    """Shapes: B rows, P prompt positions (as given, left-padded), L = max new tokens of the call.

    Args:
        sequences: ``[B, P + L]`` int64, prompt + response, ``pad_token_id`` after a row ends.
        attention_mask: ``[B, P + L]`` int64, 1 on prompt and response tokens.
        response_mask: ``[B, L]`` int64, 1 on generated tokens (the stop token included).
        logprobs: ``[B, L]`` fp32, ``log softmax(logits / T)`` of each generated token (T = 1 when
            greedy); 0 on pads.
        sampling_logprobs: ``[B, L]`` fp32, the token's log-prob under the processed distribution
            actually sampled from (penalties, top-k/p, min-p, epsilon applied); 0 on pads.
        response_lengths: ``[B]`` int64, generated tokens per row.
        stopped: ``[B]`` bool, the row ended with a stop token (else it hit ``max_new_tokens``).
        prompt_length: ``P``; ``sequences[:, P:]`` are the responses.
        timings: seconds spent in ``prefill``, ``decode`` and ``sample``, and ``tokens``, the number
            of tokens generated.
    """

    sequences: torch.Tensor  # [B, P + L] int64: prompt + response, pad_token_id after a row ends
    attention_mask: torch.Tensor  # [B, P + L] int64: 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, L] int64: 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor  # [B, L] fp32: log softmax(logits / T) of each token (T = 1 when greedy); 0 on pads
    sampling_logprobs: torch.Tensor  # [B, L] fp32: log-prob under the processed distribution actually sampled
    response_lengths: torch.Tensor  # [B] int64
    stopped: torch.Tensor  # [B] bool: ended by a stop token (else by max_new_tokens)
    prompt_length: int
    timings: dict = field(default_factory=dict)  # seconds: prefill, decode, sample; tokens generated

    @property
    def responses(self) -> torch.Tensor:
        """``[B, L]`` generated tokens (pads after each row's end)."""
        return self.sequences[:, self.prompt_length:]
