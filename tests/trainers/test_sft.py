"""SFTTrainer: the loss goes down on a tiny problem, packing gives the same loss as padding (no
cross-contamination), micro-batches give the full-batch gradient, config errors name the field."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.config import ConfigError
from fastrlhf.data import load_rows
from fastrlhf.models import CausalLM
from fastrlhf.trainers import SFTConfig, SFTTrainer
from fastrlhf.trainers.metrics import read_metrics

from helpers.rl import toy_policy, toy_tokenizer

ROWS = [{"prompt": f"{a} ", "completion": f"abc {a}"} for a in ("x", "y", "z", "b", "xyz", "ab")] * 3


def make(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=3, learning_rate=3e-3, batch_size=6, progress=False,
                tensorboard=False, micro_batch_size=6, seed=1)
    base.update(kw)
    return SFTTrainer(toy_policy(), toy_tokenizer(), ROWS, SFTConfig(**base))


def test_sft_loss_goes_down(tmp_path):
    tr = make(tmp_path, max_steps=25)
    tr.train()
    losses = [m["loss"] for m in read_metrics(tr.run_dir)]
    assert losses[-1] < 0.5 * losses[0], losses


def grads_of_one_step(tr):
    torch.manual_seed(0)
    seqs, masks, n = tr._batch_targets(list(range(6)))
    tr.sampler.next = lambda: list(range(6))  # the same batch for every trainer
    params = [p for p in tr.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    tr.optimizer_step = lambda: {}  # keep the gradients, skip the update
    out = tr.train_step()
    grads = [p.grad.detach().clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, (p.detach() for p in params)))
    return out["loss"], grads


@pytest.mark.parametrize("packing", [False, True])
def test_micro_batches_and_packing_give_the_full_batch_gradient(tmp_path, packing):
    loss_full, g_full = grads_of_one_step(make(tmp_path / "a", micro_batch_size=6))
    loss_micro, g_micro = grads_of_one_step(make(tmp_path / "b", micro_batch_size=2, packing=packing,
                                                 pack_tokens=16))
    assert loss_micro == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(g_full, g_micro):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_text_rows_and_completion_only_off(tmp_path):
    rows = load_rows([{"text": "abc abd " * 3}] * 4)
    tr = SFTTrainer(toy_policy(), toy_tokenizer(), rows, SFTConfig(output_dir=str(tmp_path), max_steps=2,
                                                                   batch_size=4, progress=False, tensorboard=False))
    out = tr.train()
    assert out["target_tokens"] > 0 and out["loss"] > 0


def test_bad_data_and_config_are_named(tmp_path):
    with pytest.raises(ConfigError, match="text or prompt_completion rows"):
        SFTTrainer(toy_policy(), toy_tokenizer(), [{"prompt": "x"}], SFTConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"SFTConfig.batch_size: must be >= 1"):
        SFTConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"SFTConfig.lr_schedule: must be one of"):
        SFTConfig(lr_schedule="exp")


def test_the_trainer_saves_the_final_model_unless_told_not_to(tmp_path):
    tr = make(tmp_path, max_steps=1)
    tr.train()
    saved = CausalLM.from_pretrained(tmp_path / "sft" / "model")  # a Hugging Face directory with the tokenizer
    assert (tmp_path / "sft" / "model" / "tokenizer.json").exists()
    for k, v in tr.model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    off = make(tmp_path / "off", max_steps=1, save_model=False)
    off.train()
    assert not (tmp_path / "off" / "sft" / "model").exists() and (tmp_path / "off" / "sft" / "checkpoints").exists()
