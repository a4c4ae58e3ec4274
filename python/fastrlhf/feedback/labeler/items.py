"""The labeling queue: what annotators are shown, in a fixed order, with stable keys for resume.

An item is a prompt with two completions (``mode="compare"``) or one (``mode="rate"``). Queues come
from a file (:func:`load_items`), from tuples (:meth:`LabelQueue.from_tuples`), or from a model
sampling answers on demand (:func:`generated_items`). Keys are :func:`~fastrlhf.feedback.store.item_key`
of the prompt and the completions (of the prompt alone for generated items, whose completions are
not known until they are sampled), so a resumed labeler leaves out what an annotator already did,
whatever the order or the session.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastrlhf.data.formats import check_row, split_implicit_prompt
from fastrlhf.data.loading import DataError, iter_rows
from fastrlhf.feedback.store import item_key

Mode = Literal["compare", "rate"]
MODES = ("compare", "rate")


@dataclass(frozen=True)
class LabelItem:
    """One thing to label: a prompt and the completion(s) shown, with per-completion metadata."""

    prompt: Any
    completions: tuple
    meta: tuple = ()
    key: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # free-form (source file:line, ...)

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", item_key(self.prompt, self.completions))
        if not self.meta:
            object.__setattr__(self, "meta", tuple({} for _ in self.completions))


def check_mode(mode: str) -> Mode:
    """``mode`` itself, or a ValueError naming the argument."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _per_completion(meta: Any, n: int, what: str) -> tuple:
    if meta is None:
        return tuple({} for _ in range(n))
    if isinstance(meta, dict):
        return tuple(dict(meta) for _ in range(n))
    if isinstance(meta, (list, tuple)) and len(meta) == n and all(isinstance(m, dict) for m in meta):
        return tuple(dict(m) for m in meta)
    raise ValueError(f"{what}: meta must be a dict or a list of {n} dicts, got {meta!r}")


class LabelQueue:
    """An ordered list of items, materialized on demand (generated items are sampled once, the first
    time anyone asks for them, and then shown to every annotator). Thread-safe.

    Args:
        mode: ``"compare"`` (two completions per item) or ``"rate"`` (one).
        keys: the items' keys, in order.
        make: ``make(i) -> LabelItem``, called at most once per item.
    """

    def __init__(self, mode: Mode, keys: Sequence[str], make: Callable[[int], LabelItem]):
        self.mode = check_mode(mode)
        self.keys = list(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._make, self._cache, self._lock = make, {}, threading.Lock()

    @classmethod
    def from_items(cls, items: Iterable[LabelItem], mode: Mode) -> LabelQueue:
        """A queue of ready items; repeated keys are kept once (the first).

        Args:
            items: the items.
            mode: ``"compare"`` or ``"rate"``; every item must have 2 or 1 completion(s) to match.
        """
        n = 2 if check_mode(mode) == "compare" else 1
        unique: dict[str, LabelItem] = {}
        for i, it in enumerate(items):
            if not isinstance(it, LabelItem):
                raise TypeError(f"LabelQueue.from_items: items[{i}] is a {type(it).__name__}, not a LabelItem")
            if len(it.completions) != n:
                raise ValueError(f"LabelQueue.from_items: items[{i}] has {len(it.completions)} completion(s); "
                                 f"mode {mode!r} needs {n}")
            unique.setdefault(it.key, it)
        ready = list(unique.values())
        return cls(mode, [it.key for it in ready], ready.__getitem__)

    @classmethod
    def from_tuples(cls, items: Iterable[Sequence], mode: Mode = "compare") -> LabelQueue:
        """A queue from ``(prompt, completion_a, completion_b)`` (compare) or ``(prompt, completion)``
        (rate) tuples.

        Args:
            items: the tuples.
            mode: ``"compare"`` or ``"rate"``.
        """
        n = 2 if check_mode(mode) == "compare" else 1
        out = []
        for i, t in enumerate(items):
            if len(t) != n + 1:
                raise ValueError(f"LabelQueue.from_tuples: items[{i}] has {len(t)} fields; mode {mode!r} needs "
                                 f"(prompt, {n} completion(s))")
            out.append(LabelItem(t[0], tuple(t[1:])))
        return cls.from_items(out, mode)

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: str) -> int | None:
        """The position of the item with ``key``, None if it is not in the queue."""
        return self._index.get(key)

    def get(self, i: int) -> LabelItem:
        """The ``i``-th item (sampled now if it is a generated one)."""
        with self._lock:
            if i not in self._cache:
                it = self._make(i)
                if it.key != self.keys[i]:
                    it = LabelItem(it.prompt, it.completions, it.meta, self.keys[i], it.extra)
                self._cache[i] = it
            return self._cache[i]

    def pending(self, done: set[str]) -> list[int]:
        """Positions of the items whose keys are not in ``done``, in order."""
        return [i for i, k in enumerate(self.keys) if k not in done]

    def next_item(self, done: set[str], prefer: str | None = None) -> LabelItem | None:
        """The first item not in ``done`` (``prefer``'s item when it is pending), None when all are done.

        Args:
            done: keys already labeled (``PreferenceStore.done_keys``).
            prefer: a key to show first if it is pending (the item just undone).
        """
        if prefer is not None and prefer not in done and prefer in self._index:
            return self.get(self._index[prefer])
        todo = self.pending(done)
        return self.get(todo[0]) if todo else None

    def progress(self, done: set[str]) -> tuple[int, int]:
        """``(labeled, total)`` counting only this queue's items."""
        return sum(1 for k in self.keys if k in done), len(self.keys)


