"""Loading dataset rows from local files, with errors that name the file and line.

JSON Lines (``.jsonl``) and JSON (``.json``: a list of objects, or an object holding one list)
are parsed here, so a bad row is reported as ``file:line``. Parquet, Arrow, CSV and anything
else ``datasets`` loads from a local path go through ``datasets`` (the ``data`` extra) and are
reported as ``file: row N``. Nothing is dropped silently: a malformed row raises, or, with
``skip_invalid=True``, is counted and listed with its reason.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.data.formats import FORMATS, Format, check_row, detect_format, split_implicit_prompt


@dataclass
class Skipped:
    """A row left out with ``skip_invalid=True``."""

    where: str  # "file:line" or "file: row N"
    reason: str


@dataclass
class Rows:
    """Loaded rows (dicts) of one format, and what was skipped."""

    rows: list[dict]
    format: Format
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class DataError(ValueError):
    """A malformed row or file; the message starts with ``file:line``."""


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def _json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding one list; got an object with "
                            f"keys {sorted(data)}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


_DATASETS_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".txt": "text"}


def _datasets(path: Path, split: str) -> Iterator[tuple[str, object]]:
    # the file type is checked first: a wrong suffix is a DataError whether or not datasets is installed
    if not path.is_dir() and path.suffix not in _DATASETS_KINDS:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .jsonl, .json, .parquet, .arrow, .csv, "
                        "or a directory datasets can load)")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} needs the datasets package: pip install 'fastrlhf[data]' "
                          "(JSON and JSON Lines files need nothing extra)") from None
    if path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    else:
        kw = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        ds = datasets.load_dataset(_DATASETS_KINDS[path.suffix], data_files=str(path), split=split, **kw)
    for i, row in enumerate(ds):
        yield f"{path}: row {i}", row


def iter_rows(path: str | Path, *, split: str = "train") -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of a local file; ``row`` is a :class:`DataError` for a line
    that does not parse."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        return _jsonl(path)
    if path.suffix == ".json":
        return _json(path)
    return _datasets(path, split)


def load_rows(source: str | Path | Iterable[dict], *, format: Format | None = None, skip_invalid: bool = False,
              split: str = "train") -> Rows:
    """Rows of one format from a local file (or an iterable of dicts).

    Args:
        source: a path (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``, ``.csv``, a dataset
            directory), or rows already in memory.
        format: the expected format (one of :data:`~fastrlhf.data.formats.FORMATS`); None: detected
            from the first row, and every row must match it.
        skip_invalid: leave malformed rows out (listed in ``Rows.skipped`` with their reasons, and
            counted in a warning) instead of raising.
        split: the split to read from a ``datasets`` directory.

    Returns:
        :class:`Rows` (preference rows with an implicit prompt get an explicit one).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"load_rows: format must be one of {FORMATS}, got {format!r}")
    if isinstance(source, (str, Path)):
        items, name = iter_rows(source, split=split), str(source)
    else:
        items, name = ((f"row {i}", row) for i, row in enumerate(source)), "<rows>"
    rows, skipped = [], []
    for where, row in items:
        why = str(row) if isinstance(row, Exception) else None
        if why is None and format is None:
            try:
                format = detect_format(row)
            except ValueError as e:
                why = str(e)
        if why is None:
            why = check_row(row, format)
        if why is not None:
            if not skip_invalid:
                raise DataError(f"{where}: {why} (pass skip_invalid=True to leave such rows out)")
            skipped.append(Skipped(where, why))
            continue
        rows.append(split_implicit_prompt(row) if format == "preference" else row)
    if skipped:
        warnings.warn(f"load_rows: skipped {len(skipped)} malformed row(s) of {name}; first: {skipped[0].where}: "
                      f"{skipped[0].reason}", stacklevel=2)
    if format is None:
        raise DataError(f"{name}: no rows")
    return Rows(rows, format, skipped, name)
