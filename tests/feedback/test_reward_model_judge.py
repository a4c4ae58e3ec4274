"""RewardModelJudge against direct RewardModel calls: padding, chat template, normalization."""

from __future__ import annotations

import pytest
import torch
from judge_fixtures import tiny_lm, tiny_tokenizer

from fastrlhf.data import encode_pair
from fastrlhf.feedback import RewardModelJudge
from fastrlhf.models import RewardModel

PROMPTS = ["What is 2 + 3?", [{"role": "user", "content": "Say hello."}], "Hi"]
COMPLETIONS = ["5", "Hello there, friend!", "Hello, how are you? I am fine."]


def reward_model(seed=0) -> RewardModel:
    torch.manual_seed(seed)
    rm = RewardModel(tiny_lm().config).eval()
    with torch.no_grad():
        rm.score.weight.normal_(std=1.0)  # scores of order 1
    return rm


def direct(rm, tok, prompt, completion, max_length=None) -> float:
    p, c = encode_pair(tok, prompt, completion)
    ids = (p + c)[-max_length:] if max_length else p + c
    with torch.no_grad():
        return float(rm(torch.tensor([ids])))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_scores_match_direct_calls(padding_side):
    tok, rm = tiny_tokenizer(), reward_model()
    j = RewardModelJudge(rm, tok, batch_size=2, padding_side=padding_side)
    expected = torch.tensor([direct(rm, tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(j.score(PROMPTS, COMPLETIONS), expected, atol=1e-4, rtol=1e-4)
    # the conversation went through the chat template
    assert "<|im_start|>assistant" in tok.decode(j.encode(PROMPTS[1], COMPLETIONS[1]), skip_special_tokens=False)


def test_chat_option_and_truncation_keep_the_end():
    tok, rm = tiny_tokenizer(), reward_model(1)
    conv = [{"role": "user", "content": PROMPTS[0]}]
    chat = RewardModelJudge(rm, tok, chat=True).score(PROMPTS[:1], COMPLETIONS[:1])
    assert chat.item() == pytest.approx(direct(rm, tok, conv, COMPLETIONS[0]), abs=1e-4)
    short = RewardModelJudge(rm, tok, max_length=6).score(PROMPTS, COMPLETIONS)
    expected = torch.tensor([direct(rm, tok, p, c, max_length=6) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(short, expected, atol=1e-4, rtol=1e-4)


def test_stored_normalization_is_applied():
    tok, rm = tiny_tokenizer(), reward_model(2)
    raw = RewardModelJudge(rm, tok, normalize=False).score(PROMPTS, COMPLETIONS)
    rm.config.extra.update(score_mean=0.5, score_std=2.0)  # saved in config.json with the model
    torch.testing.assert_close(RewardModelJudge(rm, tok).score(PROMPTS, COMPLETIONS), (raw - 0.5) / 2.0)
    rm.score_mean, rm.score_std = -1.0, 4.0  # attributes win over config.extra
    torch.testing.assert_close(RewardModelJudge(rm, tok).score(PROMPTS, COMPLETIONS), (raw + 1.0) / 4.0)
    torch.testing.assert_close(RewardModelJudge(rm, tok, normalize=False).score(PROMPTS, COMPLETIONS), raw)
    rm.score_std = 0.0
    with pytest.raises(ValueError, match="score_std"):
        RewardModelJudge(rm, tok)


def test_compare_and_argument_errors():
    tok, rm = tiny_tokenizer(), reward_model(3)
    j = RewardModelJudge(rm, tok)
    s = j.score(PROMPTS, COMPLETIONS)
    p = j.compare(PROMPTS, COMPLETIONS, COMPLETIONS[::-1])
    torch.testing.assert_close(p, torch.sigmoid(s - j.score(PROMPTS, COMPLETIONS[::-1])))
    assert j.score([], []).shape == (0,)
    for kw, match in ((dict(batch_size=0), "batch_size"), (dict(max_length=0), "max_length"),
                      (dict(padding_side="middle"), "padding_side")):
        with pytest.raises(ValueError, match=match):
            RewardModelJudge(rm, tok, **kw)
    with pytest.raises(ValueError, match="3 prompts but 2"):
        j.score(PROMPTS, COMPLETIONS[:2])