def as_queue(items: LabelQueue | Iterable, mode: Mode | None) -> LabelQueue:
    """``items`` as a :class:`LabelQueue`: a queue (whose mode must match ``mode``), or
    :class:`LabelItem` s, or ``(prompt, a, b)`` / ``(prompt, completion)`` tuples.

    Args:
        items: the items.
        mode: ``"compare"``, ``"rate"``, or None (the queue's, or compare).
    """
    if isinstance(items, LabelQueue):
        if mode is not None and check_mode(mode) != items.mode:
            raise ValueError(f"mode={mode!r} but the items were made for mode {items.mode!r}")
        return items
    items = list(items)
    mode = check_mode(mode or "compare")
    if items and all(isinstance(it, LabelItem) for it in items):
        return LabelQueue.from_items(items, mode)
    return LabelQueue.from_tuples(items, mode)


def _row_item(where: str, row: Any, mode: Mode, rng_seed: int) -> list[LabelItem]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    extra = {"source": where}
    if "completion_a" in row or "completion_b" in row:
        if "prompt" not in row:
            raise DataError(f"{where}: a row with completion_a / completion_b needs a prompt")
        why = check_row({"prompt": row.get("prompt"), "chosen": row.get("completion_a"),
                         "rejected": row.get("completion_b")}, "preference")
        if why:
            why = why.replace("chosen", "completion_a").replace("rejected", "completion_b")
            raise DataError(f"{where}: {why}")
        comps = (row["completion_a"], row["completion_b"])
        meta = _per_completion(row.get("meta"), 2, where)
    elif "chosen" in row and "rejected" in row:
        why = check_row(row, "preference")
        if why:
            raise DataError(f"{where}: {why}")
        row = split_implicit_prompt(row)
        comps, meta = (row["chosen"], row["rejected"]), _per_completion(row.get("meta"), 2, where)
        # the order shown must not tell which one was chosen: a coin flip seeded by seed and key
        if random.Random(f"{rng_seed}:{item_key(row['prompt'], comps)}").random() < 0.5:
            comps, meta = comps[::-1], meta[::-1]
    elif "completion" in row:
        why = check_row(row, "prompt_completion")
        if why:
            raise DataError(f"{where}: {why}")
        if mode == "compare":
            raise DataError(f"{where}: a row with one completion can only be rated; pass mode='rate' or give "
                            "completion_a and completion_b")
        return [LabelItem(row["prompt"], (row["completion"],), _per_completion(row.get("meta"), 1, where),
                          extra=extra)]
    else:
        raise DataError(f"{where}: expected fields prompt + completion_a + completion_b, prompt + chosen + rejected, "
                        f"or prompt + completion (rate mode); got {sorted(row)}")
    if mode == "rate":  # each completion of a pair is rated on its own
        return [LabelItem(row["prompt"], (c,), (m,), extra=extra) for c, m in zip(comps, meta)]
    return [LabelItem(row["prompt"], comps, meta, extra=extra)]


