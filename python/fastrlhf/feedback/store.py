"""Human judgments on disk: :class:`PreferenceStore`, an append-only JSON Lines file.

One record per line, written whole under an exclusive ``fcntl.flock`` and fsync'd before
:meth:`PreferenceStore.append` returns, so several labelers (processes or threads) can append to
the same file and a record whose append returned survives a crash. Fields:

==============  =====================================================================================
``id``          uuid4 hex
``type``        ``"preference"``, ``"rating"``, ``"skip"`` or ``"undo"``
``time``        ISO 8601, UTC
``annotator``   sha256 of the annotator's name and a per-store salt (kept in ``<path>.salt``), or
                the name itself with ``hash_annotators=False``
``item``        the labeling item's key (:func:`item_key` of prompt + completions, unless the
                labeler gave another), what :meth:`PreferenceStore.done_keys` returns for resume
``prompt``      a string or a conversation (judgments)
``completions`` 2 for a preference, 1 for a rating, 1 or 2 for a skip, in the order shown
``choice``      preference: 0 (the first completion is better), 1, or ``"tie"``
``rating``      rating: a number
``meta``        one dict per completion: whatever the caller passed (model name, sampling settings)
``undoes``      undo: the id of the judgment it cancels
==============  =====================================================================================

**Torn lines.** A writer killed mid-append leaves the file without its final ``"\\n"``. The next
append (or load) notices it under the lock: a tail that decodes as a whole record only lacked its
newline and gets one; anything else is *set aside*: its bytes are appended to ``<path>.torn`` (one
fragment per line) and the file is truncated to its last newline, with a warning. A read-only file
is left as it is and the torn tail is reported and skipped. Any other line that does not decode
as a record is reported (a warning naming ``file:line``, and in :attr:`PreferenceStore.problems`)
and skipped: loading never fails on a damaged file.

**Undo and latest-wins.** An undo record cancels the judgment it names, if the same annotator made
it (other undos are reported and ignored). Of the judgments left, the latest one of an annotator
on an item counts (:meth:`PreferenceStore.records`); the file keeps every line as written.

**Annotator hashes** are pseudonyms, not encryption: whoever holds ``<path>.salt`` (created
readable by its owner only) can test guessed names. Share the JSONL without the salt file to keep
names out of it; keep the salt with the store so that resume and undo keep working.

The store needs nothing but the standard library (``fcntl``: POSIX only); only :meth:`to_rows`
imports :mod:`fastrlhf.data`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import threading
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

TYPES = ("preference", "rating", "skip", "undo")
JUDGMENTS = ("preference", "rating", "skip")
CHOICES = (0, 1, "tie")
RecordType = Literal["preference", "rating", "skip", "undo"]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same string."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def item_key(prompt: Any, completions: Any = ()) -> str:
    """A stable key of a labeling item: sha256 (first 16 bytes, hex) of the prompt and the
    completions. The order of the completions does not matter (a pair shown the other way round
    is the same comparison).

    Args:
        prompt: a string or a conversation.
        completions: the completions (strings or conversations); empty for a key of the prompt
            alone (items generated on the fly).
    """
    parts = sorted(canonical_json(c) for c in completions)
    text = canonical_json({"prompt": prompt, "completions": parts})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value)


def check_record(rec: Any) -> str | None:
    """Why ``rec`` is not a valid store record, or None when it is."""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__}"
    for name in ("id", "type", "time", "annotator"):
        if not isinstance(rec.get(name), str) or not rec[name]:
            return f"field {name!r} must be a non-empty string, got {rec.get(name)!r}"
    kind = rec["type"]
    if kind not in TYPES:
        return f"type must be one of {TYPES}, got {kind!r}"
    if kind == "undo":
        undoes = rec.get("undoes")
        return None if isinstance(undoes, str) and undoes else f"an undo needs 'undoes' (a record id), got {undoes!r}"
    if rec.get("item") is not None and not isinstance(rec["item"], str):
        return f"item must be a string key, got {rec['item']!r}"
    if not _is_text(rec.get("prompt")):
        return "prompt must be a string or a list of {'role', 'content'} messages"
    comps = rec.get("completions")
    n = {"preference": (2,), "rating": (1,), "skip": (1, 2)}[kind]
    if not isinstance(comps, list) or len(comps) not in n or not all(_is_text(c) for c in comps):
        return f"a {kind} needs completions: a list of {' or '.join(map(str, n))} string(s) or conversation(s)"
    meta = rec.get("meta")
    if meta is not None and (not isinstance(meta, list) or len(meta) != len(comps)
                             or not all(isinstance(m, dict) for m in meta)):
        return f"meta must be a list of {len(comps)} dict(s), one per completion"
    if kind == "preference" and (rec.get("choice") not in CHOICES or isinstance(rec.get("choice"), bool)):
        return f"choice must be 0, 1 or 'tie', got {rec.get('choice')!r}"
    if kind == "rating":
        r = rec.get("rating")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            return f"rating must be a finite number, got {r!r}"
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _last_newline(fd: int, size: int) -> int:
    """Offset of the last ``\\n`` in the file's first ``size`` bytes, -1 if none."""
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _decode(line: bytes) -> tuple[dict | None, str | None]:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not a JSON line ({e})"
    why = check_record(rec)
    return (None, why) if why else (rec, None)


