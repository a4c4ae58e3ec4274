"""A simulated human annotator with a hidden true preference, for experiments without people.

:class:`SimulatedAnnotator` answers "which of two completions is better?" like a (noisy) human: the
better one under a hidden utility, with Bradley-Terry noise and random flips on top. Trainers and
reward models should learn from its :meth:`~SimulatedAnnotator.compare` labels, the human-like
signal; its :meth:`~SimulatedAnnotator.score` reveals the hidden utility itself and is meant for
evaluation only (how much true utility did training gain?).

:func:`friendly_concise` is a ready hidden utility for the demo tasks: friendly wording, minus a
penalty for length past a target.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Sequence

import torch

from fastrlhf.feedback.base import Judge
from fastrlhf.feedback.judges._common import check_lengths

# ---- the demo's hidden preference: friendly and concise ------------------------------------

FRIENDLY_WORDS = frozenset("""
please thanks thank welcome glad happy happily sure certainly absolutely gladly great good nice lovely wonderful
fantastic awesome excellent enjoy hope helpful help kind kindly appreciate delighted pleasure love fun cozy
congratulations cheers luck care warm friendly smile gentle sorry
""".split())
RUDE_WORDS = frozenset("""
stupid dumb idiot idiots idiotic shut whatever hate annoying ugh useless ridiculous pathetic lazy duh boring
hopeless bother bothering whining complaining nobody loser moron nonsense waste terrible awful
""".split())
_WORD = re.compile(r"[a-z']+")


def friendly_concise(prompt, completion: str, *, target_words: int = 30, length_weight: float = 0.5) -> float:
    """A hidden "true" utility: friendly wording, concise answers. Independent of VADER on purpose
    (a small hand-written lexicon), so that a VADER judge used as a training signal is a proxy of
    this truth, not the truth itself.

    ``utility = tanh((n_friendly - 2 * n_rude) / 2) - length_weight * max(words - target_words, 0) / target_words``

    where ``n_friendly`` / ``n_rude`` count the completion's words (lower-cased) in
    ``FRIENDLY_WORDS`` / ``RUDE_WORDS`` (one rude word outweighs two friendly ones) and ``words`` is
    its number of whitespace-separated words. An empty completion scores -1. Range: about [-1, 1]
    minus the length penalty (0.5 per extra ``target_words`` words by default).

    Args:
        prompt: ignored (the preference is about the answer's manner).
        completion: the answer.
        target_words: answers up to this many words are not penalized for length.
        length_weight: the penalty per ``target_words`` words beyond the target.
    """
    words = completion.split()
    if not words:
        return -1.0
    tokens = _WORD.findall(completion.lower())
    friendly = sum(t in FRIENDLY_WORDS for t in tokens)
    rude = sum(t in RUDE_WORDS for t in tokens)
    return math.tanh((friendly - 2 * rude) / 2) - length_weight * max(len(words) - target_words, 0) / target_words


friendly_concise.description = (  # what the demo reports as the hidden preference
    "friendly_concise: tanh((#friendly words - 2 * #rude words) / 2) from a small hand-written lexicon, "
    "minus 0.5 per target_words words beyond target_words words")


class SimulatedAnnotator(Judge):
    """A judge that labels pairs like a noisy human with a hidden true preference.

    :meth:`compare` returns hard labels ``[N]`` in {0, 1} (0.5 on exact ties of the utility):

    1. the truth: 1 when ``u(a) > u(b)``, 0 when ``u(a) < u(b)`` (``u`` the hidden utility);
    2. with ``bt_temperature = T > 0``, instead a draw: 1 with probability
       ``sigmoid((u(a) - u(b)) / T)`` (Bradley-Terry noise: close pairs are often mislabelled,
       clear ones rarely);
    3. then each label flips with probability ``flip_prob`` (inattentive clicks).

    Draws come from the annotator's own generator seeded with ``seed``: the same sequence of calls
    gives the same labels (:meth:`reset` starts the sequence over; :meth:`state_dict` /
    :meth:`load_state_dict` carry the position across a checkpoint). :meth:`score` returns the
    hidden utility for evaluation; train on :meth:`compare` labels.

    Args:
        true_preference: ``f(prompt, completion) -> float``, the hidden utility.
        flip_prob: probability in [0, 0.5] of flipping each label.
        bt_temperature: Bradley-Terry temperature (>= 0; 0: deterministic on the utility).
        seed: the generator's seed.
        name: the judge's name in metrics.
    """

    def __init__(self, true_preference: Callable, *, flip_prob: float = 0.0, bt_temperature: float = 0.0,
                 seed: int = 0, name: str | None = None):
        if not callable(true_preference):
            raise TypeError("SimulatedAnnotator: true_preference must be callable, "
                            f"got {type(true_preference).__name__}")
        if not 0.0 <= flip_prob <= 0.5:
            raise ValueError(f"SimulatedAnnotator: flip_prob must be in [0, 0.5], got {flip_prob}")
        if not bt_temperature >= 0.0 or math.isinf(bt_temperature):
            raise ValueError(f"SimulatedAnnotator: bt_temperature must be finite and >= 0, got {bt_temperature}")
        self.true_preference = true_preference
        self.flip_prob, self.bt_temperature, self.seed = float(flip_prob), float(bt_temperature), int(seed)
        self.name = name or f"simulated_{getattr(true_preference, '__name__', 'annotator')}"
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Restart the random sequence (from ``seed``, default the constructor's)."""
        if seed is not None:
            self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        """The seed and the generator's position (JSON-friendly), so a resumed run draws the same labels."""
        raw = self.generator.get_state().numpy().tobytes()
        return {"seed": self.seed, "generator": base64.b64encode(raw).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.seed = int(state["seed"])
        raw = bytearray(base64.b64decode(state["generator"]))
        self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def utility(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        """``[N]`` fp32 hidden utilities."""
        check_lengths(self.name, prompts, completions)
        return torch.tensor([float(self.true_preference(p, c)) for p, c in zip(prompts, completions)],
                            dtype=torch.float32)

    def score(self, prompts, completions) -> torch.Tensor:
        """``[N]`` the hidden true utility (for evaluation; not a human-like signal).

        Args:
            prompts: N prompts.
            completions: N answers.
        """
        return self.utility(prompts, completions)

    def compare(self, prompts, completions_a, completions_b) -> torch.Tensor:
        """``[N]`` labels in {0, 1} (0.5 on exact utility ties): 1 when the annotator picks ``a``.

        Args:
            prompts: N prompts.
            completions_a, completions_b: two answers to each.
        """
        check_lengths(self.name, prompts, completions_a, completions_b)
        return self._labels(self.utility(prompts, completions_a) - self.utility(prompts, completions_b))

    def _labels(self, d: torch.Tensor) -> torch.Tensor:
        """Utility differences ``[N]`` -> labels ``[N]`` (draws from the generator)."""
        n = d.numel()
        if self.bt_temperature > 0:
            p = torch.sigmoid(d.double() / self.bt_temperature)
            label = (torch.rand(n, generator=self.generator, dtype=torch.float64) < p).float()
        else:
            label = (d > 0).float()
        if self.flip_prob > 0:
            flip = torch.rand(n, generator=self.generator, dtype=torch.float64) < self.flip_prob
            label = torch.where(flip, 1.0 - label, label)
        return torch.where(d == 0, torch.full_like(label, 0.5), label)

    def agreement(self, prompts, completions_a, completions_b) -> float:
        """Fraction of pairs with a strict utility difference whose :meth:`compare` label matches
        the noiseless truth (about ``1 - flip_prob`` at ``bt_temperature = 0``); NaN when every
        pair is a tie. Draws from the annotator's generator like a :meth:`compare` call.

        Args:
            prompts: N prompts.
            completions_a, completions_b: two answers to each.
        """
        check_lengths(self.name, prompts, completions_a, completions_b)
        d = self.utility(prompts, completions_a) - self.utility(prompts, completions_b)
        labels = self._labels(d)
        strict = d != 0
        if not bool(strict.any()):
            return float("nan")
        return float((labels[strict] == (d[strict] > 0).float()).float().mean())
