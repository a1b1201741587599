"""The text a tokenizer is trained on when no model gives one: a bounded, deterministic sample of the train split.

About ``corpus.tokenizer_sample_bytes`` are read, taken evenly across the train files (each in proportion to its
size) as blocks of ``BLOCK`` bytes spread evenly through it, and handed on in pieces of at most ``PIECE``
characters cut at whitespace, never as one giant string. A corpus smaller than the sample is read whole.
"""
from __future__ import annotations

import logging
from typing import Iterator

from memforge.pipelines.corpus import CorpusError, SourceFile, document_split
from memforge.pipelines.documents import (
    decoded_blocks,
    jsonl_documents,
    parquet_documents,
    separator,
    text_pieces,
)
from memforge.storage.params import CorpusParams

log = logging.getLogger("memforge")
BLOCK = 1 << 20  # bytes read at one place of a file
PIECE = 1 << 20  # characters handed to the trainer at once


def sample_texts(files: list[SourceFile], params: CorpusParams) -> Iterator[str]:
    """Pieces of train-split text, about ``params.tokenizer_sample_bytes`` in all; logs the bytes read."""
    train = [f for f in files if f.split in (None, "train")]
    total = sum(f.taken for f in train)
    budget = min(params.tokenizer_sample_bytes, total)
    log.info("prepare: tokenizer sample: %s of the train split's %s bytes, from %d files", f"{budget:,}",
             f"{total:,}", len(train))
    read, reported = 0, 0
    for file in train:
        share = file.taken if budget == total else file.taken * budget // max(total, 1)
        for start, stop in ([(0, share)] if file.compression else _blocks(file.taken, share)):  # read in order
            for text in _train_documents(file, start, stop, params):
                yield from _pieces(text)
            read += stop - start
            if read - reported >= 16 * BLOCK:
                log.info("prepare: tokenizer sample: %s / %s bytes read", f"{read:,}", f"{budget:,}")
                reported = read
    log.info("prepare: tokenizer sample: %s / %s bytes read", f"{read:,}", f"{budget:,}")


def _blocks(taken: int, share: int) -> list[tuple[int, int]]:
    """``share`` bytes of a file of ``taken`` as blocks spread evenly (contiguous when ``share == taken``)."""
    count = max(1, -(-share // BLOCK))
    starts = [taken * i // count for i in range(count)]
    return [(start, start + share * (i + 1) // count - share * i // count) for i, start in enumerate(starts)]


def _train_documents(file: SourceFile, start: int, stop: int, params: CorpusParams) -> Iterator[str]:
    """The text of the train documents in (the first and last: partly in) bytes ``[start, stop)`` of ``file``."""
    splitter = separator(params)

    def is_train(key: int | None) -> bool:
        if file.split is not None:
            return file.split == "train"
        return key is not None and document_split(file, key, params.validation_fraction) == "train"

    if file.format == "parquet":
        if start == 0:  # its rows from the first, up to its share of the sample
            budget = stop
            for row, text in parquet_documents(file, params):
                budget -= len(text.encode())
                if budget < 0:
                    return
                if is_train(row):
                    yield text
        return
    with file.open() as handle:
        if start and file.format == "jsonl":  # from the first line that starts in the block
            handle.seek(start - 1)
            start += len(handle.readline()) - 1
        elif start:  # from the first character that starts in the block
            handle.seek(start)
            start += next((i for i, byte in enumerate(handle.read(4)) if byte & 0xC0 != 0x80), 0)
        try:
            if file.format == "jsonl":
                for offset, text in jsonl_documents(handle, file, start, max(start, stop), params):
                    if text and is_train(offset):
                        yield text
                return
            first = 0 if start == 0 or splitter is None else None  # None: a document begun before the block
            blocks = decoded_blocks(handle, file, start, stop, whole=False)
            for key, text, _ in text_pieces(blocks, start, splitter, _whitespace_cut, first, True):
                if text.strip() and is_train(0 if splitter is None else key):
                    yield text
        except CorpusError:  # undecodable text, skipped as prepare skips it
            if params.on_decode_error != "skip":
                raise


def _whitespace_cut(text: str, at: int) -> int | None:
    cut = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at))
    return cut + 1 if cut > 0 else None


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``PIECE`` characters, cut after whitespace where there is some."""
    while len(text) > PIECE:
        cut = _whitespace_cut(text, PIECE) or PIECE
        yield text[:cut]
        text = text[cut:]
    yield text
