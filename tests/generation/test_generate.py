"""generate(): the log-probs it returns match a training-style forward, greedy decoding matches
transformers, stop tokens / per-row limits / padding are exact, and sampling is seeded."""

from __future__ import annotations

import pytest
import torch

from fastrlhf import ops
from fastrlhf.generation import GenerationConfig, generate
from fastrlhf.ops.reference import processed_distribution

from helpers import assert_close
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
    """Generation outputs are ordinary tensors: a policy-gradient step can use them directly, and
    its gradients (through the fused LM head of token_logprobs) are those of the same loss written
    in plain PyTorch on the model's logits (log_softmax + gather), for every parameter."""
    model = tiny_model().train()
    ids, mask = left_padded(2, 5, 97, [5, 3])
    out = generate(model, ids, mask, max_new_tokens=4, seed=0)
    P = out.prompt_length
    rm = out.response_mask.double()
    lp = model.token_logprobs(out.sequences, out.attention_mask)[:, P - 1:]
    (-(lp * out.response_mask).sum()).backward()
    fused = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(out.sequences, out.attention_mask)[:, P - 1:-1]  # position P - 1 + t scores response t
    plain = torch.log_softmax(logits.double(), -1).gather(-1, out.responses.clamp(min=0)[..., None])[..., 0]
    (-(plain * rm).sum()).backward()
    assert torch.allclose(lp.detach().double() * rm, plain.detach() * rm, atol=1e-5)
    for n, p in model.named_parameters():
        assert fused[n] is not None and p.grad is not None, n
        assert fused[n].abs().sum() > 0, n
        # fp32 (the fused kernel) vs fp64 softmax on fp32 logits: ~1e-6 of the tensor's scale;
        # embedding rows of tokens absent from the batch are exact zeros in both
        assert_close(fused[n], p.grad, torch.float32, rtol=1e-4, atol=1e-4, scale="tensor", what=n)


