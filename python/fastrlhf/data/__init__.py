"""fastrlhf.data: dataset row formats as TRL documents them, loading local files with errors
that name the file and line, and turning rows into token batches (chat templates, completion-only
loss masks, padding, packing with ``cu_seqlens``)."""

from fastrlhf.data.collate import (
    PackedBatch,
    TokenBatch,
    as_conversation,
    collate_pairs,
    encode_pair,
    encode_prompt,
    encode_text,
    pack,
    pad,
)
from fastrlhf.data.formats import FORMATS, Format, check_row, detect_format, is_conversation
from fastrlhf.data.loading import DataError, Rows, Skipped, load_rows

__all__ = ["FORMATS", "Format", "check_row", "detect_format", "is_conversation", "DataError", "Rows", "Skipped",
           "load_rows", "as_conversation", "encode_prompt", "encode_pair", "encode_text", "pad", "TokenBatch",
           "collate_pairs", "PackedBatch", "pack"]
