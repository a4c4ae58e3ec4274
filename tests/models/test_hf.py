"""Hugging Face interop: logits match transformers' own models to fp32 tolerance in both
directions, and checkpoint directories move between the two libraries (no network: configs are
built locally)."""

from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.models import CausalLM, RewardModel

from helpers.models import left_padded

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
VARIANTS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama-tied-bias-mha": lambda: transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 4},
                                                            tie_word_embeddings=True, attention_bias=True,
                                                            mlp_bias=True),
    "llama3-rope": lambda: transformers.LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
}


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(VARIANTS[name]()).eval()


def compare(a, b, mask):
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_hf_and_back_match_logits(name):
    hf = hf_model(name)
    ours = CausalLM.from_hf(hf).eval()
    assert ours.config.model_type == hf.config.model_type
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids, mask = left_padded(3, 13, 211, [13, 7, 2])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        compare(ours(ids, mask), ref, mask)
        back = ours.to_hf()
        assert type(back) is type(hf)
        compare(back(input_ids=ids, attention_mask=mask).logits, ref, mask)


def test_from_hf_copies_the_weights():
    """A policy and a reference model built from one HF model must not share storage."""
    hf = hf_model("llama")
    a, b = CausalLM.from_hf(hf), CausalLM.from_hf(hf)
    with torch.no_grad():
        a.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(b.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)
    back = a.to_hf()
    with torch.no_grad():
        back.lm_head.weight.add_(1.0)
    assert not torch.equal(back.lm_head.weight, a.lm_head.weight)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_checkpoint_directories_move_both_ways(tmp_path, name):
    hf = hf_model(name, seed=3)
    ids, mask = left_padded(2, 9, 211, [9, 4])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    hf.save_pretrained(tmp_path / "hf")  # transformers writes safetensors
    ours = CausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        compare(ours(ids, mask), ref, mask)
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == name and cfg["architectures"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        compare(again(input_ids=ids, attention_mask=mask).logits, ref, mask)
    assert CausalLM.from_hf(str(tmp_path / "ours")).config == ours.config


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("llama", seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = CausalLM.from_pretrained(tmp_path)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    CausalLM.from_hf(hf_model("llama")).save_pretrained(tmp_path, dtype=torch.bfloat16)
    m = CausalLM.from_pretrained(tmp_path)
    assert m.dtype == torch.bfloat16
    assert CausalLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_unsupported_and_pickle_only_raise(tmp_path):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    (tmp_path / "config.json").write_text(json.dumps(gpt2.to_dict()))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        CausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(VARIANTS["llama"]().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="safetensors only"):
        CausalLM.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="transformers model or a local directory"):
        CausalLM.from_hf(object())


def test_reward_model_loads_in_transformers_sequence_classification(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(CausalLM.from_hf(hf_model("llama")).config).eval()
    rm.save_pretrained(tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 211, (3, 8))  # no padding: both read the last position
    with torch.no_grad():
        torch.testing.assert_close(rm(ids), hf(input_ids=ids).logits[:, 0], rtol=1e-5, atol=1e-5)
    again = RewardModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), rm(ids), rtol=0, atol=0)
