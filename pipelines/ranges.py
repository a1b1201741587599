"""prepare's work plan: each corpus file whole, or a file larger than ``corpus.shard_bytes`` cut into byte ranges.

The planner reads only a window around each nominal cut offset (every ``shard_bytes``), never the file, and cuts
by the rules of ``cuts``: JSONL at a line end; text with ``corpus.document_separator`` at the start of a separator
match; a text stream at a line end where the tokenizer reads both sides as the whole. A stretch with no usable
cut is left uncut (the ranges around it merge); a file with none stays one range. Parquet files stay whole.
"""
from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from typing import Callable

from memforge.pipelines.corpus import SourceFile
from memforge.pipelines.cuts import CONTEXT, line_cut, separator_cut, stream_cut
from memforge.pipelines.documents import separator
from memforge.storage import fs
from memforge.storage.params import CorpusParams

log = logging.getLogger("memforge")
WINDOW = 64 << 10  # bytes read after a nominal cut offset looking for a cut
_BEFORE = 16 * CONTEXT  # bytes read before it, for the context of a check (4 bytes per character at most)


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[start, stop)`` of the corpus file at ``file`` (its index in the file list)."""

    file: int
    start: int
    stop: int


def file_ranges(file: SourceFile, params: CorpusParams, tokenizer: Callable[[], object]) -> list[FileRange]:
    """The ranges ``file`` is read in: one when it fits in ``corpus.shard_bytes`` (or is Parquet, or compressed:
    read from its start only), else cut about every ``shard_bytes`` (``tokenizer()`` gives the tokenizer that
    checks a stream's cuts)."""
    shard_bytes = params.shard_bytes
    if file.format == "parquet" or file.compression or file.taken <= shard_bytes:
        return [FileRange(file.index, 0, file.taken)]
    splitter = separator(params)
    checker = tokenizer() if file.format == "text" and splitter is None else None

    def find(text: str, at: int, end: int) -> int | None:
        if file.format == "jsonl":
            cut = line_cut(text, at)
            return cut if cut is not None and cut <= end else None
        return separator_cut(splitter, text, at, end) if checker is None else stream_cut(checker, text, at, end)
    filesystem, path = fs.filesystem(file.uri)
    cuts, missed = [0], 0
    with filesystem.open(path, "rb") as handle:
        nominal = shard_bytes
        while nominal < file.taken:
            cut = _cut_near(handle, nominal, file.taken, find)
            if cut is None:
                missed += 1
                nominal += shard_bytes
                continue
            cuts.append(cut)
            nominal = cut + shard_bytes
    if missed:
        log.warning("prepare: %s: no usable cut near %d of its nominal cut offsets (every %s bytes): %s",
                    file.uri, missed, f"{shard_bytes:,}", "it is read as one range" if len(cuts) == 1
                    else f"read as {len(cuts)} ranges")
    cuts.append(file.taken)
    return [FileRange(file.index, a, b) for a, b in zip(cuts, cuts[1:])]


def _cut_near(handle, nominal: int, taken: int, find) -> int | None:
    """Byte offset of the first cut ``find`` gives in the window after ``nominal`` (before ``taken``)."""
    first, last = max(0, nominal - _BEFORE), min(taken, nominal + WINDOW)
    handle.seek(first)
    data = handle.read(last - first)
    lead = next((i for i, byte in enumerate(data[:4]) if byte & 0xC0 != 0x80), 0)  # start at a character
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[lead:], final=last == taken)
    except UnicodeDecodeError:  # the worker names the offset
        return None
    at = len(data[lead:nominal - first].decode("utf-8", errors="ignore"))
    cut = find(text, at, len(text) if last == taken else len(text) - CONTEXT)
    if cut is None or cut >= len(text):
        return None
    return first + lead + len(text[:cut].encode())
