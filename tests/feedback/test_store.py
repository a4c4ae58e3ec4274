"""PreferenceStore: durability under SIGKILL, concurrent writers, torn and corrupt lines, annotator
hashing, undo / latest-wins, and the rows trainers read."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fastrlhf.data import load_rows
from fastrlhf.feedback.store import PreferenceStore, item_key

STORE_PY = Path(__file__).resolve().parents[2] / "python" / "fastrlhf" / "feedback" / "store.py"

# The writer loads store.py by path: the store needs only the standard library, and skipping
# `import fastrlhf` (torch) makes a child start in ~0.1 s instead of ~2.5 s.
WRITER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fastrlhf_store_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
store = mod.PreferenceStore(sys.argv[2])
tag, n, size = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
print("ready", flush=True)
sys.stdin.readline()  # go
i = 0
while n < 0 or i < n:
    rec = store.add_preference(f"{tag} {i}", ["a" * size, "b"], i % 2, annotator=tag, meta={"i": i})
    print(rec["id"], flush=True)  # confirmed: append returned
    i += 1
"""


def spawn_writer(path: Path, tag: str, n: int, size: int = 100) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(STORE_PY), str(path), tag, str(n), str(size)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def assert_clean(store: PreferenceStore) -> None:
    assert not [p for p in store.problems if "torn" not in p], store.problems


def test_sigkill_keeps_every_confirmed_record(tmp_path):
    path = tmp_path / "judgments.jsonl"
    child = spawn_writer(path, "w", -1, size=8_000_000)  # 8 MB records: a write takes long enough to be cut
    child.stdin.write("go\n")
    child.stdin.flush()
    confirmed = [child.stdout.readline().strip() for _ in range(2)]
    size, deadline = path.stat().st_size, time.monotonic() + 20
    while path.stat().st_size == size and time.monotonic() < deadline:
        pass  # kill the writer as soon as its next record starts landing in the file
    child.send_signal(signal.SIGKILL)
    confirmed += [line.strip() for line in child.stdout]  # printed before the kill, still in the pipe
    child.wait()
    child.stdin.close()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = PreferenceStore(path)
        ids = [r["id"] for r in store.records(raw=True)]
    assert all("torn last line" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert_clean(store)
    assert set(confirmed) <= set(ids), "a record whose append returned is missing after SIGKILL"
    assert len(ids) - len(confirmed) in (0, 1)  # at most the record being fsync'd when killed
    if caught:  # the usual case: the kill cut a write short, and the fragment was set aside
        assert (tmp_path / "judgments.jsonl.torn").stat().st_size > 0
    assert path.read_bytes().endswith(b"\n")
    store.add_preference("after", ["x", "y"], 0, annotator="w")  # the file stays appendable
    assert PreferenceStore(path).records(raw=True)[-1]["prompt"] == "after"


def test_two_writers_append_the_union_without_interleaving(tmp_path):
    path, n = tmp_path / "judgments.jsonl", 60
    writers = {tag: spawn_writer(path, tag, n) for tag in ("alice", "bob")}  # both race to create the salt too
    for p in writers.values():
        p.stdin.write("go\n")
        p.stdin.flush()
    printed = {tag: [line.strip() for line in p.stdout] for tag, p in writers.items()}
    for p in writers.values():
        assert p.wait() == 0
        p.stdin.close()
        p.stdout.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2 * n + 1
    records = [json.loads(line) for line in lines[:-1]]  # every line is one whole record
    assert sorted(r["id"] for r in records) == sorted(printed["alice"] + printed["bob"])
    store = PreferenceStore(path)
    for tag in ("alice", "bob"):
        mine = [r for r in records if r["annotator"] == store.annotator_id(tag)]
        assert [r["prompt"] for r in mine] == [f"{tag} {i}" for i in range(n)]  # each writer's order kept
    assert len(store.preferences()) == 2 * n
    assert_clean(store)


def test_torn_last_line_is_set_aside_on_load(tmp_path):
    path = tmp_path / "j.jsonl"
    store = PreferenceStore(path)
    a = store.add_preference("p1", ["a", "b"], 0, annotator="ann")
    b = store.add_rating("p2", "c", 4, annotator="ann")
    whole = json.dumps({**a, "id": "f" * 32}).encode()
    with open(path, "ab") as f:
        f.write(whole[: len(whole) // 2])  # a writer killed halfway
    fresh = PreferenceStore(path)
    with pytest.warns(UserWarning, match=r"torn last line .* moved to .*j\.jsonl\.torn"):
        assert [r["id"] for r in fresh.records()] == [a["id"], b["id"]]
    assert (tmp_path / "j.jsonl.torn").read_bytes() == whole[: len(whole) // 2] + b"\n"
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2
    c = fresh.add_skip("p3", ["d"], annotator="ann")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["id"] for r in PreferenceStore(path).records()] == [a["id"], b["id"], c["id"]]


def test_torn_tail_is_set_aside_by_the_next_append(tmp_path):
    path = tmp_path / "j.jsonl"
    a = PreferenceStore(path).add_preference("p1", ["a", "b"], 1, annotator="ann")
    with open(path, "ab") as f:
        f.write(b'{"id": "dead", "type": "pref')
    with pytest.warns(UserWarning, match="torn last line"):
        b = PreferenceStore(path).add_preference("p2", ["a", "b"], 0, annotator="ann")
    assert [r["id"] for r in PreferenceStore(path).records()] == [a["id"], b["id"]]
    assert (tmp_path / "j.jsonl.torn").read_bytes() == b'{"id": "dead", "type": "pref\n'


def test_whole_record_missing_its_newline_is_kept(tmp_path):
    path = tmp_path / "j.jsonl"
    store = PreferenceStore(path)
    a = store.add_preference("p1", ["a", "b"], 0, annotator="ann")
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    b = PreferenceStore(path).add_preference("p2", ["a", "b"], 0, annotator="ann")
    assert [r["id"] for r in PreferenceStore(path).records()] == [a["id"], b["id"]]
    assert not (tmp_path / "j.jsonl.torn").exists()


def test_corrupt_middle_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    store = PreferenceStore(path)
    a = store.add_preference("p1", ["a", "b"], 0, annotator="ann")
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "x", "type": "preference"}) + "\n")  # JSON, but not a record
        f.write("\n")
    b = store.add_preference("p2", ["a", "b"], "tie", annotator="ann")
    fresh = PreferenceStore(path)
    with pytest.warns(UserWarning) as caught:
        assert [r["id"] for r in fresh.records()] == [a["id"], b["id"]]
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}:2: skipped: not a JSON line") for m in messages), messages
    assert any(m.startswith(f"{path}:3: skipped: field 'time'") for m in messages), messages
    assert len(fresh.problems) == 2


