"""Tokenizers: byte-level BPE training, padding, chat templates, and the round trip through
transformers' AutoTokenizer."""

from __future__ import annotations

import pytest

from fastrlhf.models import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine; the early bird catches the worm",
    "naïve café — déjà vu, 数学 and emoji 🙂 are bytes too",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=360, min_frequency=2)


def test_train_round_trip_and_specials(tok):
    assert tok.vocab_size == 360
    for text in CORPUS[:3] + ["unseen words: zyxw 😀"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text  # byte level: nothing is unknown
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned


def test_padding_sides_and_truncation(tok):
    texts = ["the lazy dog", "a stitch in time saves nine"]
    left = tok(texts)
    right = tok(texts, padding_side="right")
    n0 = len(tok.encode(texts[0]))
    assert left["input_ids"].shape == right["input_ids"].shape
    assert left["attention_mask"][0].tolist()[-n0:] == [1] * n0 and left["attention_mask"][0, 0] == 0
    assert right["attention_mask"][0, :n0].sum() == n0 and right["input_ids"][0, -1] == tok.pad_token_id
    short = tok(texts, max_length=3)
    assert short["input_ids"].shape[1] == 3
    assert short["input_ids"][1].tolist() == tok.encode(texts[1])[:3]  # transformers' default: cut the right
    end = tok(texts, max_length=3, truncation_side="left")
    assert end["input_ids"][1].tolist() == tok.encode(texts[1])[-3:]  # keeps a prompt's end
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tok(texts, max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        tok(texts, padding_side="middle")


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    gen = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    assert tok.decode(gen, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.token_to_id("<|im_start|>") in gen  # special tokens map to single ids
    no_template = Tokenizer(tok.backend, eos_token=tok.eos_token)
    with pytest.raises(ValueError, match="no chat_template"):
        no_template.apply_chat_template(msgs)


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    text = CORPUS[2]
    assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template and again.pad_token_id == tok.pad_token_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.pad_token_id == tok.pad_token_id and hf.eos_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "hi there"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_loads_a_transformers_saved_tokenizer_with_bos(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    base = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=("<|endoftext|>", "<|pad|>", "<s>"))
    bos = base.token_to_id("<s>")
    base.backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base.backend, bos_token="<s>",
                                              eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.bos_token_id == bos
    assert ours.encode("the dog")[0] == bos and ours.encode("the dog") == hf("the dog")["input_ids"]
    msgs = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=True, return_dict=False)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=100)
    t = Tokenizer.train(CORPUS, vocab_size=300)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(t.backend, eos_token="<nope>")


def test_train_on_long_text_lines():
    """A text line longer than a file name could be was taken for a path (OSError: name too long)."""
    line = "hello world " * 40
    tok = Tokenizer.train([line] * 5, vocab_size=270)
    assert tok.decode(tok.encode(line)) == line
