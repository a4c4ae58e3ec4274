"""Guardrail detectors on constructed runs, and the actions a trainer takes."""

from __future__ import annotations

import math

import pytest

from fastrlhf.trainers.guardrails import GuardrailConfig, Guardrails


def run(g, series):
    return [sorted(a.detector for a in g.check(m)) for m in series]


def test_kl_blowup():
    g = Guardrails(GuardrailConfig(kl_max=2.0))
    with pytest.warns(RuntimeWarning, match="kl_blowup"):
        out = run(g, [{"kl": 0.1}, {"kl": 1.0}, {"kl": 5.0}, {"kl": math.nan}])
    assert out == [[], [], ["kl_blowup"], ["kl_blowup"]]


def test_entropy_collapse():
    g = Guardrails(GuardrailConfig(entropy_min_ratio=0.2))
    with pytest.warns(RuntimeWarning, match="entropy_collapse"):
        out = run(g, [{"entropy": 3.0}, {"entropy": 1.0}, {"entropy": 0.5}])
    assert out == [[], [], ["entropy_collapse"]]


def test_reward_spike_after_warmup():
    g = Guardrails(GuardrailConfig(reward_z=4.0, warmup_steps=5))
    calm = [{"reward": 1.0 + 0.01 * (i % 3)} for i in range(8)]
    with pytest.warns(RuntimeWarning, match="reward_spike"):
        out = run(g, calm + [{"reward": 5.0}, {"reward": 1.01}])
    assert out[:8] == [[]] * 8 and out[8] == ["reward_spike"] and out[9] == []


def test_length_runaway_needs_patience():
    g = Guardrails(GuardrailConfig(length_max_ratio=0.9, length_patience=3), max_new_tokens=100)
    with pytest.warns(RuntimeWarning, match="length_runaway"):
        out = run(g, [{"response_length": 95}] * 4 + [{"response_length": 50}])
    assert out == [[], [], ["length_runaway"], ["length_runaway"], []]


def test_disabled_and_state_round_trip():
    assert run(Guardrails(GuardrailConfig(enabled=False)), [{"kl": 1e9}]) == [[]]
    g = Guardrails(GuardrailConfig(warmup_steps=2))
    run(g, [{"reward": 1.0}, {"reward": 2.0}, {"entropy": 1.0}])
    h = Guardrails(GuardrailConfig(warmup_steps=2))
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()


@pytest.mark.parametrize("action", ["stop", "raise_kl", "rollback"])
def test_trainer_actions(tmp_path, action):
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    from helpers.rl import TOY_PROMPTS, toy_judge, toy_policy, toy_tokenizer

    cfg = GRPOConfig(output_dir=str(tmp_path), max_steps=4, prompts_per_step=2, group_size=2, max_new_tokens=4,
                     progress=False, tensorboard=False, kl_coef=0.1, save_every=1,
                     guardrails=GuardrailConfig(length_max_ratio=0.01, length_patience=2, action=action))
    tr = GRPOTrainer(toy_policy(), toy_tokenizer(), TOY_PROMPTS, toy_judge(), cfg)
    with pytest.warns(RuntimeWarning, match="length_runaway"):
        tr.train()
    if action == "stop":
        assert tr.step == 2  # the detector fires at the second step
    elif action == "raise_kl":
        assert tr.kl.value == pytest.approx(0.1 * 2.0 ** 3)  # steps 2, 3, 4
    else:  # the condition persists: two rollbacks, then the run stops
        assert tr.rollbacks == 2 and tr.step < 4
