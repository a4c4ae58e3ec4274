"""Ready-made rule judges (:class:`~fastrlhf.feedback.CallableJudge` semantics: one Python function
per (prompt, completion), deterministic, cheap).

* :class:`ExactAnswerJudge`: verifiable answers (arithmetic, short facts): 1 when the answer
  extracted from the completion (by default its last number) equals the prompt's reference, else 0.
* :class:`LengthJudge`: ``-|length - target| / scale`` in words or tokens (0 at the target).
* :class:`FormatJudge`: 1 when a regular expression matches the completion, else 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Literal

from fastrlhf.feedback.base import CallableJudge
from fastrlhf.feedback.judges._common import lookup_reference

NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"  # 12, -3, 1,000, 2.5


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


class ExactAnswerJudge(CallableJudge):
    """1.0 when the completion's answer equals the prompt's reference, else 0.0.

    The answer is the last match of ``extract`` in the completion (its first group when the
    pattern has groups); answer and reference are compared as numbers when both parse as numbers
    (``"12.0"`` equals ``12``; thousands commas are ignored), else as stripped strings
    (case-insensitively unless ``case_sensitive``). A completion without a match scores ``wrong``.

    Args:
        reference: the correct answer per prompt: a mapping from the prompt (a string prompt itself,
            or a conversation's last user turn) to the answer, or a callable ``prompt -> answer``.
        extract: the regular expression of an answer (default: a number, optionally signed, with
            decimals or thousands commas).
        correct: the score of a correct answer.
        wrong: the score of a wrong or missing answer.
        case_sensitive: compare non-numeric answers case-sensitively.
        name: the judge's name in metrics.

    Raises:
        KeyError (when scoring): a mapping ``reference`` without an entry for a prompt.
    """

    def __init__(self, reference: Mapping | Callable, *, extract: str = NUMBER, correct: float = 1.0,
                 wrong: float = 0.0, case_sensitive: bool = False, name: str = "exact_answer"):
        if not (callable(reference) or isinstance(reference, Mapping)):
            raise TypeError("ExactAnswerJudge: reference must be a mapping or a callable, "
                            f"got {type(reference).__name__}")
        self.reference, self.pattern = reference, re.compile(extract)
        self.correct, self.wrong, self.case_sensitive = float(correct), float(wrong), case_sensitive
        super().__init__(self._score_one, name)

    def extract(self, completion: str) -> str | None:
        """The answer in ``completion``: the last match of the pattern (its first group if any), or None."""
        matches = list(self.pattern.finditer(completion))
        if not matches:
            return None
        m = matches[-1]
        return m.group(1) if m.re.groups else m.group(0)

    def _score_one(self, prompt, completion: str) -> float:
        ref = lookup_reference(self.name, self.reference, prompt)
        got = self.extract(completion)
        if got is None or ref is None:
            return self.wrong
        a, b = _as_number(got), _as_number(str(ref))
        if a is not None and b is not None:
            return self.correct if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) else self.wrong
        a, b = got.strip(), str(ref).strip()
        if not self.case_sensitive:
            a, b = a.lower(), b.lower()
        return self.correct if a == b else self.wrong


class LengthJudge(CallableJudge):
    """Penalizes distance from a target length: ``-max(|n - target| - tolerance, 0) / scale``
    (0 within ``tolerance`` of the target, more negative further away).

    Args:
        target: the wanted length (>= 0), in ``unit``\\ s.
        unit: ``"words"`` (whitespace-separated) or ``"tokens"`` (needs ``tokenizer``).
        tokenizer: anything with ``encode(text, add_special_tokens=False)`` (unit ``"tokens"``).
        tolerance: lengths this close to the target are not penalized (>= 0).
        scale: the distance that costs 1 (> 0); default ``max(target, 1)``.
        only_longer: penalize only completions longer than the target (conciseness).
        name: the judge's name in metrics.
    """

    def __init__(self, target: int, *, unit: Literal["words", "tokens"] = "words", tokenizer=None,
                 tolerance: float = 0.0, scale: float | None = None, only_longer: bool = False,
                 name: str = "length"):
        if target < 0:
            raise ValueError(f"LengthJudge: target must be >= 0, got {target}")
        if unit not in ("words", "tokens"):
            raise ValueError(f"LengthJudge: unit must be 'words' or 'tokens', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("LengthJudge: unit='tokens' needs a tokenizer")
        if tolerance < 0:
            raise ValueError(f"LengthJudge: tolerance must be >= 0, got {tolerance}")
        scale = float(max(target, 1)) if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"LengthJudge: scale must be > 0, got {scale}")
        self.target, self.unit, self.tokenizer = target, unit, tokenizer
        self.tolerance, self.scale, self.only_longer = float(tolerance), scale, only_longer
        super().__init__(self._score_one, name)

    def length(self, completion: str) -> int:
        """The completion's length in the judge's unit."""
        if self.unit == "words":
            return len(completion.split())
        return len(self.tokenizer.encode(completion, add_special_tokens=False))

    def _score_one(self, prompt, completion: str) -> float:
        d = self.length(completion) - self.target
        if self.only_longer:
            d = max(d, 0)
        return -max(abs(d) - self.tolerance, 0.0) / self.scale


class FormatJudge(CallableJudge):
    """``match`` when the regular expression ``pattern`` matches the completion, else ``no_match``.

    Args:
        pattern: a regular expression (string or compiled).
        full_match: the whole completion (stripped) must match; default: a match anywhere
            (``re.search``).
        flags: ``re`` flags for a string pattern (e.g. ``re.DOTALL``).
        match: the score of a match.
        no_match: the score otherwise.
        name: the judge's name in metrics.
    """

    def __init__(self, pattern, *, full_match: bool = False, flags: int = 0, match: float = 1.0,
                 no_match: float = 0.0, name: str = "format"):
        try:
            self.pattern = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        except (re.error, TypeError) as e:
            raise ValueError(f"FormatJudge: pattern {pattern!r} is not a valid regular expression ({e})") from None
        self.full_match, self.match, self.no_match = full_match, float(match), float(no_match)
        super().__init__(self._score_one, name)

    def _score_one(self, prompt, completion: str) -> float:
        found = self.pattern.fullmatch(completion.strip()) if self.full_match else self.pattern.search(completion)
        return self.match if found else self.no_match
