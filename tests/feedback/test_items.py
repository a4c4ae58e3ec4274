"""The labeling queue: items from files (pairs, preference rows in a seeded order, rate mode), from a
generator sampling on demand, stable keys, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from fastrlhf.data import DataError
from fastrlhf.feedback.labeler import LabelItem, LabelQueue, generated_items, load_items
from fastrlhf.feedback.store import item_key


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_file_keeps_order_and_meta(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p1", "completion_a": "a", "completion_b": "b", "meta": [{"model": "x"}, {"model": "y"}]},
        {"prompt": "p2", "completion_a": "c", "completion_b": "d"},
        {"prompt": "p1", "completion_a": "b", "completion_b": "a"},  # the same comparison: kept once
    ])
    q = load_items(path)
    assert len(q) == 2 and q.mode == "compare"
    first = q.get(0)
    assert (first.prompt, first.completions, first.meta) == ("p1", ("a", "b"), ({"model": "x"}, {"model": "y"}))
    assert first.key == item_key("p1", ["b", "a"])  # keys ignore the order shown
    assert q.next_item({first.key}).prompt == "p2" and q.next_item({first.key}, prefer=first.key).prompt == "p2"
    assert q.next_item(set(q.keys)) is None and q.progress({first.key, "other"}) == (1, 2)
    rated = load_items(path, mode="rate")  # each completion of a pair is rated on its own
    assert [(it.prompt, it.completions) for it in map(rated.get, range(len(rated)))] == [
        ("p1", ("a",)), ("p1", ("b",)), ("p2", ("c",)), ("p2", ("d",))]


def test_preference_rows_are_shown_in_a_seeded_random_order(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(200)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    q = load_items(path, seed=3)
    firsts = [q.get(i).completions[0] for i in range(len(q))]
    n_chosen_first = sum(c.startswith("good") for c in firsts)
    assert 70 < n_chosen_first < 130, n_chosen_first  # the position does not tell which one was chosen
    again = load_items(path, seed=3)
    assert firsts == [again.get(i).completions[0] for i in range(len(q))]  # reproducible
    other = load_items(path, seed=4)
    assert [other.get(i).completions[0] for i in range(len(q))] != firsts
    assert other.keys == q.keys  # the keys do not depend on the order shown


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "completion_a": "a", "completion_b": "b"}\n{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected fields prompt \+ completion_a"):
        load_items(path)
    path.write_text('{"prompt": "p", "completion_a": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*completion_b"):
        load_items(path)
    path.write_text('{"prompt": "p", "completion": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: a row with one completion can only be rated"):
        load_items(path)
    assert load_items(path, mode="rate").get(0).completions == ("a",)
    path.write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid JSON"):
        load_items(path)
    with pytest.raises(ValueError, match="mode must be one of"):
        load_items(path, mode="rank")
    with pytest.raises(ValueError, match=r"items\[0\] has 2 fields"):
        LabelQueue.from_tuples([("p", "a")], mode="compare")


def test_generated_items_sample_once_on_demand():
    calls = []

    def generate_pair(prompt):
        calls.append(prompt)
        return f"{prompt} / a", f"{prompt} / b", {"model": "tiny", "temperature": 0.7}

    q = generated_items(["x", "y", "x"], generate_pair)
    assert len(q) == 2 and calls == []  # nothing sampled before it is shown
    assert q.keys == [item_key("x"), item_key("y")]
    it = q.next_item(set())
    assert it == LabelItem("x", ("x / a", "x / b"), ({"model": "tiny", "temperature": 0.7},) * 2, item_key("x"))
    assert q.next_item(set()) is it and calls == ["x"]  # every annotator sees the same sample
    assert q.next_item({item_key("x")}).prompt == "y" and calls == ["x", "y"]
    bad = generated_items(["z"], lambda p: "just one")
    with pytest.raises(ValueError, match=r"must return \(completion_a, completion_b, meta\)"):
        bad.get(0)
    rate = generated_items(["z"], lambda p: ("answer", None), mode="rate")
    assert rate.get(0).completions == ("answer",) and rate.get(0).meta == ({},)
