"""CausalLM: the padded, packed and cached forwards agree with each other; gradients; bad input."""

from __future__ import annotations

import pytest
import torch

from fastrlhf import ops
from fastrlhf.models import CausalLM, CausalLMConfig, KVCache

from helpers.models import left_padded, tiny_config, tiny_model


def test_forward_shapes_and_hidden(model):
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        logits = model(ids)
        hidden = model(ids, return_hidden=True)
    assert logits.shape == (3, 11, 97) and hidden.shape == (3, 11, 64)
    torch.testing.assert_close(model.logits(hidden), logits, rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_rows_match_unpadded(model, padding):
    lengths = [9, 4, 1, 6]
    ids, mask = left_padded(4, 9, 97, lengths)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)  # reversed order is fine: the valid block is what matters
    with torch.no_grad():
        batch = model(ids, mask)
        for b in range(len(lengths)):
            valid = mask[b].bool()
            alone = model(ids[b, valid][None])[0]
            torch.testing.assert_close(batch[b, valid], alone, rtol=1e-5, atol=1e-5)


def test_packed_matches_unpadded(model):
    lengths = [5, 0, 8, 3]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu)
        assert packed.shape == (16, 97)
        for b, s in enumerate(seqs):
            if len(s):
                torch.testing.assert_close(packed[cu[b]:cu[b + 1]], model(s[None])[0], rtol=1e-5, atol=1e-5)


def test_cache_prefill_then_decode_matches_full_forward(model):
    lengths = torch.tensor([7, 3, 5])
    T = 12
    full = torch.randint(1, 97, (3, T))
    with torch.no_grad():
        cache = model.new_cache(3, T + 1)
        P = int(lengths.max())
        prompt = full[:, :P].clone()
        pmask = (torch.arange(P) < lengths[:, None]).long()  # right-padded prompts
        hidden = model.model(prompt, pmask, cache=cache)
        assert torch.equal(cache.lengths, lengths)
        got = [model.logits(hidden[torch.arange(3), lengths - 1])]
        # then each row continues with its own next tokens, one at a time
        for step in range(4):
            tok = full[torch.arange(3), lengths + step]
            got.append(model(tok[:, None], cache=cache)[:, 0])
        assert torch.equal(cache.lengths, lengths + 4)
        for b in range(3):
            n = int(lengths[b])
            ref = model(full[b, : n + 4][None])[0, n - 1:]  # logits at the last prompt token and the 4 new ones
            torch.testing.assert_close(torch.stack([g[b] for g in got]), ref, rtol=1e-5, atol=1e-5)


def test_cache_multi_token_append(model):
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        model(ids[:, :6], torch.ones(2, 6, dtype=torch.long), cache=cache)
        out = model(ids[:, 6:], cache=cache)  # 4 new tokens per row, causal among themselves
        torch.testing.assert_close(out, model(ids)[:, 6:], rtol=1e-5, atol=1e-5)


def test_token_logprobs_methods_agree(model):
    ids, mask = left_padded(3, 10, 97, [10, 6, 8])
    with torch.no_grad():
        via_hidden = model.token_logprobs(ids, mask, temperature=0.7)
        via_logits = ops.token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:], temperature=0.7)
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    torch.testing.assert_close(via_hidden[valid], via_logits[valid], rtol=1e-5, atol=1e-5)


def test_gradients_flow_and_checkpointing_matches():
    ids, mask = left_padded(2, 8, 97, [8, 5])
    grads = []
    for ckpt in (False, True):
        m = tiny_model(seed=1).train()
        m.gradient_checkpointing = ckpt
        lp = m.token_logprobs(ids, mask)
        (-(lp * mask[:, 1:]).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads[0]["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_token_loss_matches_token_logprobs_then_loss(tied):
    """model.token_loss (gradients made in the forward, chunks of 1 sequence) gives the loss and
    every parameter's gradient of loss_fn(model.token_logprobs(...)); tied embeddings too."""
    ids, mask = left_padded(3, 9, 97, [9, 4, 7])
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    n = int(valid.sum())

    def sft(lp, ent, rows):
        return -(lp * valid[rows]).sum() / n + 0.01 * (ent * valid[rows]).sum() / n

    results = []
    for fused in (True, False):
        m = tiny_model(seed=2, tie_word_embeddings=tied).train()
        if fused:
            out = m.token_loss(ids, sft, mask, temperature=0.9, chunk_rows=1)
            loss = out.loss
            assert out.logprobs.shape == (3, 8) and not out.logprobs.requires_grad
        else:
            lp, ent = m.token_logprobs(ids, mask, temperature=0.9, return_entropy=True)
            loss = sft(lp, ent, slice(0, 3))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_tied_embeddings_share_storage():
    m = tiny_model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.num_parameters() == m.config.num_parameters_estimate


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    m = tiny_model().to(dtype)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        out = m(ids)
        ref = tiny_model()(ids)
    assert out.dtype == dtype
    tol = 0.1 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastrlhf.models.llama import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = tiny_config(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=512)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                                      rope_parameters={**scaling, "rope_theta": 500000.0})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), hf_inv.float(), rtol=1e-6, atol=0)


