"""README.md's Python examples run as written, and the results they show in comments are what
they print (a ``print(...)`` whose comment holds ``tensor([...])`` must print that tensor)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def shown_results(block: str) -> list[str]:
    """The ``tensor(...)`` texts in the comments of print lines, in order."""
    out = []
    for line in block.splitlines():
        if line.lstrip().startswith("print(") and "#" in line:
            m = re.search(r"(tensor\(\[.*?\]\))", line.split("#", 1)[1])
            if m:
                out.append(m.group(1))
    return out


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs_and_prints_what_it_shows(index, tmp_path, monkeypatch):
    block = python_blocks()[index]
    monkeypatch.chdir(tmp_path)  # examples may write files (checkpoints)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed = buf.getvalue().splitlines()
    expected = shown_results(block)
    assert len(printed) >= len(expected)
    for want, got in zip(expected, printed):
        assert " ".join(want.split()) == " ".join(got.split()), f"README shows {want}, the code prints {got}"


def test_the_readme_has_examples():
    assert len(python_blocks()) >= 2
