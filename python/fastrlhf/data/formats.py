"""Dataset row formats, as TRL documents them, so data users already have loads as it is.

=====================  ==========================================================  ===========
format                 fields                                                      used by
=====================  ==========================================================  ===========
``text``               ``text`` (or ``messages``: a conversation)                   SFT
``prompt``             ``prompt``                                                  PPO, GRPO
``prompt_completion``  ``prompt``, ``completion``                                  SFT
``preference``         ``prompt``, ``chosen``, ``rejected`` (optional ``margin``;   DPO, reward
                       without ``prompt``: TRL's implicit-prompt conversations)
``rating``             ``prompt``, ``completion``, ``rating`` (a number, e.g. 1-5)  reward (MSE)
``binary``             ``prompt``, ``completion``, ``label`` (bool: good or bad)    reward (BCE)
=====================  ==========================================================  ===========

Text fields are strings, or conversations: lists of ``{"role": ..., "content": ...}`` messages
(``prompt`` holds the turns before the answer; ``completion`` / ``chosen`` / ``rejected`` the
assistant turn(s)). Rows are plain dicts.
"""

from __future__ import annotations

from typing import Any, Literal

Format = Literal["text", "prompt", "prompt_completion", "preference", "rating", "binary"]
FORMATS: tuple[str, ...] = ("text", "prompt", "prompt_completion", "preference", "rating", "binary")

REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "rating": ("prompt", "completion", "rating"),
    "binary": ("prompt", "completion", "label"),
}
ROLES = ("system", "user", "assistant", "tool")


def is_conversation(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def detect_format(row: dict) -> Format:
    """The format of one row, from the fields it has (most specific first)."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object (dict), got {type(row).__name__}")
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "rating"} <= keys:
        return "rating"
    if {"prompt", "completion", "label"} <= keys:
        return "binary"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys or "messages" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    raise ValueError(f"cannot tell the format from the fields {sorted(keys)}; expected one of: "
                     + "; ".join(f"{f}: {', '.join(REQUIRED[f])}" for f in FORMATS))


def _check_text(name: str, value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if is_conversation(value):
        for i, m in enumerate(value):
            if m.get("role") not in ROLES:
                return f"{name}[{i}] has role {m.get('role')!r} (expected one of {ROLES})"
            if not isinstance(m.get("content"), str):
                return f"{name}[{i}] has no string 'content'"
        return None
    return f"{name} must be a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}"


def check_row(row: dict, fmt: Format) -> str | None:
    """Why ``row`` is not a valid row of ``fmt``, or None when it is."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    if fmt == "text" and "text" not in row and "messages" in row:
        return _check_text("messages", row["messages"])
    missing = [k for k in REQUIRED[fmt] if k not in row or row[k] is None]
    if missing:
        return f"missing field(s) {missing} for format {fmt!r} (needs {list(REQUIRED[fmt])})"
    for name in ("text", "prompt", "completion", "chosen", "rejected"):
        if name in row and row[name] is not None:
            why = _check_text(name, row[name])
            if why:
                return why
    if fmt == "rating":
        r = row["rating"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != r:
            return f"rating must be a number, got {r!r}"
    if fmt == "binary" and not isinstance(row["label"], bool) and row["label"] not in (0, 1):
        return f"label must be true/false (or 0/1), got {row['label']!r}"
    if fmt == "preference":
        if "margin" in row and row["margin"] is not None and (
                isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))):
            return f"margin must be a number, got {row['margin']!r}"
        if "prompt" not in row and not (is_conversation(row["chosen"]) and is_conversation(row["rejected"])):
            return "a preference row without 'prompt' must hold conversations in chosen / rejected (implicit prompt)"
    return None


def split_implicit_prompt(row: dict) -> dict:
    """A preference row without ``prompt`` (TRL's implicit prompt: both conversations share their
    first turns) -> one with ``prompt`` = the shared turns and the answers after them."""
    if "prompt" in row:
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
