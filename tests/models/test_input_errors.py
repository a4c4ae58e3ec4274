"""Bad inputs to the models and their files get errors that name what is wrong (not a bare
IndexError / KeyError / AttributeError from deep inside)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastrlhf.models import CausalLM, Tokenizer

from helpers.models import tiny_model


def test_input_ids_as_a_list_is_a_type_error(model):
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model([[1, 2, 3]])


def test_float_input_ids_are_refused(model):
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.ones(1, 3))


@pytest.mark.parametrize("bad", [-1, 97, 1000])
def test_token_ids_outside_the_vocabulary_name_the_id(model, bad):
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary \\[0, 97\\)"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.token_logprobs(ids)


def test_forward_longer_than_max_position_embeddings(model):
    T = model.config.max_position_embeddings + 1
    with pytest.raises(ValueError, match=f"{T} positions exceeds max_position_embeddings"):
        model(torch.zeros(1, T, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):  # packed: the longest sequence
        model(torch.zeros(T, dtype=torch.long), cu_seqlens=torch.tensor([0, T]))
    model(torch.zeros(1, T - 1, dtype=torch.long))  # the limit itself is fine


@pytest.fixture
def saved(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    return tmp_path


def test_config_json_without_vocab_size_names_the_key_and_file(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["vocab_size"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json lacks the required key\(s\) \['vocab_size'\]") as e:
        CausalLM.from_pretrained(saved)
    assert str(saved) in str(e.value)


def test_invalid_json_names_the_file(saved):
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        CausalLM.from_pretrained(saved)
    assert str(saved / "config.json") in str(e.value)


def test_truncated_safetensors_names_the_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not safetensors") as e:
        CausalLM.from_pretrained(saved)
    assert str(f) in str(e.value)


def test_tokenizer_train_on_an_empty_corpus_raises():
    with pytest.raises(ValueError, match="corpus is empty"):
        Tokenizer.train([])
    with pytest.raises(ValueError, match="corpus is empty"):
        Tokenizer.train(["", ""])


def test_tokenizer_train_warns_when_the_corpus_supports_a_smaller_vocabulary():
    with pytest.warns(UserWarning, match="asked for vocab_size 5000 but the corpus supports only"):
        tok = Tokenizer.train(["hello world", "hello there"], vocab_size=5000)
    assert tok.vocab_size < 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.train(["hello world"] * 20, vocab_size=262)  # reachable: no warning
