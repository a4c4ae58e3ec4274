"""Rule judges: exact answers, length, format."""

from __future__ import annotations

import re

import pytest
import torch

from fastrlhf.feedback import CallableJudge, ExactAnswerJudge, FormatJudge, LengthJudge


def test_exact_answer_last_number_against_a_mapping():
    ref = {"What is 7 + 5?": 12, "What is 9 - 4?": "5", "Half of 5?": 2.5}
    j = ExactAnswerJudge(ref)
    assert isinstance(j, CallableJudge) and j.name == "exact_answer"
    prompts = ["What is 7 + 5?", "What is 7 + 5?", "What is 9 - 4?", "What is 9 - 4?", "Half of 5?", "What is 7 + 5?"]
    completions = ["7 + 5 = 12", "I think 12, no wait, 13", "The answer is 5.", "no idea", "2.50", "12.0!"]
    torch.testing.assert_close(j.score(prompts, completions), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]))


def test_exact_answer_conversation_key_callable_and_custom_extract():
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 * 3?"}]
    assert ExactAnswerJudge({"What is 2 * 3?": 6}).score([conv], ["six, i.e. 6"]).item() == 1.0
    assert ExactAnswerJudge(lambda p: 1000).score(["x"], ["1,000 apples"]).item() == 1.0
    j = ExactAnswerJudge({"Capital of France?": "Paris"}, extract=r"answer is (\w+)", correct=2.0, wrong=-1.0)
    torch.testing.assert_close(j.score(["Capital of France?"] * 3, ["The answer is paris", "The answer is Rome",
                                                                     "Paris"]), torch.tensor([2.0, -1.0, -1.0]))
    with pytest.raises(KeyError, match="no reference"):
        ExactAnswerJudge({}).score(["What?"], ["1"])
    with pytest.raises(TypeError, match="reference"):
        ExactAnswerJudge(12)


def test_exact_answer_compare_is_bradley_terry():
    j = ExactAnswerJudge({"q": 1})
    p = j.compare(["q", "q"], ["1", "2"], ["2", "1"])
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([1.0, -1.0])))


def test_length_judge_words_tokens_and_options():
    j = LengthJudge(4)
    torch.testing.assert_close(j.score(["p"] * 3, ["a b c d", "a b", "a b c d e f g h"]),
                               torch.tensor([0.0, -0.5, -1.0]))
    torch.testing.assert_close(LengthJudge(4, tolerance=1).score(["p"] * 2, ["a b c", "a"]), torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(LengthJudge(4, only_longer=True, scale=2).score(["p"] * 2, ["a", "a b c d e f"]),
                               torch.tensor([0.0, -1.0]))

    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return list(text)

    assert LengthJudge(3, unit="tokens", tokenizer=CharTokenizer()).score(["p"], ["abcdef"]).item() == -1.0
    for bad in (dict(target=-1), dict(target=3, unit="chars"), dict(target=3, unit="tokens"),
                dict(target=3, tolerance=-1), dict(target=3, scale=0)):
        with pytest.raises(ValueError, match="LengthJudge"):
            LengthJudge(**bad)


def test_format_judge():
    j = FormatJudge(r"<answer>.*</answer>", flags=re.DOTALL)
    torch.testing.assert_close(j.score(["p"] * 3, ["x <answer>4</answer>", "<answer>\n4\n</answer>", "4"]),
                               torch.tensor([1.0, 1.0, 0.0]))
    full = FormatJudge(r"\d+", full_match=True, match=1.0, no_match=-1.0)
    torch.testing.assert_close(full.score(["p"] * 2, [" 42 ", "42 apples"]), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="regular expression"):
        FormatJudge("(")
    with pytest.raises(ValueError, match="2 prompts but 1"):
        j.score(["a", "b"], ["c"])
