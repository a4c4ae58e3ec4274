"""VaderJudge: VADER compound sentiment as a reward."""

from __future__ import annotations

import builtins

import pytest

from fastrlhf.feedback import VaderJudge

pytest.importorskip("vaderSentiment")


def test_positive_beats_negative_and_neutral_is_zero():
    j = VaderJudge()
    texts = ["I love this, it's wonderful!", "This is terrible and I hate it.", "The meeting is at 3pm."]
    s = j.score(["p"] * 3, texts)
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0
    assert bool(((s >= -1) & (s <= 1)).all())
    assert j.compare(["p"], ["Thanks, happy to help!"], ["Go away, you idiot."]).item() > 0.5
    # the lexicon's known pitfall for advice: "avoid" is negative
    assert j.score(["p"], ["Avoid screens before bed."]).item() < 0


def test_fields_and_errors(monkeypatch):
    pos = VaderJudge("pos").score(["p"], ["Great job!"]).item()
    neg = VaderJudge("neg").score(["p"], ["Awful."]).item()
    assert 0 < pos <= 1 and -1 <= neg < 0
    with pytest.raises(ValueError, match="field"):
        VaderJudge("sentiment")
    real_import = builtins.__import__

    def no_vader(name, *args, **kw):
        if name.startswith("vaderSentiment"):
            raise ImportError("no vader")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_vader)
    with pytest.raises(ImportError, match="vaderSentiment"):
        VaderJudge()
