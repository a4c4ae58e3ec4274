"""fastrlhf.feedback: where feedback comes from and how several signals become one reward.

* :class:`Judge`: the interface (score one completion, compare two); :class:`CallableJudge` for rules.
"""

from fastrlhf.feedback.base import CallableJudge, Judge

__all__ = ["Judge", "CallableJudge"]
