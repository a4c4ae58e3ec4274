"""generate(): the log-probs it returns match a training-style forward, greedy decoding matches
transformers, stop tokens / per-row limits / padding are exact, and sampling is seeded."""

from __future__ import annotations

import pytest
import torch

from fastrlhf import ops
from fastrlhf.generation import GenerationConfig, generate

from helpers.models import left_padded, tiny_model

LENGTHS = [9, 4, 1, 7, 6]


def training_logprobs(model, out, temperature):
    """The trainer's recomputation: full forward over prompt + response, then token_logprobs."""
    with torch.no_grad():
        logits = model(out.sequences, out.attention_mask)  # (B, P + L, V)
        lp = ops.token_logprobs(logits[:, :-1], out.sequences[:, 1:], temperature=temperature)
        fused = model.token_logprobs(out.sequences, out.attention_mask, temperature=temperature)
    P = out.prompt_length
    return lp[:, P - 1:], fused[:, P - 1:]


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_k=20),
    dict(temperature=0.0),
    dict(temperature=torch.tensor([0.5, 1.0, 0.0, 1.3, 0.9])),
])
def test_logprobs_match_training_forward(settings):
    model = tiny_model()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    out = generate(model, ids, mask, GenerationConfig(max_new_tokens=12, seed=0, stop_token_ids=[5], **settings))
    rm = out.response_mask.bool()
    assert rm.any()
    temp = settings["temperature"]
    if isinstance(temp, torch.Tensor):
        for b in range(5):
            t = float(temp[b]) if float(temp[b]) > 0 else 1.0
            lp, fused = training_logprobs(model, out, t)
            err = (lp[b] - out.logprobs[b])[rm[b]].abs().max()
            assert err <= 1e-5, (b, err)
        return
    lp, fused = training_logprobs(model, out, temp if temp > 0 else 1.0)
    assert (lp - out.logprobs)[rm].abs().max() <= 1e-5
    assert (fused - out.logprobs)[rm].abs().max() <= 1e-5
    assert torch.equal(out.logprobs[~rm], torch.zeros_like(out.logprobs[~rm]))


def test_outputs_feed_a_training_forward():
    """Generation outputs are ordinary tensors: a policy-gradient step can use them directly."""
    model = tiny_model().train()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    out = generate(model, ids, mask, max_new_tokens=4, seed=0)
    lp = model.token_logprobs(out.sequences, out.attention_mask)[:, out.prompt_length - 1:]
    (-(lp * out.response_mask).sum()).backward()
    assert model.lm_head.weight.grad is not None


def test_sampling_logprobs_are_of_the_processed_distribution():
    model = tiny_model()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    out = generate(model, ids, mask, max_new_tokens=6, temperature=0.8, top_k=3, seed=1)
    rm = out.response_mask.bool()
    # top-k = 3 renormalizes over 3 tokens: the sampled token is at least as likely as under softmax
    assert (out.sampling_logprobs[rm] >= out.logprobs[rm] - 1e-6).all()
    assert (out.sampling_logprobs[rm] >= torch.log(torch.tensor(1 / 3)) - 1e-6).any()