def test_bad_input_raises(model):
    ids = torch.randint(0, 97, (2, 6))
    holes = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="contiguous block"):
        model(ids, holes)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\]"):
        model(ids, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[None])
    cache = model.new_cache(2, 6)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="cache is full"):
            model(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match="empty cache"):
        model(ids, torch.ones_like(ids), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.new_cache(1, 1000)


@pytest.mark.parametrize("bad, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=65), "not a multiple"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_scaling={"rope_type": "yarn"}), "not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_config_dict_round_trip():
    cfg = tiny_config(tie_word_embeddings=True, eos_token_id=[3, 4])
    assert CausalLMConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(CausalLM(cfg), CausalLM)


def test_decode_weights_pack_and_free():
    """Packed q/k/v and gate/up weights (CPU decode) give the separate projections' logits; they
    are built on entry, freed on exit, and skipped for LoRA-wrapped projections."""
    from fastrlhf.models import apply_lora

    model = tiny_model()
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        want = model(ids)[:, 6:]
        for packed in (False, True):
            cache = model.new_cache(3, 9)
            model(ids[:, :6], torch.ones(3, 6, dtype=torch.long), cache=cache)
            ctx = model.decode_weights() if packed else torch.no_grad()
            with ctx:
                if packed:
                    assert model.model.layers[0].self_attn.packed_qkv.weight.shape == (4 * 16 + 2 * 2 * 16, 64)
                got = torch.stack([model(ids[:, 6 + t:7 + t], cache=cache)[:, 0] for t in range(3)], 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(layer.self_attn.packed_qkv is None and layer.mlp.packed_gate_up is None for layer in model.model.layers)
    lora = apply_lora(tiny_model(), r=2, target_modules=("q_proj",))
    with lora.decode_weights():
        assert lora.model.layers[0].self_attn.packed_qkv is None  # q_proj is LoRA: not packed
        assert lora.model.layers[0].mlp.packed_gate_up is not None


@pytest.mark.parametrize("rows", [[0, 2, 3], [1, 4], [0, 1, 2, 3, 4], [3], [], [4, 0, 2]])
def test_kv_cache_select_keeps_rows_in_order(rows):
    """select keeps each kept row's valid positions (in place for increasing rows: the same
    storage, only moved rows copied); any other order gathers."""
    cfg = tiny_config()
    cache = KVCache(cfg, 5, 12)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    cache.lengths = torch.tensor([3, 12, 7, 0, 5])
    before_k = [t.clone() for t in cache.k]
    before_v = [t.clone() for t in cache.v]
    ptr = cache.k[0].data_ptr()
    idx = torch.tensor(rows, dtype=torch.long)
    cache.select(idx)
    assert cache.batch_size == len(rows) and torch.equal(cache.lengths, torch.tensor([3, 12, 7, 0, 5])[idx])
    for new, old in zip(cache.k + cache.v, before_k + before_v):
        assert new.shape == (len(rows),) + old.shape[1:]
        for i, r in enumerate(rows):
            n = int(cache.lengths[i])
            assert torch.equal(new[i, :, :n], old[r, :, :n])
    if rows and rows == sorted(rows):
        assert cache.k[0].data_ptr() == ptr  # compacted in place


def test_start_skips_the_prompt_positions_in_the_lm_head(model):
    ids, mask = left_padded(3, 9, 97, [9, 6, 4])
    full, full_ent = model.token_logprobs(ids, mask, return_entropy=True)
    part, part_ent = model.token_logprobs(ids, mask, return_entropy=True, start=4)
    torch.testing.assert_close(part, full[:, 4:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part_ent, full_ent[:, 4:], rtol=1e-5, atol=1e-6)
    got = model.token_loss(ids, lambda lp, ent, rows: lp.sum(), mask, start=4)
    torch.testing.assert_close(got.loss, full[:, 4:].sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start must be in"):
        model.token_logprobs(ids, mask, start=8)
