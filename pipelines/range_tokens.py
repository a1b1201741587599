"""The token ids of one work shard's file ranges, per split, as prepare's workers write them.

Each document is tokenized on its own and followed by the end-of-text token; a long document (a stream) is
tokenized a piece at a time, cut where the tokenizer reads both sides as the whole (``cuts.stream_cut``), so the
ids equal those of the document tokenized whole. Ids are kept as int32 arrays, never as one list of a range.
"""
from __future__ import annotations

import numpy as np

from memforge.pipelines.corpus import CorpusError, SourceFile, document_split
from memforge.pipelines.cuts import stream_cut
from memforge.pipelines.documents import (
    decoded_blocks,
    jsonl_documents,
    parquet_documents,
    separator,
    text_pieces,
)
from memforge.pipelines.tokenizer import TokenIds
from memforge.storage.params import CorpusParams
from memforge.storage.paths import TOKEN_SPLITS

DOC_ID_SHIFT = 40  # document id = file index << 40 + the document's byte offset (or Parquet row) in its file


class RangeTokens:
    """Tokens and document ids of the ranges read so far, per split, with document counts."""

    def __init__(self, token_ids: TokenIds, params: CorpusParams):
        self.token_ids, self.params, self.splitter = token_ids, params, separator(params)
        self.eos = token_ids.eos_token_id
        self.parts: dict[str, tuple[list, list]] = {split: ([], []) for split in TOKEN_SPLITS}
        self.stats = {"skipped_documents": 0, "empty_documents": 0, "documents": {s: 0 for s in TOKEN_SPLITS}}

    def read(self, file: SourceFile, start: int, stop: int) -> None:
        """Tokenize the documents of bytes ``[start, stop)`` of ``file`` (a Parquet file: all of it)."""
        if file.format == "parquet":
            for row, text in parquet_documents(file, self.params):
                self._whole(file, row, text)
            return
        if self.params.on_decode_error == "skip" and file.format == "text" and not _decodable(file, start, stop):
            self.stats["skipped_documents"] += 1  # the range is skipped whole (a file of one range: the file)
            return
        with file.open() as handle:
            if file.format == "jsonl":
                for offset, text in jsonl_documents(handle, file, start, stop, self.params):
                    if text is None:
                        self.stats["skipped_documents"] += 1
                    else:
                        self._whole(file, offset, text)
                return
            self._text(file, decoded_blocks(handle, file, start, stop), start, stop)

    def _text(self, file: SourceFile, blocks, start: int, stop: int) -> None:
        """A text range: its documents, or its part of a stream, tokenized a piece at a time."""
        stream = self.splitter is None
        pieces = text_pieces(blocks, start, self.splitter, lambda text, at: stream_cut(self.token_ids, text, at),
                             0 if start == 0 or stream else None, not stream or stop == file.taken)
        open_doc = None  # (key, id arrays, whether it holds more than whitespace)
        for key, text, ends in pieces:
            if key is None:  # before the separator match a range starts with: no document
                if text.strip():
                    raise CorpusError(f"{file.uri}: the range at byte offset {start} does not start at a "
                                      "corpus.document_separator match")
                continue
            key, ids, content = open_doc or (key, [], start > 0 and stream)  # a stream begun in an earlier range
            open_doc = key, ids + [self._ids(text)], content or bool(text.strip())
            if ends:
                self._add(file, *open_doc, ends=True)
                open_doc = None
        if open_doc:  # a stream that goes on in the next range: its end-of-text and count come there
            self._add(file, *open_doc, ends=False)

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.token_ids([text])[0], np.int32)

    def _whole(self, file: SourceFile, key: int, text: str) -> None:
        self._add(file, key, [self._ids(text)] if text.strip() else [], bool(text.strip()), ends=True)

    def _add(self, file: SourceFile, key: int, ids: list[np.ndarray], content: bool, ends: bool) -> None:
        """Append a document (or a stream's part in this range), then its end-of-text token when it ``ends``; one
        that holds only whitespace is counted as empty and left out."""
        if not content:
            self.stats["empty_documents"] += int(ends)
            return
        split = document_split(file, key, self.params.validation_fraction)
        tokens, docs = self.parts[split]
        if ends and self.eos is not None:
            ids = ids + [np.asarray([self.eos], np.int32)]
        tokens.extend(ids)
        docs.append(np.full(sum(len(i) for i in ids), doc_id(file, key), np.int64))
        self.stats["documents"][split] += int(ends)

    def columns(self) -> tuple[dict[str, list[np.ndarray]], dict]:
        """(token ids, document ids) of each split, and the shard's stats."""
        columns, stats = {}, dict(self.stats)
        for split, (tokens, docs) in self.parts.items():
            columns[split] = [np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                              np.concatenate(docs) if docs else np.zeros(0, np.int64)]
            stats[f"{split}_tokens"] = int(len(columns[split][0]))
        stats["rows"] = sum(stats[f"{s}_tokens"] for s in TOKEN_SPLITS)
        return columns, stats


def doc_id(file: SourceFile, key: int) -> int:
    """The token store's document id: the file's index and the document's key (byte offset or row) in it."""
    if key >= 1 << DOC_ID_SHIFT:
        raise CorpusError(f"{file.uri}: a document at byte offset {key:,}: files are read up to "
                          f"{1 << DOC_ID_SHIFT:,} bytes")
    return (file.index << DOC_ID_SHIFT) + key


def _decodable(file: SourceFile, start: int, stop: int) -> bool:
    """Whether bytes ``[start, stop)`` of ``file`` are UTF-8 text without NUL bytes (read a block at a time)."""
    try:
        with file.open() as handle:
            for _ in decoded_blocks(handle, file, start, stop):
                pass
    except CorpusError:
        return False
    return True
