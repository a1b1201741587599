"""Reading the documents of one byte range of a corpus file in bounded memory.

A text file is one stream (one document) unless ``corpus.document_separator`` splits it (``re.split``
semantics: the matched text is dropped); a JSONL line or a Parquet row is one document. A document is keyed by
the byte offset where it starts in its file (a Parquet row by its index), so its key does not depend on how the
file was cut into ranges.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Callable, Iterator

import pyarrow.parquet as pq

from memforge.pipelines.corpus import CorpusError, SourceFile
from memforge.pipelines.cuts import separator_cut
from memforge.storage import fs
from memforge.storage.params import CorpusParams

READ_BYTES = 1 << 20  # bytes read from a file at a time
SUB_BLOCK = 1 << 16  # characters of text tokenized at a time (a piece is cut at 1 to 2 of these): the tokenizer
                     # holds ~0.5 KB per token of the text it is given while it runs

Piece = tuple[int | None, str, bool]  # (document key, text, whether the document ends with it)


def separator(params: CorpusParams) -> re.Pattern | None:
    """``corpus.document_separator`` compiled (multi-line), or None."""
    return None if params.document_separator is None else re.compile(params.document_separator, re.MULTILINE)


def decoded_blocks(handle, file: SourceFile, start: int, stop: int, whole: bool = True) -> Iterator[str]:
    """The UTF-8 text of bytes ``[start, stop)`` of ``file`` (open as ``handle``), a block at a time; NUL bytes
    and invalid UTF-8 are a CorpusError naming the byte offset. ``whole``: ``stop`` ends a character (else a
    character cut by ``stop`` is left out)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    if handle.tell() != start:  # a compressed file is read from its start, never sought
        handle.seek(start)
    offset = start
    while offset < stop:
        data = handle.read(min(READ_BYTES, stop - offset))
        if not data:
            break
        nul = data.find(b"\0")
        if nul >= 0:
            raise CorpusError(f"{file.uri}: binary data (NUL byte at byte offset {offset + nul}); "
                              "set corpus.on_decode_error: skip to skip such files")
        held = len(decoder.getstate()[0])
        try:
            text = decoder.decode(data, final=whole and offset + len(data) >= stop)
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{file.uri}: not valid UTF-8 at byte offset {offset - held + exc.start}; "
                              "set corpus.on_decode_error: skip to skip such files") from None
        offset += len(data)
        yield text


def text_pieces(blocks: Iterator[str], start: int, splitter: re.Pattern | None, cut: Callable[[str, int], int | None],
                first_key: int | None, ends_document: bool) -> Iterator[Piece]:
    """The documents of a text range starting at byte ``start``, as pieces of about ``SUB_BLOCK`` characters.

    Text is handed on a block at a time, cut at a checked separator match (``cuts.separator_cut``) or, in a
    stretch without separator matches (a stream, a long document), where ``cut(text, at)`` says.
    ``first_key``: the document the range's text begins in (None: one that began before the range; its text
    before the first separator match comes with key None). ``ends_document``: whether the range's end ends
    its last document (a separator file, or a stream's end)."""
    buffer, key, exhausted, at = "", first_key, False, SUB_BLOCK
    while True:
        while not exhausted and len(buffer) < at + SUB_BLOCK:
            block = next(blocks, None)
            exhausted, buffer = block is None, buffer + (block or "")
        if exhausted and len(buffer) <= at + SUB_BLOCK:
            yield from _split(buffer, start, key, splitter, ends_document)[0]
            return
        window = buffer[:at + SUB_BLOCK]  # a cut is looked for in its last SUB_BLOCK characters
        end = (separator_cut(splitter, window, at) or separator_cut(splitter, window, 1)) if splitter else None
        at_separator = end is not None
        if not at_separator and (splitter is None or not splitter.search(window, 1)):  # inside one long document
            end = cut(window, at)
        if not end:  # no cut in this stretch: look further on
            at += SUB_BLOCK
            continue
        pieces, key = _split(buffer[:end], start, key, splitter, at_separator)
        yield from pieces
        key = None if at_separator else key  # the next block starts with the separator match
        start += len(buffer[:end].encode())
        buffer, at = buffer[end:], SUB_BLOCK


def _split(text: str, start: int, key: int | None, splitter: re.Pattern | None,
           ends: bool) -> tuple[list[Piece], int | None]:
    """``text`` (at byte ``start``, continuing document ``key``) cut at its separator matches, the matched text
    dropped; its last piece ends its document when ``ends``. Returns the pieces and the last document's key."""
    pieces, position, byte = [], 0, start
    for match in splitter.finditer(text) if splitter else ():
        pieces.append((key, text[position:match.start()], True))
        byte += len(text[position:match.end()].encode())
        key, position = byte, match.end()
    pieces.append((key, text[position:], ends))
    return [piece for piece in pieces if piece[0] is not None or piece[1]], key


def jsonl_documents(handle, file: SourceFile, start: int, stop: int, params: CorpusParams
                    ) -> Iterator[tuple[int, str | None]]:
    """(byte offset, text) of each JSONL line in ``[start, stop)``; text is None for a skipped undecodable line,
    "" for a blank one."""
    if handle.tell() != start:  # a compressed file is read from its start, never sought
        handle.seek(start)
    offset, number = start, 1 if start == 0 else None
    while offset < stop:
        line = handle.readline()
        if not line:
            break
        where = f"{file.uri} line {number}" if number else f"{file.uri}: the line at byte offset {offset}"
        text = _decode_line(line, where, offset, params.on_decode_error)
        if text is None or not text.strip():
            yield offset, text if text is None else ""
        else:
            yield offset, _field(text, f"{where} (byte offset {offset})" if number else where, params.text_field)
        offset += len(line)
        number = number and number + 1


def _decode_line(line: bytes, where: str, offset: int, on_error: str) -> str | None:
    nul = line.find(b"\0")
    try:
        if nul >= 0:
            raise CorpusError(f"{where}: binary data (NUL byte at byte offset {offset + nul}); "
                              "set corpus.on_decode_error: skip to skip such files")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{where}: not valid UTF-8 at byte offset {offset + exc.start}; "
                              "set corpus.on_decode_error: skip to skip such files") from None
    except CorpusError:
        if on_error == "skip":
            return None
        raise


def _field(text: str, where: str, field: str) -> str:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise CorpusError(f"{where}: no string field {field!r}")
    return record[field]


def parquet_documents(file: SourceFile, params: CorpusParams) -> Iterator[tuple[int, str]]:
    """(row index, text) of each row of a Parquet file (read a row group at a time), up to ``file.limit``
    bytes of text."""
    filesystem, path = fs.filesystem(file.uri)
    budget, row = file.limit, 0
    try:
        batches = pq.ParquetFile(filesystem.open(path, "rb")).iter_batches(columns=[params.text_field])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise CorpusError(f"{file.uri}: row {row}: {params.text_field!r} is not a string")
                if budget is not None:
                    budget -= len((text or "").encode())
                    if budget < 0:  # corpus.max_bytes cuts the file before this row
                        return
                yield row, text or ""
                row += 1
    except (KeyError, ValueError, OSError) as exc:
        raise CorpusError(f"{file.uri}: cannot read column {params.text_field!r} from Parquet: {exc}") from None
