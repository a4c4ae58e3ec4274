"""Labeling in the terminal: :func:`run_terminal_labeler`, drawn with ``rich``.

The prompt on top, the completions below (two panels side by side when comparing); one key per
judgment: ``1`` / ``2`` (that completion is better), ``t`` (tie), ``s`` (skip), ``u`` (undo the
annotator's latest judgment, which is shown again), ``q`` (quit); ``1``-``5``, ``s``, ``u``, ``q``
when rating. Every judgment is in the store (fsync'd) before the next item appears, so quitting,
Ctrl-C or a crash loses nothing, and the next session resumes where this one stopped.

Keys are read one at a time in the terminal's cbreak mode (``termios`` / ``tty``: no Enter
needed, Ctrl-C still works) when stdin is a terminal, and one per line otherwise (pipes, tests).
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from fastrlhf.feedback.labeler.items import LabelItem, LabelQueue, Mode, as_queue
from fastrlhf.feedback.store import PreferenceStore

COMPARE_KEYS = {"1": 0, "2": 1, "t": "tie"}
RATE_KEYS = {str(r): r for r in range(1, 6)}
QUIT_KEYS = ("q", "\x03", "\x04")  # q, Ctrl-C, Ctrl-D


def text_of(value: Any) -> str:
    """A prompt or completion as plain text (a conversation as ``role: content`` lines)."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)


class KeyReader:
    """Single keys from a terminal (cbreak mode, restored on exit), or lines from anything else.

    Args:
        stream: the input (default ``sys.stdin``).
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        try:
            self.fd = self.stream.fileno()
            self.tty = os.isatty(self.fd)
        except (AttributeError, OSError, ValueError):
            self.fd, self.tty = None, False
        self._saved = None

    def __enter__(self) -> KeyReader:
        if self.tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self) -> str:
        """One key (``"q"`` at the end of the input)."""
        if self.tty:
            data = os.read(self.fd, 1)
            return data.decode("utf-8", "replace") if data else "q"
        line = self.stream.readline()
        return line.strip() if line else "q"


def _render(console, item: LabelItem, mode: Mode, done: int, total: int, annotator: str, message: str) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if console.is_terminal:
        console.clear()
    console.print(Text(f"{done}/{total} done", style="bold"), Text(f"  annotator: {annotator}", style="dim"))
    console.print(Panel(Text(text_of(item.prompt)), title="Prompt", title_align="left"))
    if mode == "compare":
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(*(Panel(Text(text_of(c)), title=f"[{i + 1}]", title_align="left", border_style=color)
                       for i, (c, color) in enumerate(zip(item.completions, ("cyan", "magenta")))))
        console.print(grid)
        keys = "1: left is better   2: right is better   t: tie   s: skip   u: undo   q: quit"
    else:
        console.print(Panel(Text(text_of(item.completions[0])), title="Completion", title_align="left"))
        keys = "1-5: rating (5 is best)   s: skip   u: undo   q: quit"
    console.print(Text(keys, style="bold"))
    if message:
        console.print(Text(message, style="yellow"))


def _label(store: PreferenceStore, queue: LabelQueue, annotator: str, console, read: Callable[[], str],
           counts: Counter) -> bool:
    """The labeling loop; True when the annotator quit before the end."""
    mode = queue.mode
    valid = COMPARE_KEYS if mode == "compare" else RATE_KEYS
    done, prefer, message = store.done_keys(annotator), None, ""
    while True:
        item = queue.next_item(done, prefer)
        n_done, total = queue.progress(done)
        if item is None:
            console.print(f"All {total} items are labeled.", highlight=False)
            return False
        _render(console, item, mode, n_done, total, annotator, message)
        key = read()
        message = ""
        if key in QUIT_KEYS:
            return True
        if key == "u":
            undone = store.undo(annotator)
            if undone is None:
                message = "nothing to undo"
            else:
                counts["undo"] += 1
                prefer = undone.get("item")
                message = f"undid your {undone['type']} of {undone['time']}"
            done = store.done_keys(annotator)
            continue
        if key == "s":
            store.add_skip(item.prompt, list(item.completions), annotator=annotator, meta=list(item.meta),
                           item=item.key)
        elif key in valid and mode == "compare":
            store.add_preference(item.prompt, list(item.completions), valid[key], annotator=annotator,
                                 meta=list(item.meta), item=item.key)
        elif key in valid:
            store.add_rating(item.prompt, item.completions[0], valid[key], annotator=annotator, meta=item.meta[0],
                             item=item.key)
        else:
            message = f"unknown key {key!r}"
            continue
        counts["skip" if key == "s" else "preference" if mode == "compare" else "rating"] += 1
        done.add(item.key)
        prefer = None


def run_terminal_labeler(store: PreferenceStore, items: LabelQueue | Sequence, *, annotator: str,
                         mode: Mode | None = None, console=None, input_fn: Callable[[], str] | None = None) -> dict:
    """Label ``items`` in the terminal until they are all done or the annotator quits.

    Args:
        store: where the judgments go.
        items: a :class:`LabelQueue`, or :class:`LabelItem` s, or ``(prompt, a, b)`` /
            ``(prompt, completion)`` tuples.
        annotator: the annotator's name (items they labeled before are left out).
        mode: ``"compare"`` or ``"rate"`` (default: the queue's; compare for tuples).
        console: a ``rich.console.Console`` (default: a new one on stdout).
        input_fn: returns the next key (default: read from stdin; see the module docstring).

    Returns:
        Counts: ``preference``, ``rating``, ``skip``, ``undo`` (this session's actions), ``done`` and
        ``total`` (the annotator's progress through the queue), ``quit`` (True if they quit early).
    """
    from rich.console import Console

    queue = as_queue(items, mode)
    store.annotator_id(annotator)  # checks the name before the screen is drawn
    console = console or Console()
    counts: Counter = Counter()
    reader = KeyReader() if input_fn is None else contextlib.nullcontext()
    try:
        with reader:
            quit_ = _label(store, queue, annotator, console, input_fn or reader.read, counts)
    except KeyboardInterrupt:
        quit_ = True
    n_done, total = queue.progress(store.done_keys(annotator))
    summary = {"preference": counts["preference"], "rating": counts["rating"], "skip": counts["skip"],
               "undo": counts["undo"], "done": n_done, "total": total, "quit": quit_}
    actions = ", ".join(f"{k} {summary[k]}" for k in ("preference", "rating", "skip", "undo") if summary[k])
    console.print(f"Labeled {n_done}/{total}; this session: {actions or 'nothing'}", highlight=False)
    return summary