class PreferenceStore:
    """An append-only JSON Lines file of human judgments (see the module docstring for the format).

    Args:
        path: the ``.jsonl`` file; created (with its directory) on the first append.
        hash_annotators: store sha256(salt, name) instead of annotator names. Keep the same choice
            for the life of a store: names and hashes of the same person do not match.
        salt: the salt of the annotator hashes. None: the one in ``<path>.salt``, created (random)
            when first needed. A salt that differs from an existing ``<path>.salt`` is an error.
    """

    def __init__(self, path: str | os.PathLike, *, hash_annotators: bool = True, salt: str | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"PreferenceStore: path {self.path} is a directory; give a .jsonl file")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError(f"PreferenceStore: salt must be a non-empty string or None, got {salt!r}")
        self.hash_annotators = hash_annotators
        self.salt_path = self.path.with_name(self.path.name + ".salt")
        self.torn_path = self.path.with_name(self.path.name + ".torn")
        self._salt = salt
        self._salt_checked = False
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._raw: list[dict] = []
        self._offset, self._lineno, self._inode = 0, 0, None
        self.problems: list[str] = []  # "file:line: why" for every line skipped while loading

    # -- annotators -----------------------------------------------------------------------------

    def _get_salt(self) -> str:
        if self._salt_checked:
            return self._salt
        existing = self._read_salt()
        if existing is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.salt_path.with_name(f"{self.salt_path.name}.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # readable by its owner only
            with os.fdopen(fd, "w") as f:
                f.write((self._salt or secrets.token_hex(16)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.salt_path)  # atomic: the first process to create it wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            existing = self._read_salt()
        if self._salt is not None and existing != self._salt:
            raise ValueError(f"PreferenceStore: salt differs from the one in {self.salt_path}; the annotator "
                             "hashes of this store would not match (pass salt=None to use the file's)")
        self._salt, self._salt_checked = existing, True
        return existing

    def _read_salt(self) -> str | None:
        try:
            text = self.salt_path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text:
            raise ValueError(f"PreferenceStore: {self.salt_path} is empty; restore it or delete it together with "
                             "the store (the annotator hashes depend on it)")
        return text

    def annotator_id(self, annotator: str) -> str:
        """How ``annotator`` appears in the records: the salted sha256 (hex), or the name itself.

        Args:
            annotator: the annotator's name (surrounding spaces ignored).
        """
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError(f"PreferenceStore: annotator must be a non-empty string, got {annotator!r}")
        name = annotator.strip()
        if not self.hash_annotators:
            return name
        return hashlib.sha256(f"{self._get_salt()}:{name}".encode()).hexdigest()

    # -- writing --------------------------------------------------------------------------------

    def append(self, kind: RecordType, *, annotator: str, prompt: Any = None, completions: list | None = None,
               choice: int | str | None = None, rating: float | None = None, meta: Any = None,
               item: str | None = None, undoes: str | None = None) -> dict:
        """Append one record; it is on disk (fsync'd) when this returns.

        Args:
            kind: the record's type: ``"preference"``, ``"rating"``, ``"skip"`` or ``"undo"``.
            annotator: the annotator's name (hashed unless ``hash_annotators=False``).
            prompt: the prompt (judgments).
            completions: the completions in the order shown (2 / 1 / 1 or 2).
            choice: preference: 0, 1 or ``"tie"``.
            rating: rating: a number.
            meta: one dict per completion, or one dict for all of them, or None.
            item: the item key; default :func:`item_key` of prompt and completions.
            undoes: undo: the id of the judgment to cancel (see :meth:`undo`, which checks it).

        Returns:
            The record written.
        """
        rec: dict[str, Any] = {"id": uuid.uuid4().hex, "type": kind, "time": _now(),
                               "annotator": self.annotator_id(annotator)}
        if kind == "undo":
            rec["undoes"] = undoes
        elif kind in JUDGMENTS:
            completions = list(completions) if isinstance(completions, (list, tuple)) else completions
            if isinstance(meta, dict):
                meta = [dict(meta) for _ in completions or ()]
            elif meta is None:
                meta = [{} for _ in completions or ()]
            rec.update(item=item or (item_key(prompt, completions) if isinstance(completions, list) else None),
                       prompt=prompt, completions=completions, meta=list(meta) if isinstance(meta, tuple) else meta)
            if kind == "preference":
                rec["choice"] = choice
            elif kind == "rating":
                rec["rating"] = rating
        why = check_record(rec)
        if why:
            raise ValueError(f"PreferenceStore.append: {why}")
        try:
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(f"PreferenceStore.append: the record is not JSON-serializable ({e}); meta must hold "
                             "plain JSON values") from None
        self._write(line.encode("utf-8"))
        return rec

    def _write(self, data: bytes) -> None:
        with self._lock:
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._repair_tail(fd)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the lock
            if created:  # make the new directory entry durable too
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def _repair_tail(self, fd: int) -> None:
        """Under the exclusive lock: end the file with ``\\n``, setting a torn tail aside."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start = _last_newline(fd, size) + 1
        tail = os.pread(fd, size - start, start)
        rec, _ = _decode(tail)
        if rec is None:
            with open(self.torn_path, "ab") as torn:
                torn.write(tail + b"\n")
                torn.flush()
                os.fsync(torn.fileno())
            os.ftruncate(fd, start)
            msg = (f"{self.path}: a torn last line ({len(tail)} bytes at offset {start}, left by a writer that was "
                   f"killed) was moved to {self.torn_path}")
            self.problems.append(msg)
            warnings.warn(msg, stacklevel=4)
        else:
            _write_all(fd, b"\n")
        os.fsync(fd)

    def add_preference(self, prompt: Any, completions, choice: int | str, *, annotator: str, meta: Any = None,
                       item: str | None = None) -> dict:
        """Record that ``completions[choice]`` is the better answer (or a ``"tie"``).

        Args:
            prompt: the prompt.
            completions: the two completions, in the order shown.
            choice: 0, 1 or ``"tie"``.
            annotator: the annotator's name.
            meta: per-completion dicts (model, sampling settings), or one dict for both.
            item: the item key (default: from prompt and completions).
        """
        return self.append("preference", annotator=annotator, prompt=prompt, completions=completions,
                           choice=choice, meta=meta, item=item)

    def add_rating(self, prompt: Any, completion, rating: float, *, annotator: str, meta: Any = None,
                   item: str | None = None) -> dict:
        """Record a rating of one completion.

        Args:
            prompt: the prompt.
            completion: the completion rated.
            rating: the rating (a number; the labelers use 1-5).
            annotator: the annotator's name.
            meta: a dict about the completion (model, sampling settings).
            item: the item key (default: from prompt and completion).
        """
        return self.append("rating", annotator=annotator, prompt=prompt, completions=[completion], rating=rating,
                           meta=meta, item=item)

    def add_skip(self, prompt: Any, completions, *, annotator: str, meta: Any = None, item: str | None = None) -> dict:
        """Record that the annotator skipped an item (it counts as done for resume, and is no data).

        Args:
            prompt: the prompt.
            completions: the completion(s) shown.
            annotator: the annotator's name.
            meta: per-completion dicts, or one dict for all.
            item: the item key (default: from prompt and completions).
        """
        return self.append("skip", annotator=annotator, prompt=prompt, completions=completions, meta=meta, item=item)

    def undo(self, annotator: str, record_id: str | None = None) -> dict | None:
        """Cancel a judgment of ``annotator``: the one with ``record_id``, or their latest one.

        Args:
            annotator: the annotator's name; only their own judgments can be undone.
            record_id: the judgment's id; None: the annotator's latest judgment still in effect.

        Returns:
            The undone judgment (the undo record is appended), or None when there is nothing to undo.
        """
        who = self.annotator_id(annotator)
        with self._lock:
            effective = self._effective()
            if record_id is None:
                mine = [r for r in effective if r["annotator"] == who]
                if not mine:
                    return None
                target = mine[-1]
            else:
                target = next((r for r in self._raw if r["id"] == record_id), None)
                if target is None or target["type"] not in JUDGMENTS:
                    raise ValueError(f"PreferenceStore.undo: record_id {record_id!r} is no judgment in {self.path}")
                if target["annotator"] != who:
                    raise ValueError(f"PreferenceStore.undo: record {record_id} was made by another annotator")
                if all(r["id"] != record_id for r in effective):
                    return None  # already undone or superseded
            self.append("undo", annotator=annotator, undoes=target["id"])
            return dict(target)

    # -- reading --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the lines appended since the last call (the whole file the first time)."""
        with self._lock:
            for _ in range(3):
                try:
                    f = open(self.path, "rb")
                except FileNotFoundError:
                    self._reset()
                    return
                with f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                    st = os.fstat(f.fileno())
                    if st.st_ino != self._inode or st.st_size < self._offset:
                        self._reset()
                        self._inode = st.st_ino
                    f.seek(self._offset)
                    data = f.read()
                    end = data.rfind(b"\n") + 1
                    torn = data[end:]
                    self._parse(data[:end])
                if not torn:
                    return
                if not self._try_repair():
                    rec, why = _decode(torn)
                    if rec is not None:  # a whole record that lacks only its newline
                        self._raw.append(rec)
                        self._offset, self._lineno = self._offset + len(torn), self._lineno + 1
                        return
                    msg = (f"{self.path}:{self._lineno + 1}: a torn last line was skipped ({why}); the file is not "
                           "writable, so it stays")
                    if msg not in self.problems:
                        self.problems.append(msg)
                        warnings.warn(msg, stacklevel=3)
                    return
            raise RuntimeError(f"PreferenceStore: {self.path} keeps ending in a torn line")

    def _try_repair(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._repair_tail(fd)
        finally:
            os.close(fd)
        return True

    def _parse(self, data: bytes) -> None:
        self._offset += len(data)
        for line in data.split(b"\n")[:-1]:
            self._lineno += 1
            if not line.strip():
                continue
            rec, why = _decode(line)
            if rec is None:
                msg = f"{self.path}:{self._lineno}: skipped: {why}"
                self.problems.append(msg)
                warnings.warn(msg, stacklevel=4)
            else:
                self._raw.append(rec)

    def _effective(self) -> list[dict]:
        self._refresh()
        by_id = {r["id"]: r for r in self._raw}
        undone = set()
        for r in self._raw:
            if r["type"] != "undo":
                continue
            target = by_id.get(r["undoes"])
            if target is None or target["type"] not in JUDGMENTS or target["annotator"] != r["annotator"]:
                msg = f"{self.path}: undo {r['id']} ignored: {r['undoes']} is no judgment of the same annotator"
                if msg not in self.problems:
                    self.problems.append(msg)
                    warnings.warn(msg, stacklevel=3)
                continue
            undone.add(target["id"])
        latest: dict[tuple[str, str], dict] = {}
        for r in self._raw:
            if r["type"] in JUDGMENTS and r["id"] not in undone:
                key = (r["annotator"], r.get("item") or item_key(r["prompt"], r["completions"]))
                latest.pop(key, None)  # re-insert: the dict keeps file order of the latest judgments
                latest[key] = r
        return list(latest.values())

    def records(self, *, raw: bool = False) -> list[dict]:
        """The judgments in effect, in file order: undone ones removed, and of several judgments of
        one annotator on one item only the latest. Damaged lines are reported and skipped.

        Args:
            raw: every valid record as written instead (undo records and undone judgments included).
        """
        with self._lock:
            if raw:
                self._refresh()
                return [dict(r) for r in self._raw]
            return [dict(r) for r in self._effective()]

    def preferences(self) -> list[dict]:
        """The preference records in effect."""
        return [r for r in self.records() if r["type"] == "preference"]

    def ratings(self) -> list[dict]:
        """The rating records in effect."""
        return [r for r in self.records() if r["type"] == "rating"]

    def done_keys(self, annotator: str) -> set[str]:
        """The item keys ``annotator`` has labeled (preferences, ratings and skips in effect): what a
        resumed labeler leaves out.

        Args:
            annotator: the annotator's name.
        """
        who = self.annotator_id(annotator)
        return {r.get("item") or item_key(r["prompt"], r["completions"]) for r in self.records()
                if r["annotator"] == who}

    def __len__(self) -> int:
        return len(self.records())

    def to_rows(self, kind: Literal["preference", "rating"] = "preference", *,
                ties: Literal["drop", "both"] = "drop"):
        """The judgments as dataset rows (TRL's formats), so trainers read the store like any dataset.

        Preferences become ``{"prompt", "chosen", "rejected"}`` rows; ratings
        ``{"prompt", "completion", "rating"}`` rows. One row per judgment: items labeled by several
        annotators give several rows. Skips give none.

        Ties: a single row with ``margin`` 0 would still teach "chosen beats rejected" under a
        Bradley-Terry or DPO loss, so ties are dropped by default; ``ties="both"`` keeps each as
        two rows, one per order, each with ``margin`` 0 and ``"tie": True``: their gradients cancel
        when the two answers score the same, which pulls the scores together.

        Args:
            kind: ``"preference"`` or ``"rating"``.
            ties: ``"drop"`` or ``"both"`` (preferences only).

        Returns:
            :class:`fastrlhf.data.Rows` of format ``kind``.
        """
        from fastrlhf.data.formats import check_row  # imported here: the rest of the store needs only the stdlib
        from fastrlhf.data.loading import Rows

        if kind not in ("preference", "rating"):
            raise ValueError(f"PreferenceStore.to_rows: kind must be 'preference' or 'rating', got {kind!r}")
        if ties not in ("drop", "both"):
            raise ValueError(f"PreferenceStore.to_rows: ties must be 'drop' or 'both', got {ties!r}")
        rows = []
        for r in (self.preferences() if kind == "preference" else self.ratings()):
            p, comps = r["prompt"], r["completions"]
            if kind == "rating":
                rows.append({"prompt": p, "completion": comps[0], "rating": r["rating"]})
            elif r["choice"] != "tie":
                rows.append({"prompt": p, "chosen": comps[r["choice"]], "rejected": comps[1 - r["choice"]]})
            elif ties == "both":
                rows.append({"prompt": p, "chosen": comps[0], "rejected": comps[1], "margin": 0.0, "tie": True})
                rows.append({"prompt": p, "chosen": comps[1], "rejected": comps[0], "margin": 0.0, "tie": True})
        for row in rows:
            why = check_row(row, kind)
            if why:  # records are checked when written and loaded; this is a bug, not bad data
                raise AssertionError(f"PreferenceStore.to_rows: {self.path}: produced an invalid row: {why}")
        return Rows(rows, kind, [], str(self.path))