def sharp_model():
    """tiny_model with its LM head scaled by 12: logits of std ~2 (the largest probability 0.06 .. 0.3)
    instead of a near-uniform 0.16, so that top-k / top-p / min-p cut somewhere."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


# every processing step alone, then together with the penalties, then per-row tensors
PROCESSED_SETTINGS = [
    dict(temperature=0.8, top_k=3),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, min_p=0.2),
    dict(temperature=1.0, epsilon=0.1),
    dict(temperature=0.6, frequency_penalty=0.7),  # the sharp model repeats tokens: counts of 2 and more
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
         frequency_penalty=0.2),
    dict(temperature=torch.tensor([0.5, 1.0, 0.7, 1.3, 0.9]), top_p=torch.tensor([0.9, 1.0, 0.5, 0.8, 0.95]),
         top_k=torch.tensor([0, 5, 0, 10, 2])),
]


@pytest.mark.parametrize("settings", PROCESSED_SETTINGS, ids=lambda s: "-".join(s))
def test_sampling_logprobs_are_of_the_processed_distribution(settings):
    """sampling_logprobs = log q(token) with q the reference's processed distribution of the step's
    logits (recomputed by a training forward over the generated prefix; penalties see the prompt
    and the tokens generated before the step), and logprobs = log softmax(logits / T)(token)."""
    model = sharp_model()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    L = 8
    out = generate(model, ids, mask, max_new_tokens=L, seed=1, stop_token_ids=[], **settings)
    assert out.response_mask.all()
    P = out.prompt_length
    with torch.no_grad():
        logits = model(out.sequences, out.attention_mask)[:, P - 1:-1].double()  # [B, L, V]
    temp = torch.as_tensor(settings["temperature"], dtype=torch.float64).expand(5)[:, None]
    prompt = torch.where(mask.bool(), ids, -1)
    lq = torch.empty(5, L, dtype=torch.float64)
    for t in range(L):
        history = torch.cat([prompt, out.responses[:, :t]], dim=1)
        q = processed_distribution(logits[:, t], token_history=history, **settings)
        lq[:, t] = q.gather(1, out.responses[:, t:t + 1])[:, 0].log()
    want = torch.log_softmax(logits / temp[:, :, None], -1).gather(-1, out.responses[..., None])[..., 0]
    assert (out.logprobs.double() - want).abs().max() <= 1e-5
    assert torch.isfinite(lq).all()  # every drawn token is in the kept set (or epsilon's uniform)
    assert (out.sampling_logprobs.double() - lq).abs().max() <= 2e-5  # measured <= 3e-6
    if set(settings) == {"temperature", "frequency_penalty"}:  # some token is drawn 3 times: counts matter
        assert any(len(set(r)) < len(r) - 1 for r in out.responses.tolist())
    if "top_k" in settings or "top_p" in settings or "min_p" in settings:  # a filter renormalized somewhere
        assert (out.sampling_logprobs > out.logprobs + 1e-3).any()


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


def _stop_lengths(seqs, stops):
    """Expected (lengths, stopped) of rows ``seqs`` (greedy tokens up to each row's limit) when row b
    stops on ``stops[b]``: the first of its own stop ids it draws ends it, else its limit does."""
    lengths, stopped = [], []
    for seq, own in zip(seqs, stops):
        first = next((i for i, t in enumerate(seq) if t in own), None)
        lengths.append(len(seq) if first is None else first + 1)
        stopped.append(first is not None)
    return lengths, stopped


@pytest.mark.parametrize("path", ["native", "hf"])
def test_per_row_stop_ids_apply_to_their_own_row_only(path):
    """Each row stops on its own stop ids only. Every row's list holds ids that other rows draw
    (and it does not draw before its limit); even rows also hold one of their own tokens. A row
    that reads row 0's list, or the union of all lists, ends early on another row's id."""
    model = tiny_model()
    if path == "hf":
        pytest.importorskip("transformers")
        model = model.to_hf().eval()
    ids, mask = left_padded(5, 9, 97, LENGTHS)
    limits = [10, 9, 10, 7, 10]
    greedy = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    seqs = [greedy.responses[b, :n].tolist() for b, n in enumerate(limits)]
    B = len(seqs)

    def foreign(b, c):  # the first token row c draws that row b never draws before its limit
        return next(t for t in seqs[c] if t not in seqs[b])

    stops = []
    for b in range(B):
        ids_b = [foreign(b, (b + 1) % B)]
        ids_b.append(seqs[b][len(seqs[b]) // 2] if b % 2 == 0 else foreign(b, (b + 2) % B))
        stops.append(ids_b)
    want_len, want_stopped = _stop_lengths(seqs, stops)
    assert want_stopped == [b % 2 == 0 for b in range(B)]  # odd rows hold foreign ids only
    # the case discriminates: row 0's list for every row, or the union, would end other rows early
    union = sorted({t for s in stops for t in s})
    assert _stop_lengths(seqs, [stops[0]] * B)[0] != want_len
    assert _stop_lengths(seqs, [union] * B)[0] != want_len
    for b in range(1, B, 2):
        assert want_len[b] == limits[b] and any(t in seqs[c] for t in stops[b] for c in range(B) if c != b)

    out = generate(model, ids, mask, max_new_tokens=limits, temperature=0.0, stop_token_ids=stops, pad_token_id=-7)
    assert out.response_lengths.tolist() == want_len, (stops, seqs)
    assert out.stopped.tolist() == want_stopped
    for b, n in enumerate(want_len):
        assert out.responses[b, :n].tolist() == seqs[b][:n]
        assert (out.responses[b, n:] == -7).all() and out.response_mask[b].tolist() == [1] * n + [0] * (10 - n)
        if want_stopped[b]:  # it ends on its own stop id, the first one it draws
            assert out.responses[b, n - 1].item() in stops[b]
            assert not any(t in stops[b] for t in seqs[b][:n - 1])


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
