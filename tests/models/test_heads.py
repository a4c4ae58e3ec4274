"""Value and reward heads on the trunk."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.models import PolicyWithValue, RewardModel, ValueModel, last_token_index

from helpers.models import left_padded, tiny_model


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 2, 3, 0]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_reward_reads_last_valid_token(padding):
    lm = tiny_model()
    rm = RewardModel.from_causal_lm(lm).eval()
    lengths = [6, 3, 1]
    ids, mask = left_padded(3, 6, 97, lengths)
    if padding == "right":
        ids = torch.stack([torch.roll(r, -(6 - n)) for r, n in zip(ids, lengths)])
        mask = torch.stack([torch.roll(r, -(6 - n)) for r, n in zip(mask, lengths)])
    with torch.no_grad():
        scores, values = rm(ids, mask, return_values=True)
        assert scores.shape == (3,) and values.shape == (3, 6) and scores.dtype == torch.float32
        for b in range(len(lengths)):
            alone = rm(ids[b, mask[b].bool()][None])  # unpadded: reads its last position
            torch.testing.assert_close(scores[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_value_model_copies_the_trunk():
    lm = tiny_model()
    vm = ValueModel.from_causal_lm(lm)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(vm.model.state_dict()[k], v)
    assert vm.model.embed_tokens.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("shared", [True, False])
def test_policy_with_value_forward_backward_and_round_trip(tmp_path, shared):
    lm = tiny_model()
    pv = PolicyWithValue(lm) if shared else PolicyWithValue.with_separate_critic(lm)
    assert pv.shared_trunk == shared
    ids, mask = left_padded(2, 7, 97, [7, 4])
    hidden, values = pv(ids, mask, return_hidden=True)
    assert hidden.shape == (2, 7, 64) and values.shape == (2, 7)
    logits, _ = pv(ids, mask)
    assert logits.shape == (2, 7, 97)
    (values.sum() + logits.mean()).backward()
    head = pv.value_head.proj.weight if shared else pv.value_model.score.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    pv.save_pretrained(tmp_path)
    again = PolicyWithValue.from_pretrained(tmp_path)
    assert again.shared_trunk == shared
    with torch.no_grad():
        a, va = pv(ids, mask)
        b, vb = again(ids, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_reward_model_rejects_multi_label_checkpoint(tmp_path):
    rm = RewardModel(tiny_model().config)
    rm.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_labels"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_labels = 1"):
        RewardModel.from_pretrained(tmp_path)


def test_reward_model_on_the_first_layers_of_a_trunk():
    lm = tiny_model(num_hidden_layers=3)
    rm = RewardModel.from_causal_lm(lm, num_layers=2)
    assert rm.config.num_hidden_layers == 2 and lm.config.num_hidden_layers == 3
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        want = lm.model.norm(_first_layers(lm, ids, 2))
        torch.testing.assert_close(rm.model(ids), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_layers must be in"):
        RewardModel.from_causal_lm(lm, num_layers=4)


def _first_layers(lm, ids, n):
    """The trunk's residual stream after its first n layers (run layer by layer)."""
    from fastrlhf.models._layout import attention_layout
    from fastrlhf.models.llama import rope_cos_sin

    layout, pos = attention_layout(ids, None, None, None, None, max_positions=lm.config.max_position_embeddings)
    x = lm.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(lm.model.inv_freq, pos, x.dtype)
    for layer in lm.model.layers[:n]:
        x = layer(x, cos[:, None], sin[:, None], layout)
    return x
