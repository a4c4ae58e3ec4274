"""Helpers shared by the judges (private to ``fastrlhf.feedback``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fastrlhf.data import is_conversation


def check_lengths(who: str, prompts, *others) -> None:
    """Raise ValueError naming ``who`` when a sequence in ``others`` does not have ``len(prompts)`` items."""
    n = len(prompts)
    for o in others:
        if len(o) != n:
            raise ValueError(f"{who}: got {n} prompts but {len(o)} completions")


def prompt_key(prompt) -> str:
    """The text a reference table is keyed by: a string prompt itself, a conversation's last user turn."""
    if is_conversation(prompt):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def lookup_reference(who: str, reference: Mapping | Callable, prompt):
    """``reference(prompt)`` for a callable; for a mapping, the entry of the prompt (a string
    prompt, or a conversation's last user turn).

    Raises:
        KeyError: a mapping without an entry for the prompt (the message names ``who``).
    """
    if callable(reference):
        return reference(prompt)
    key = prompt_key(prompt)
    if key not in reference:
        raise KeyError(f"{who}: no reference for the prompt {key[:80]!r} ({len(reference)} references given)")
    return reference[key]
