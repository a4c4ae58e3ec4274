"""LLMJudge with the real SmolLM2-135M-Instruct (slow: loads the model, about 1 s from the cache
and 20-60 s for the first conversion; each test runs a few forwards on 2 CPU cores).

What is asserted is what was measured to hold (development set of 40 random arithmetic questions,
seed 1; held-out set, seed 2; see the report of the change that added the judges):

* likelihood mode (the default) ranks the correct answer first on about 85-90% of random
  arithmetic pairs; on the six fixed questions below (chosen before the judge was run on them) it
  prefers the correct answer in both orders;
* compare mode, zero-shot, always picks "A" in a single order (the letter bias); few-shot examples
  remove most of that bias, but the order-averaged signal stays near chance on arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from fastrlhf.feedback import LLMJudge
from fastrlhf.models import load_smollm2

pytestmark = pytest.mark.slow

# fixed before running any judge on them; "a op b = value" answers
FIXED = [("What is 4 + 7?", "4 + 7", 11, 12), ("What is 15 - 6?", "15 - 6", 9, 8), ("What is 6 * 3?", "6 * 3", 18, 16),
         ("What is 20 + 13?", "20 + 13", 33, 43), ("What is 9 * 5?", "9 * 5", 45, 54),
         ("What is 30 - 12?", "30 - 12", 18, 22)]
PROMPTS = [q for q, *_ in FIXED]
RIGHT = [f"{e} = {r}" for _, e, r, _ in FIXED]
WRONG = [f"{e} = {w}" for _, e, _, w in FIXED]


@pytest.fixture(scope="module")
def smol():
    try:
        return load_smollm2()
    except ImportError as e:
        pytest.skip(str(e))


def test_likelihood_judge_prefers_the_correct_answer_in_both_orders(smol):
    judge = LLMJudge(*smol)  # the default: likelihood mode
    assert judge.mode == "likelihood"
    right_first = judge.compare(PROMPTS, RIGHT, WRONG)
    wrong_first = judge.compare(PROMPTS, WRONG, RIGHT)
    assert bool((right_first > 0.5).all()), right_first
    assert bool((wrong_first < 0.5).all()), wrong_first
    torch.testing.assert_close(right_first, 1 - wrong_first, atol=1e-5, rtol=0)


def test_compare_mode_letter_bias_and_few_shot(smol):
    zero = LLMJudge(*smol, mode="compare", shots=(), system=None)
    s, bias = zero.compare_logodds(PROMPTS, RIGHT, WRONG)
    assert bool((bias > 0.5).all())  # leans to "A" ...
    assert bool((bias.abs() > s.abs()).all())  # ... more than the answers move it: single orders always say "A"
    few = LLMJudge(*smol, mode="compare")  # default: four solved examples, letters balanced
    few.compare(PROMPTS, RIGHT, WRONG)
    assert few.last_stats["choice_mass"] > 0.8  # the letters are what it answers now
    assert abs(few.last_stats["letter_bias"]) < abs(float(bias.mean()))


def test_rate_mode_returns_expected_ratings(smol):
    judge = LLMJudge(*smol, mode="rate")
    s = judge.score(PROMPTS, RIGHT)
    assert bool(((s >= 1) & (s <= 5)).all())
    assert judge.last_stats["choice_mass"] > 0.5  # after the solved examples it answers with a digit


def test_default_constructor_loads_smollm2():
    try:
        judge = LLMJudge()
    except ImportError as e:
        pytest.skip(str(e))
    assert judge.model.config.vocab_size == 49152 and judge.tokenizer.eos_token_id == 2
