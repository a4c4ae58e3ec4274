"""The terminal labeler: driven through a pseudo-terminal (single keys in cbreak mode), resumed
after a restart; rate mode and the line-based fallback in process."""

from __future__ import annotations

import io
import json
import sys

import pytest

from fastrlhf.feedback.labeler import LabelQueue, run_terminal_labeler
from fastrlhf.feedback.store import PreferenceStore, item_key

Console = pytest.importorskip("rich.console", reason="the terminal labeler needs rich ('fastrlhf[label]')").Console

ITEMS = [("Prompt one?", "A1", "B1"), ("Prompt two?", "A2", "B2"), ("Prompt three?", "A3", "B3")]

CHILD = r"""
import json, sys
from fastrlhf.feedback.labeler import run_terminal_labeler
from fastrlhf.feedback.store import PreferenceStore
items = json.loads(sys.argv[2])
input("ready")  # imports done (torch: seconds); wait for the test to say go
summary = run_terminal_labeler(PreferenceStore(sys.argv[1]), items, annotator="tess")
print("SUMMARY", json.dumps(summary), flush=True)
"""


def screen(n_done: int, prompt: str) -> str:
    return rf"{n_done}/3 done[\s\S]*{prompt}[\s\S]*q: quit"


def spawn(path):
    pexpect = pytest.importorskip("pexpect")
    return pexpect.spawn(sys.executable, ["-c", CHILD, str(path), json.dumps(ITEMS)], encoding="utf-8", timeout=60,
                         dimensions=(50, 140))


def go(child) -> None:
    child.expect("ready")
    child.sendline("")


def finish(child) -> dict:
    child.expect(r"SUMMARY (\{.*\})")
    summary = json.loads(child.match.group(1))
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    return summary


def test_keys_undo_quit_and_resume_through_a_pty(tmp_path):
    path = tmp_path / "labels.jsonl"
    child, resumed = spawn(path), spawn(path)  # the second session imports while the first one runs
    go(child)
    child.expect(screen(0, "Prompt one"))
    for key, expected in [("1", screen(1, "Prompt two")), ("2", screen(2, "Prompt three")),
                          ("u", r"1/3 done[\s\S]*Prompt two[\s\S]*undid your preference"),
                          ("t", screen(2, "Prompt three"))]:
        child.send(key)  # one key, no Enter: the labeler reads the terminal in cbreak mode
        child.expect(expected)
    child.send("q")
    assert finish(child) == {"preference": 3, "rating": 0, "skip": 0, "undo": 1, "done": 2, "total": 3,
                             "quit": True}

    child = resumed  # resume: only the third item is left
    go(child)
    child.expect(screen(2, "Prompt three"))
    child.send("1")
    child.expect("All 3 items are labeled")
    assert finish(child) == {"preference": 1, "rating": 0, "skip": 0, "undo": 0, "done": 3, "total": 3,
                             "quit": False}

    store = PreferenceStore(path)
    raw = store.records(raw=True)
    assert [(r["type"], r.get("prompt"), r.get("choice")) for r in raw] == [
        ("preference", "Prompt one?", 0), ("preference", "Prompt two?", 1), ("undo", None, None),
        ("preference", "Prompt two?", "tie"), ("preference", "Prompt three?", 0)]
    assert raw[2]["undoes"] == raw[1]["id"]
    assert {r["annotator"] for r in raw} == {store.annotator_id("tess")}
    assert [(r["prompt"], r["completions"], r["choice"]) for r in store.preferences()] == [
        ("Prompt one?", ["A1", "B1"], 0), ("Prompt two?", ["A2", "B2"], "tie"), ("Prompt three?", ["A3", "B3"], 0)]
    assert store.done_keys("tess") == {item_key(p, [a, b]) for p, a, b in ITEMS}
    assert store.problems == []


def test_rate_mode_in_process(tmp_path):
    store = PreferenceStore(tmp_path / "r.jsonl", hash_annotators=False)
    queue = LabelQueue.from_tuples([("How are you?", "Fine."), ("2+2?", "5")], mode="rate")
    keys = iter(["3", "x", "t", "u", "s", "u", "5", "1"])
    out = io.StringIO()
    summary = run_terminal_labeler(store, queue, annotator="rita", console=Console(file=out, width=100),
                                   input_fn=lambda: next(keys))
    assert summary == {"preference": 0, "rating": 3, "skip": 1, "undo": 2, "done": 2, "total": 2, "quit": False}
    text = out.getvalue()
    for message in ("unknown key 'x'", "unknown key 't'", "undid your rating", "undid your skip"):
        assert message in text
    assert [(r["prompt"], r["completions"], r["rating"]) for r in store.ratings()] == [
        ("How are you?", ["Fine."], 5), ("2+2?", ["5"], 1)]
    assert [r["type"] for r in store.records(raw=True)] == ["rating", "undo", "skip", "undo", "rating", "rating"]
    # the queue is done for rita: nothing is shown, nothing is asked
    again = run_terminal_labeler(store, queue, annotator="rita", console=Console(file=io.StringIO()),
                                 input_fn=lambda: pytest.fail("asked for a key with nothing to label"))
    assert again["done"] == 2 and again["quit"] is False
    with pytest.raises(ValueError, match="mode='compare' but the items were made for mode 'rate'"):
        run_terminal_labeler(store, queue, annotator="rita", mode="compare", input_fn=lambda: "q")


def test_line_fallback_when_stdin_is_not_a_terminal(tmp_path, monkeypatch):
    store = PreferenceStore(tmp_path / "l.jsonl")
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n\ns\n"))  # then end of input: quit
    summary = run_terminal_labeler(store, ITEMS, annotator="lee", console=Console(file=io.StringIO()))
    assert summary["preference"] == 1 and summary["skip"] == 1 and summary["quit"] is True
    assert [r["type"] for r in store.records()] == ["preference", "skip"]
    assert store.preferences()[0]["choice"] == 1