def test_stop_tokens_and_per_row_limits_are_exact():
    model = tiny_model()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    greedy = generate(model, ids, mask, max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    row0 = greedy.responses[0].tolist()
    stop = row0[2]
    first = row0.index(stop)
    limits = [8, 3, 8, 1, 5]
    unused = next(t for t in range(97) if t not in greedy.responses[4].tolist())  # a stop id never drawn
    stops = [[stop], [], [], [], [unused]]
    out = generate(model, ids, mask, max_new_tokens=limits, temperature=0.0, stop_token_ids=stops, pad_token_id=-7)
    assert out.responses.shape == (5, 8)
    assert out.response_lengths.tolist() == [first + 1, 3, 8, 1, 5]
    assert out.stopped.tolist() == [True, False, False, False, False]
    for b, n in enumerate(out.response_lengths.tolist()):
        assert out.responses[b, :n].tolist() == greedy.responses[b, :n].tolist()
        assert (out.responses[b, n:] == -7).all() and out.response_mask[b].tolist() == [1] * n + [0] * (8 - n)
    assert torch.equal(out.attention_mask[:, :9], mask)
    assert torch.equal(out.sequences[:, :9], ids)


def test_eos_from_model_config_is_the_default_stop():
    model = tiny_model(eos_token_id=None)
    ids, mask = left_padded(2, 5, 97, [5, 3])
    first = generate(model, ids, mask, max_new_tokens=4, temperature=0.0).responses[:, 0]
    model.config.eos_token_id = int(first[0])
    out = generate(model, ids, mask, max_new_tokens=4, temperature=0.0)
    assert out.response_lengths[0] == 1 and out.stopped[0]


def test_seeded_and_dropping_finished_rows_changes_nothing_greedy():
    model = tiny_model()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    kw = dict(max_new_tokens=[10, 2, 7, 1, 10], top_p=0.8)
    a = generate(model, ids, mask, seed=3, **kw)
    b = generate(model, ids, mask, seed=3, **kw)
    c = generate(model, ids, mask, seed=4, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    torch.manual_seed(0)
    d = generate(model, ids, mask, **kw)
    torch.manual_seed(0)
    e = generate(model, ids, mask, **kw)
    assert torch.equal(d.sequences, e.sequences)
    for temperature in (0.0, 1.0):  # a row's draws do not depend on which rows are still in the batch
        g1 = generate(model, ids, mask, temperature=temperature, drop_finished=True, seed=5, **kw)
        g2 = generate(model, ids, mask, temperature=temperature, drop_finished=False, seed=5, **kw)
        assert torch.equal(g1.sequences, g2.sequences)
        assert (g1.logprobs - g2.logprobs).abs().max() <= 1e-5
    other = dict(kw, max_new_tokens=[1, 2, 7, 1, 10])  # only row 0 changes
    g3 = generate(model, ids, mask, seed=5, temperature=1.0, **other)
    assert torch.equal(g3.sequences[1:], g1.sequences[1:])


def test_generation_config_defaults_and_scalar_forms(tmp_path):
    model = tiny_model()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    first = generate(model, ids, mask, max_new_tokens=3, temperature=0.0, stop_token_ids=[]).responses[:, 0]
    model.generation_config = {"eos_token_id": [int(first[0]), 96], "pad_token_id": 95}
    model.save_pretrained(tmp_path)
    from fastrlhf.models import CausalLM
    again = CausalLM.from_pretrained(tmp_path).eval()
    assert again.generation_config == model.generation_config
    out = generate(again, ids, mask, max_new_tokens=3, temperature=0.0)
    assert out.response_lengths[0] == 1 and out.stopped[0] and out.responses[0, 1] == 95
    a = generate(model, ids, mask, max_new_tokens=3, temperature=torch.tensor(0.0), stop_token_ids=int(first[0]))
    assert torch.equal(a.sequences, out.sequences)


def test_presence_penalty_forbids_seen_tokens():
    model = tiny_model()
    ids, mask = left_padded(3, 6, 97, [6, 3, 2])
    out = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, presence_penalty=1e4, stop_token_ids=[])
    for b in range(3):
        seen = set(ids[b, mask[b].bool()].tolist())
        for t in out.responses[b].tolist():
            assert t not in seen
            seen.add(t)


def test_timings_and_bad_input():
    model = tiny_model()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    out = generate(model, ids, mask, max_new_tokens=3)
    assert set(out.timings) == {"prefill", "decode", "sample", "tokens"} and out.timings["tokens"] == 6
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, ids, mask, max_new_tokens=500)
    with pytest.raises(ValueError, match="one per row"):
        generate(model, ids, mask, max_new_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, ids, torch.zeros_like(mask))
    with pytest.raises(TypeError, match="expected a fastrlhf CausalLM"):
        generate(object(), ids, mask)


def test_greedy_matches_transformers_and_adapter_matches_native():
    transformers = pytest.importorskip("transformers")
    from fastrlhf.models import CausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=None, eos_token_id=None)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = CausalLM.from_hf(hf).eval()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    native = generate(ours, ids, mask, max_new_tokens=10, temperature=0.0)
    assert torch.equal(native.sequences, want)
    adapter = generate(hf, ids, mask, max_new_tokens=10, temperature=0.0)
    assert torch.equal(adapter.sequences, want)
    kw = dict(max_new_tokens=[10, 3, 10, 5, 1], temperature=0.9, top_p=0.95, seed=11)
    a, b = generate(ours, ids, mask, **kw), generate(hf, ids, mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    rm = a.response_mask.bool()
    assert (a.logprobs - b.logprobs)[rm].abs().max() <= 1e-5