def test_annotators_are_hashed_with_a_per_store_salt(tmp_path):
    path = tmp_path / "j.jsonl"
    rec = PreferenceStore(path).add_preference("p", ["a", "b"], 0, annotator=" alice ")
    salt = (tmp_path / "j.jsonl.salt").read_text().strip()
    assert len(salt) == 32
    assert rec["annotator"] == hashlib.sha256(f"{salt}:alice".encode()).hexdigest()
    assert "alice" not in path.read_text()
    assert PreferenceStore(path).annotator_id("alice") == rec["annotator"]  # the salt persists
    assert PreferenceStore(tmp_path / "other.jsonl").annotator_id("alice") != rec["annotator"]
    assert PreferenceStore(tmp_path / "s.jsonl", salt="pepper").annotator_id("alice") == \
        hashlib.sha256(b"pepper:alice").hexdigest()
    with pytest.raises(ValueError, match="salt differs"):
        PreferenceStore(path, salt="pepper").annotator_id("alice")
    plain = PreferenceStore(tmp_path / "plain.jsonl", hash_annotators=False)
    assert plain.add_rating("p", "c", 3, annotator="bob")["annotator"] == "bob"
    assert not (tmp_path / "plain.jsonl.salt").exists()
    with pytest.raises(ValueError, match="annotator must be a non-empty string"):
        plain.add_rating("p", "c", 3, annotator=" ")


