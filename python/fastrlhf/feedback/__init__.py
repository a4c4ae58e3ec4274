"""fastrlhf.feedback: where feedback comes from and how several signals become one reward.

* :class:`Judge`: the interface (score one completion, compare two); :class:`CallableJudge` for rules.
* :class:`PreferenceStore`: human judgments in an append-only JSONL file; the labelers
  (:func:`run_terminal_labeler`, :func:`serve_web_labeler`) write to it.
* :class:`SimulatedAnnotator`: a noisy simulated human with a hidden true preference
  (:func:`friendly_concise` for the demo).
* :class:`CompositeFeedback`: several judges as one reward (running normalization, clipping,
  repeats, agreement statistics).
* ``judges``: rules, reward model, VADER, MiniLM similarity, LLM judge.
* :func:`win_rate`, :func:`agreement`, :func:`rate_estimate` (``evaluation``): rates against a
  judge or the hidden truth, with cluster-bootstrap confidence intervals (:class:`Estimate`).
"""

from fastrlhf.feedback.base import CallableJudge, Judge
from fastrlhf.feedback.composite import CompositeFeedback
from fastrlhf.feedback.evaluation import Estimate, agreement, rate_estimate, win_rate
from fastrlhf.feedback.judges import (
    EmbeddingJudge,
    ExactAnswerJudge,
    FormatJudge,
    LengthJudge,
    LLMJudge,
    RewardModelJudge,
    VaderJudge,
)
from fastrlhf.feedback.labeler import LabelQueue, WebLabeler, load_items, run_terminal_labeler, serve_web_labeler
from fastrlhf.feedback.simulated import SimulatedAnnotator, friendly_concise
from fastrlhf.feedback.store import PreferenceStore

__all__ = ["Judge", "CallableJudge", "PreferenceStore", "LabelQueue", "load_items", "run_terminal_labeler",
           "WebLabeler", "serve_web_labeler", "SimulatedAnnotator", "friendly_concise", "CompositeFeedback",
           "ExactAnswerJudge", "LengthJudge", "FormatJudge", "RewardModelJudge", "VaderJudge", "EmbeddingJudge",
           "LLMJudge", "Estimate", "rate_estimate", "win_rate", "agreement"]
