"""Rollouts for PPO / GRPO / online DPO: prompts -> completions sampled from the policy's own
weights (in process, no weight copy) -> scores from a judge -> reference log-probs.

The log-probs recorded at sampling time are those of ``softmax(logits / T)`` computed by the same
kernels a training forward runs, so on the first epoch over fresh rollouts the importance ratio is
1 up to numerical noise; :func:`logprob_gap` measures that gap every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastrlhf.data import encode_prompt, pad
from fastrlhf.feedback import Judge
from fastrlhf.generation import GenerationConfig, generate
from fastrlhf.models import lora_disabled


@dataclass
class Rollout:
    """One batch of sampled completions. Shapes: B rows (prompts x group size, each prompt's
    samples consecutive), P prompt positions (left-padded), L = max new tokens."""

    prompts: list  # [B] prompts as given (strings or conversations)
    completions: list[str]  # [B] decoded responses (special tokens removed)
    sequences: torch.Tensor  # [B, P + L] prompt + response token ids
    attention_mask: torch.Tensor  # [B, P + L]
    response_mask: torch.Tensor  # [B, L] 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor  # [B, L] fp32 log softmax(logits / T) of each token at sampling time
    stopped: torch.Tensor  # [B] bool: ended by a stop token (not by the length limit)
    prompt_length: int
    scores: torch.Tensor | None = None  # [B] fp32 from the judge
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # per-signal scores [B] (composite feedback)
    ref_logprobs: torch.Tensor | None = None  # [B, L] under the reference policy
    group_size: int = 1
    timings: dict = field(default_factory=dict)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (e.g. the groups dynamic sampling keeps)."""
        idx = rows.tolist()
        t = lambda x: None if x is None else x[rows]  # noqa: E731
        return Rollout([self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.sequences[rows],
                       self.attention_mask[rows], self.response_mask[rows], self.logprobs[rows], self.stopped[rows],
                       self.prompt_length, t(self.scores), {k: v[rows] for k, v in self.signals.items()},
                       t(self.ref_logprobs), self.group_size, dict(self.timings))


def stop_token_ids(policy, tokenizer) -> list[int] | None:
    """The ids that end a completion: the model's EOS (its generation config, else its config), the
    tokenizer's EOS and, for ChatML tokenizers, ``<|im_end|>``."""
    ids = []
    gen = getattr(policy, "generation_config", None) or {}
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        eos = getattr(policy.config, "eos_token_id", None)
    for e in [eos] if isinstance(eos, int) else (eos or []):
        ids.append(int(e))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.token_to_id("<|im_end|>") if hasattr(tokenizer, "token_to_id") else None
    if im_end is not None:
        ids.append(im_end)
    return sorted(set(ids)) or None


def encode_prompts(tokenizer, prompts: Sequence, *, max_prompt_length: int | None = None):
    """Prompts -> left-padded ``(input_ids [B, P], attention_mask [B, P])`` (conversations through the
    chat template; long prompts keep their end)."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad(ids, pad_id, side="left", max_length=max_prompt_length)


def sample(policy, tokenizer, prompts: Sequence, config: GenerationConfig, *, group_size: int = 1,
           max_prompt_length: int | None = None) -> Rollout:
    """Sample ``group_size`` completions of every prompt from ``policy`` (eval mode, no grad).

    Args:
        policy: a :class:`~fastrlhf.models.CausalLM`.
        tokenizer: its tokenizer.
        prompts: the prompts (strings or conversations).
        config: sampling settings (``stop_token_ids`` default to the model's / tokenizer's EOS).
        group_size: completions per prompt (consecutive rows).
        max_prompt_length: truncate prompts to their last tokens.
    """
    rep = [p for p in prompts for _ in range(group_size)]
    ids, mask = encode_prompts(tokenizer, rep, max_prompt_length=max_prompt_length)
    was_training = policy.training
    policy.eval()
    try:
        out = generate(policy, ids, mask, config)
    finally:
        policy.train(was_training)
    P = out.prompt_length
    completions = [tokenizer.decode(out.responses[i, : int(n)]) for i, n in enumerate(out.response_lengths)]
    return Rollout(rep, completions, out.sequences, out.attention_mask, out.response_mask, out.logprobs,
                   out.stopped, P, group_size=group_size, timings=dict(out.timings))


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, *, temperature: float, micro_batch_size: int = 16,
                      return_entropy: bool = False):
    """``[B, L]`` log-probs (and entropies) of the response tokens under ``model`` (a training
    forward in eval mode), in micro-batches."""
    P = rollout.prompt_length
    lps, ents = [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, rollout.sequences.shape[0], micro_batch_size):
            sl = slice(i, i + micro_batch_size)
            # the LM head scores only the response: position P - 1 + t predicts response token t
            out = model.token_logprobs(rollout.sequences[sl], rollout.attention_mask[sl], temperature=temperature,
                                       return_entropy=return_entropy, start=P - 1)
            lp, ent = out if return_entropy else (out, None)
            lps.append(lp)
            if ent is not None:
                ents.append(ent)
    finally:
        model.train(was_training)
    lp = torch.cat(lps) * rollout.response_mask
    return (lp, torch.cat(ents) * rollout.response_mask) if return_entropy else lp


def reference_logprobs(policy, reference, rollout: Rollout, *, temperature: float,
                       micro_batch_size: int = 16) -> torch.Tensor:
    """``[B, L]`` response log-probs under the reference policy: ``reference`` when given (a frozen
    copy), else ``policy`` with its LoRA adapters disabled (no second copy of the weights)."""
    if reference is not None:
        return response_logprobs(reference, rollout, temperature=temperature, micro_batch_size=micro_batch_size)
    with lora_disabled(policy):
        return response_logprobs(policy, rollout, temperature=temperature, micro_batch_size=micro_batch_size)


def score(judge: Judge, rollout: Rollout, *, missing_eos_penalty: float | None = None) -> Rollout:
    """Fill ``rollout.scores`` (and ``signals`` for a composite judge) from ``judge``; rows that
    hit the length limit without a stop token get ``missing_eos_penalty`` added."""
    if hasattr(judge, "score_signals"):
        scores, signals = judge.score_signals(rollout.prompts, rollout.completions)
    else:
        scores = judge.score(rollout.prompts, rollout.completions)
        signals = {getattr(judge, "name", "judge"): scores}
    scores = scores.float().to(rollout.sequences.device).clone()
    if missing_eos_penalty is not None:
        scores = scores + missing_eos_penalty * (~rollout.stopped.to(scores.device)).float()
    rollout.scores, rollout.signals = scores, {k: v.float() for k, v in signals.items()}
    return rollout


def logprob_gap(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """max |log-prob(train) - log-prob(rollout)| over valid response tokens."""
    d = ((train_logprobs.detach().float() - rollout_logprobs.float()).abs() * mask).max()
    return float(d) if mask.any() else 0.0