def test_bad_records_are_refused_with_the_field_named(tmp_path):
    store = PreferenceStore(tmp_path / "j.jsonl")
    with pytest.raises(ValueError, match="choice must be 0, 1 or 'tie'"):
        store.add_preference("p", ["a", "b"], 2, annotator="a")
    with pytest.raises(ValueError, match="choice must be"):
        store.add_preference("p", ["a", "b"], True, annotator="a")
    with pytest.raises(ValueError, match="list of 2"):
        store.add_preference("p", ["a"], 0, annotator="a")
    with pytest.raises(ValueError, match="rating must be a finite number"):
        store.add_rating("p", "c", float("nan"), annotator="a")
    with pytest.raises(ValueError, match="meta must be a list of 2"):
        store.add_preference("p", ["a", "b"], 0, annotator="a", meta=[{}])
    with pytest.raises(ValueError, match="JSON-serializable"):
        store.add_preference("p", ["a", "b"], 0, annotator="a", meta={"x": object()})
    assert not (tmp_path / "j.jsonl").exists()


def test_undo_and_latest_wins(tmp_path):
    path = tmp_path / "j.jsonl"
    store = PreferenceStore(path)
    a1 = store.add_preference("p1", ["x", "y"], 0, annotator="alice", meta=[{"model": "m1"}, {"model": "m2"}])
    b1 = store.add_preference("p1", ["x", "y"], 1, annotator="bob")
    a2 = store.add_preference("p2", ["u", "v"], 0, annotator="alice")
    a2b = store.add_preference("p2", ["u", "v"], 1, annotator="alice")  # alice changed her mind: latest wins
    assert [r["id"] for r in store.preferences()] == [a1["id"], b1["id"], a2b["id"]]
    assert store.done_keys("alice") == {item_key("p1", ["x", "y"]), item_key("p2", ["u", "v"])}
    assert store.undo("alice")["id"] == a2b["id"]  # her latest; the earlier judgment counts again
    assert [r["id"] for r in store.preferences()] == [a1["id"], b1["id"], a2["id"]]
    with pytest.raises(ValueError, match="another annotator"):
        store.undo("bob", a1["id"])
    assert store.undo("alice", a1["id"])["id"] == a1["id"]
    assert store.undo("alice", a1["id"]) is None  # already undone
    assert [r["id"] for r in store.preferences()] == [b1["id"], a2["id"]]
    assert store.done_keys("alice") == {item_key("p2", ["u", "v"])}
    # an undo written by someone else (by hand) is ignored and reported
    forged = {"id": "f" * 32, "type": "undo", "time": "2024-01-01T00:00:00+00:00",
              "annotator": store.annotator_id("bob"), "undoes": a2["id"]}
    with open(path, "a") as f:
        f.write(json.dumps(forged) + "\n")
    fresh = PreferenceStore(path)
    with pytest.warns(UserWarning, match="undo ffff.* ignored"):
        assert [r["id"] for r in fresh.preferences()] == [b1["id"], a2["id"]]
    assert fresh.undo("carol") is None
    raw = fresh.records(raw=True)
    assert [r["type"] for r in raw].count("undo") == 3
    assert raw[0]["meta"] == [{"model": "m1"}, {"model": "m2"}] and raw[1]["meta"] == [{}, {}]
    assert raw[0]["time"].endswith("+00:00")


def test_to_rows(tmp_path):
    store = PreferenceStore(tmp_path / "j.jsonl")
    conv = [{"role": "user", "content": "hi"}]
    store.add_preference("p1", ["good", "bad"], 0, annotator="a")
    store.add_preference(conv, ["bad", "good"], 1, annotator="a")
    store.add_preference("p3", ["same", "same too"], "tie", annotator="a")
    store.add_rating("p4", "fine", 4, annotator="a")
    store.add_skip("p5", ["?", "!"], annotator="a")
    rows = store.to_rows()
    assert rows.format == "preference"
    assert rows.rows == [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                         {"prompt": conv, "chosen": "good", "rejected": "bad"}]
    both = store.to_rows(ties="both").rows
    assert both[2:] == [{"prompt": "p3", "chosen": "same", "rejected": "same too", "margin": 0.0, "tie": True},
                        {"prompt": "p3", "chosen": "same too", "rejected": "same", "margin": 0.0, "tie": True}]
    assert len(load_rows(both, format="preference")) == 4  # what trainers load
    assert store.to_rows("rating").rows == [{"prompt": "p4", "completion": "fine", "rating": 4}]
    with pytest.raises(ValueError, match="ties must be"):
        store.to_rows(ties="half")
    empty = PreferenceStore(tmp_path / "none.jsonl")
    assert len(empty.to_rows()) == 0 and empty.records() == []
