"""LoRA adapters: only adapters train, a fresh adapter is a no-op, merging is exact, adapters
save and load alone (PEFT's layout), and save_pretrained writes merged weights."""

from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.models import CausalLM, LoRALinear, apply_lora, load_lora, merge_lora, save_lora

from helpers.models import left_padded, tiny_model


def train_a_bit(model, ids, mask, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = -(model.token_logprobs(ids, mask) * mask[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture
def batch():
    return left_padded(2, 8, 97, [8, 5])


def test_only_adapters_train_and_fresh_adapter_is_identity(batch):
    ids, mask = batch
    base = tiny_model()
    with torch.no_grad():
        before = base(ids, mask)
    m = apply_lora(tiny_model(), r=4, alpha=8)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(isinstance(x, LoRALinear) for x in m.modules()) == 2 * 7  # 7 projections per layer
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask), before, rtol=0, atol=0)
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    train_a_bit(m, ids, mask)
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        assert not torch.allclose(m(ids, mask), before)


def test_merge_is_exact_and_save_pretrained_writes_merged(tmp_path, batch):
    ids, mask = batch
    m = apply_lora(tiny_model(), r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    train_a_bit(m, ids, mask)
    with torch.no_grad():
        want = m(ids, mask)
    m.save_pretrained(tmp_path / "merged")
    loaded = CausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(x, LoRALinear) for x in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), want, rtol=1e-5, atol=1e-5)
        assert any(isinstance(x, LoRALinear) for x in m.modules())  # save left the model as it was
        merge_lora(m)
        assert not any(isinstance(x, LoRALinear) for x in m.modules())
        torch.testing.assert_close(m(ids, mask), want, rtol=1e-5, atol=1e-5)


def test_adapters_save_and_load_alone_in_peft_layout(tmp_path, batch):
    ids, mask = batch
    m = apply_lora(tiny_model(), r=2, alpha=4, target_modules=("q_proj", "o_proj"))
    train_a_bit(m, ids, mask)
    save_lora(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert sorted(cfg["target_modules"]) == ["o_proj", "q_proj"]
    from safetensors.torch import load_file
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" and len(keys) == 8
    fresh = load_lora(tiny_model(), tmp_path)  # the same base weights (seed 0) + the saved adapters
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), m(ids, mask), rtol=0, atol=0)


def test_lora_errors(tmp_path):
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(tiny_model(), target_modules=("nope",))
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        apply_lora(tiny_model(), r=0)
    with pytest.raises(FileNotFoundError):
        load_lora(tiny_model(), tmp_path)
    m = apply_lora(tiny_model(), r=2, target_modules=("q_proj",))
    save_lora(m, tmp_path)
    other = apply_lora(tiny_model(), r=3, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="r / alpha"):
        load_lora(other, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in (("use_rslora", True), ("rank_pattern", {"q_proj": 4}), ("target_modules", "all-linear")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match="plain LoRA|pattern"):
            load_lora(tiny_model(), tmp_path)


def test_lora_disabled_is_the_base_model(batch):
    """The reference policy of LoRA RLHF: adapters off gives the base weights' outputs exactly
    (forward, fused log-probs and the LM-head weight), and the adapters come back after."""
    from fastrlhf.models import lora_disabled

    ids, mask = batch
    base = tiny_model()
    m = apply_lora(tiny_model(), r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    m.lm_head = LoRALinear(m.lm_head, 4, 8)
    train_a_bit(m, ids, mask)
    with torch.no_grad():
        tuned = m(ids, mask)
        assert not torch.allclose(tuned, base(ids, mask))
        with lora_disabled(m):
            torch.testing.assert_close(m(ids, mask), base(ids, mask), rtol=0, atol=0)
            torch.testing.assert_close(m.token_logprobs(ids, mask), base.token_logprobs(ids, mask), rtol=0, atol=0)
            assert m.lm_head_weight() is m.lm_head.base_layer.weight
        torch.testing.assert_close(m(ids, mask), tuned, rtol=0, atol=0)


def test_lora_merged_swaps_in_plain_layers_for_inference(batch):
    """Inside lora_merged every wrapper is a frozen plain nn.Linear computing the adapted function
    (to rounding; the base function exactly while disabled); the wrappers come back on exit, even
    on an error, and generation of a LoRA model is that of its merged copy."""
    import copy

    from fastrlhf.generation import GenerationConfig, generate
    from fastrlhf.models import lora_disabled, lora_merged

    ids, mask = batch
    base = tiny_model()
    m = apply_lora(tiny_model(), r=4, alpha=8)
    m.lm_head = LoRALinear(m.lm_head, 4, 8)
    train_a_bit(m, ids, mask)
    wrappers = [mod for mod in m.modules() if isinstance(mod, LoRALinear)]
    with torch.no_grad():
        tuned = m(ids, mask)
        with lora_merged(m):
            assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
            assert not any(p.requires_grad for p in m.parameters())
            torch.testing.assert_close(m(ids, mask), tuned, rtol=1e-5, atol=1e-5)
        assert [mod for mod in m.modules() if isinstance(mod, LoRALinear)] == wrappers
        torch.testing.assert_close(m(ids, mask), tuned, rtol=0, atol=0)
        with lora_disabled(m), lora_merged(m):
            torch.testing.assert_close(m(ids, mask), base(ids, mask), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="boom"), lora_merged(m):
            raise RuntimeError("boom")
        assert [mod for mod in m.modules() if isinstance(mod, LoRALinear)] == wrappers
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    out = generate(m, ids, mask, cfg)
    want = generate(merge_lora(copy.deepcopy(m)), ids, mask, cfg)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(out.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    assert any(isinstance(mod, LoRALinear) for mod in m.modules())
