"""fastrlhf.data: every TRL row format from JSON Lines, JSON, Parquet and CSV; malformed rows
reported with file and line; skipping with reasons."""

from __future__ import annotations

import json

import pytest

from fastrlhf.data import DataError, check_row, detect_format, load_rows

CHAT_P = [{"role": "user", "content": "Hi?"}]
CHAT_A = [{"role": "assistant", "content": "Hello!"}]
ROWS = {
    "text": {"text": "Once upon a time."},
    "prompt": {"prompt": "Say hi."},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "preference": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "margin": 1.5},
    "rating": {"prompt": "Say hi.", "completion": "Hi!", "rating": 4},
    "binary": {"prompt": "Say hi.", "completion": "Hi!", "label": True},
}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_loads_from_jsonl_and_json(tmp_path, fmt):
    rows = [ROWS[fmt], ROWS[fmt]]
    got = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert got.format == fmt and got.rows == rows and not got.skipped
    (tmp_path / "d.json").write_text(json.dumps({"train": rows}))
    assert load_rows(tmp_path / "d.json").rows == rows
    assert detect_format(ROWS[fmt]) == fmt and check_row(ROWS[fmt], fmt) is None


def test_conversational_rows_and_implicit_prompt(tmp_path):
    row = {"prompt": CHAT_P, "chosen": CHAT_A, "rejected": [{"role": "assistant", "content": "No."}]}
    assert load_rows([row]).rows == [row]
    implicit = {"chosen": CHAT_P + CHAT_A, "rejected": CHAT_P + [{"role": "assistant", "content": "No."}]}
    got = load_rows([implicit]).rows[0]
    assert got["prompt"] == CHAT_P and got["chosen"] == CHAT_A and got["rejected"][0]["content"] == "No."
    assert load_rows([{"messages": CHAT_P + CHAT_A}]).format == "text"


def test_parquet_and_csv_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [ROWS["preference"], {**ROWS["preference"], "chosen": "Hello there!"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    got = load_rows(tmp_path / "d.parquet")
    assert got.format == "preference" and [r["chosen"] for r in got] == ["Hi!", "Hello there!"]
    (tmp_path / "d.csv").write_text("prompt,completion,rating\nSay hi.,Hi!,5\nSay bye.,Bye.,2\n")
    got = load_rows(tmp_path / "d.csv")
    assert got.format == "rating" and [r["rating"] for r in got] == [5, 2]


@pytest.mark.parametrize("bad,line,match", [
    ('{"prompt": "x", "chosen": "a"', 3, "invalid JSON"),
    ('{"prompt": "x", "chosen": "a"}', 3, r"missing field\(s\) \['rejected'\]"),
    ('{"prompt": "x", "chosen": 3, "rejected": "b"}', 3, "chosen must be a string or a list"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}', 3, "role 'robot'"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}', 3, "margin must be a number"),
    ('[1, 2]', 3, "must be a JSON object"),
])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, bad, line, match):
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS["preference"]] * 2, [bad, json.dumps(ROWS["preference"])])
    with pytest.raises(DataError, match=match) as e:
        load_rows(path)
    assert str(e.value).startswith(f"{path}:{line}:")


def test_skip_invalid_counts_and_lists_reasons(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [ROWS["rating"]],
                       ['{"prompt": "x", "completion": "y", "rating": "five"}', "not json", json.dumps(ROWS["rating"])])
    with pytest.warns(UserWarning, match="skipped 2 malformed row"):
        got = load_rows(path, skip_invalid=True)
    assert len(got) == 2
    assert [(s.where, s.reason[:20]) for s in got.skipped] == [(f"{path}:2", "rating must be a num"),
                                                               (f"{path}:3", "invalid JSON (Expect")]


def test_a_row_of_another_format_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [ROWS["prompt_completion"], ROWS["prompt"]])
    with pytest.raises(DataError, match=f"{path}:2: missing field.*'completion'"):
        load_rows(path)
    with pytest.raises(DataError, match="missing field"):
        load_rows([ROWS["prompt"]], format="preference")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a list of rows"):
        load_rows(tmp_path / "d.json")
    (tmp_path / "d.json").write_text('[{"prompt": 1}')
    with pytest.raises(DataError, match=r"d.json:1: invalid JSON"):
        load_rows(tmp_path / "d.json")
    (tmp_path / "d.xyz").write_text("")
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(tmp_path / "d.xyz")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="format must be one of"):
        load_rows([ROWS["prompt"]], format="chat")