def load_items(source: str | Path | Iterable[dict], *, mode: Mode = "compare", seed: int = 0) -> LabelQueue:
    """A labeling queue from a file of rows (``.jsonl``, ``.json``, or anything ``datasets`` reads) or
    from rows in memory.

    Rows hold ``prompt``, ``completion_a`` and ``completion_b`` (shown in that order); or
    preference rows (``prompt``, ``chosen``, ``rejected``), shown in a random order seeded by
    ``seed`` and the item, so the position does not leak which one was chosen; or, in rate mode,
    ``prompt`` and ``completion``. In rate mode the two completions of a pair become two items.
    An optional ``meta`` field (a dict, or one dict per completion) travels into the store.
    Repeated items (same prompt and completions) are kept once.

    Args:
        source: a path, or an iterable of dicts.
        mode: ``"compare"`` or ``"rate"``.
        seed: the seed of the order of chosen / rejected.
    """
    check_mode(mode)
    if isinstance(source, (str, Path)):
        rows, name = iter_rows(source), str(source)
    else:
        rows, name = ((f"row {i}", r) for i, r in enumerate(source)), "<rows>"
    items = []
    for where, row in rows:
        if isinstance(row, Exception):
            raise DataError(f"{where}: {row}")
        items += _row_item(where, row, mode, seed)
    if not items:
        raise DataError(f"{name}: no items to label")
    return LabelQueue.from_items(items, mode)


def generated_items(prompts: Sequence[Any], generate: Callable, *, mode: Mode = "compare") -> LabelQueue:
    """A queue whose completions are sampled when an item is first shown.

    Args:
        prompts: the prompts (strings or conversations), in order; repeated prompts are kept once.
        generate: compare mode: ``generate(prompt) -> (completion_a, completion_b, meta)``; rate
            mode: ``generate(prompt) -> (completion, meta)``. ``meta`` is a dict (model name,
            sampling settings) for every completion, or one dict per completion.
        mode: ``"compare"`` or ``"rate"``.

    Keys are those of the prompts alone: an annotator who labeled a prompt in an earlier session
    is not shown it again, although a new session would sample different answers.
    """
    check_mode(mode)
    if not callable(generate):
        raise TypeError(f"generated_items: generate must be callable, got {type(generate).__name__}")
    unique: dict[str, Any] = {}
    for p in prompts:
        unique.setdefault(item_key(p), p)
    keys = list(unique)
    n = 2 if mode == "compare" else 1

    def make(i: int) -> LabelItem:
        prompt = unique[keys[i]]
        out = generate(prompt)
        if not isinstance(out, (tuple, list)) or len(out) != n + 1:
            want = "(completion_a, completion_b, meta)" if n == 2 else "(completion, meta)"
            raise ValueError(f"generated_items: generate(prompt) must return {want}, got {out!r:.200}")
        comps = tuple(out[:n])
        if not all(isinstance(c, (str, list)) for c in comps):
            raise ValueError("generated_items: generate(prompt) returned a completion that is not a string")
        return LabelItem(prompt, comps, _per_completion(out[n], n, "generated_items"), keys[i])

    if not keys:
        raise ValueError("generated_items: prompts is empty")
    return LabelQueue(mode, keys, make)
