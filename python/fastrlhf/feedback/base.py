"""What every source of feedback provides: the :class:`Judge` interface.

A judge scores (prompt, completion) pairs, and compares two completions of the same prompt.
Prompts are strings or conversations (lists of ``{"role", "content"}`` messages); completions
are strings. Scores are ``[N]`` float tensors (higher is better); a comparison is ``[N]``
probabilities that the first completion is the better one.

Judges that naturally score (a reward model, a rule, a sentiment lexicon) implement
:meth:`Judge.score` and get :meth:`Judge.compare` as a Bradley-Terry comparison of the scores;
judges that naturally compare (an LLM asked "which is better?", a human) implement
:meth:`Judge.compare`, and may implement :meth:`Judge.score` when they can rate one answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Prompt = Any  # str, or a conversation: list[dict] with "role" and "content"


class Judge:
    """Base of every judge. Subclasses override :meth:`score` and / or :meth:`compare`.

    Attributes:
        name: how the judge appears in metrics (``reward/<name>``) and reports.
    """

    name: str = "judge"

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """Scores ``[N]`` (float32, CPU) of ``completions[i]`` as an answer to ``prompts[i]``.

        Args:
            prompts: N prompts (strings or conversations).
            completions: N answers.
        """
        raise NotImplementedError(f"{type(self).__name__} compares completions but does not score single ones")

    def compare(self, prompts: Sequence[Prompt], completions_a: Sequence[str],
                completions_b: Sequence[str]) -> torch.Tensor:
        """``[N]`` probabilities (float32) that ``completions_a[i]`` is better than ``completions_b[i]``
        as an answer to ``prompts[i]``; 0.5 is a tie. The default compares :meth:`score`\\ s by
        Bradley-Terry: ``sigmoid(score_a - score_b)``.

        Args:
            prompts: N prompts.
            completions_a, completions_b: two answers to each.
        """
        _check_lengths(prompts, completions_a, completions_b)
        a, b = score_pairs(self.score, prompts, completions_a, completions_b)
        return torch.sigmoid(a.float() - b.float())


def distinct_answers(prompts: Sequence[Prompt], completions_a: Sequence[str],
                     completions_b: Sequence[str]) -> tuple[list, list[str], torch.Tensor]:
    """The distinct (prompt, answer) pairs among both sides of ``N`` pairs: ``(prompts [U],
    answers [U], index [2N])``, where ``index[i]`` (``index[N + i]``) is the distinct entry of
    ``completions_a[i]`` (``completions_b[i]``). Pairs drawn from K answers a prompt (every pair
    of them, as InstructGPT's K-way comparisons) share answers: a judge scores each one once."""
    seen: dict = {}
    unique_prompts, unique_answers, index = [], [], []
    for p, c in zip([*prompts, *prompts], [*completions_a, *completions_b]):
        key = (repr(p), c)
        if key not in seen:
            seen[key] = len(seen)
            unique_prompts.append(p)
            unique_answers.append(c)
        index.append(seen[key])
    return unique_prompts, unique_answers, torch.tensor(index, dtype=torch.long)


def score_pairs(score, prompts: Sequence[Prompt], completions_a: Sequence[str],
                completions_b: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores of completions_a [N], scores of completions_b [N])`` from ``score(prompts,
    completions)``, called once on the distinct answers (:func:`distinct_answers`)."""
    unique_prompts, unique_answers, index = distinct_answers(prompts, completions_a, completions_b)
    scores = score(unique_prompts, unique_answers)[index]  # [2N]
    return scores[: len(prompts)], scores[len(prompts):]


def _check_lengths(prompts, *others) -> None:
    n = len(prompts)
    for o in others:
        if len(o) != n:
            raise ValueError(f"judge: got {n} prompts but {len(o)} completions")


class CallableJudge(Judge):
    """Any Python function as a judge (rules: verifiable answers, length, format).

    Args:
        fn: ``fn(prompt, completion) -> float``, or with ``batched=True``
            ``fn(prompts, completions) -> sequence of floats``.
        name: the judge's name in metrics.
        batched: whether ``fn`` takes whole lists.
    """

    def __init__(self, fn, name: str | None = None, *, batched: bool = False):
        if not callable(fn):
            raise TypeError(f"CallableJudge: fn must be callable, got {type(fn).__name__}")
        self.fn, self.batched = fn, batched
        self.name = name or getattr(fn, "__name__", "rule")

    def score(self, prompts, completions) -> torch.Tensor:
        _check_lengths(prompts, completions)
        if self.batched:
            values = list(self.fn(list(prompts), list(completions)))
        else:
            values = [self.fn(p, c) for p, c in zip(prompts, completions)]
        if len(values) != len(prompts):
            raise ValueError(f"{self.name}: returned {len(values)} scores for {len(prompts)} completions")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
