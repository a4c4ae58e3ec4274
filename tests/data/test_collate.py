"""fastrlhf.data.collate: chat templates, completion-only masks, padding and packing."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.data import as_conversation, collate_pairs, encode_pair, encode_prompt, encode_text, pack, pad
from fastrlhf.models import Tokenizer

CORPUS = ["What is two plus two? Four.", "Say hello. Hello there!", "The cat sat on the mat."] * 30


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=290)


def test_conversation_pair_masks_the_answer_only(tok):
    prompt = as_conversation("What is two plus two?")
    p, c = encode_pair(tok, prompt, "Four.")
    assert p == encode_prompt(tok, prompt) == tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Four."}])
    assert p + c == full
    assert tok.decode(c, skip_special_tokens=False).startswith("Four.<|im_end|>")


def test_answer_merging_with_the_template_newline_keeps_the_prompt_ids():
    # a BPE that merges the template's "\n" with an answer's leading spaces: the full rendering's
    # ids do not start with the prompt's, as with SmolLM2 and a sampled answer "        This ..."
    tok = Tokenizer.train(CORPUS + ["x\n        Four"] * 40, vocab_size=300)
    prompt = as_conversation("What is two plus two?")
    answer = "        Four."
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}])
    p, c = encode_pair(tok, prompt, answer)
    assert full[: len(p)] != p  # the case under test
    assert p == encode_prompt(tok, prompt)
    assert tok.decode(p + c, skip_special_tokens=False) == tok.decode(full, skip_special_tokens=False)
    assert tok.decode(c, skip_special_tokens=False).startswith(answer + "<|im_end|>")


def test_template_that_rewrites_the_prompt_is_an_error():
    other = Tokenizer.train(CORPUS, vocab_size=290)
    other.chat_template = ("{% for m in messages %}{{ m['role'] }}{% endfor %}"
                           "{% if add_generation_prompt %}:{% endif %}")
    with pytest.raises(ValueError, match="renders the prompt differently"):
        encode_pair(other, as_conversation("hi"), "yo")


def test_string_pair_ends_with_eos(tok):
    p, c = encode_pair(tok, "2+2=", "4")
    assert p == tok.encode("2+2=") and c[-1] == tok.eos_token_id and tok.decode(c) == "4"
    assert encode_text(tok, {"text": "hi"})[-1] == tok.eos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert encode_text(tok, {"messages": msgs}) == tok.apply_chat_template(msgs)


def test_collate_pairs_masks_and_padding():
    batch = collate_pairs([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch.target_mask().tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    full = collate_pairs([([1, 2], [3])], pad_id=0, completion_only=False)
    assert full.loss_mask.tolist() == [[0, 1, 1]]


def test_pad_sides_and_truncation():
    ids, mask = pad([[1, 2, 3], [4]], 9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, _ = pad([[1, 2, 3], [4]], 9, side="left", max_length=2)
    assert ids.tolist() == [[2, 3], [9, 4]]
    ids, _ = pad([[1, 2, 3]], 9, side="right", max_length=2)
    assert ids.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="side"):
        pad([[1]], 0, side="middle")


def test_pack_bounds_and_targets_never_cross_sequences():
    packs = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], [[0, 1, 1], [1, 1], [0, 0, 1, 1], [1]], max_tokens=5)
    assert [p.input_ids.tolist() for p in packs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [p.cu_seqlens.tolist() for p in packs] == [[0, 3, 5], [0, 4, 5]]
    # position i predicts i + 1: the last token of a sequence predicts nothing
    assert packs[0].target_mask().tolist() == [1, 1, 0, 1]
    assert packs[1].target_mask().tolist() == [0, 1, 1, 0]
    long = pack([[1, 2, 3, 4, 5, 6, 7]], [[1] * 7], max_tokens=4)
    assert len(long) == 1 and long[0].input_ids.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="loss-mask entries"):
        pack([[1, 2]], [[1]], max_tokens=4)


def test_packed_forward_equals_separate_forwards():
    """No cross-contamination: a packed sequence's hidden states equal its forward alone."""
    from helpers.models import tiny_model

    model = tiny_model()
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    (p,) = pack(seqs, [[1] * len(s) for s in seqs], max_tokens=16)
    with torch.no_grad():
        packed = model(p.input_ids, cu_seqlens=p.cu_seqlens)
        for s, a, b in zip(seqs, p.cu_seqlens[:-1], p.cu_seqlens[1:]):
            alone = model(torch.tensor([s]))[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
