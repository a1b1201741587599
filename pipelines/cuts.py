"""Where a text may be cut so that its pieces read as the whole: the rules shared by prepare's planner (byte
ranges of a large file) and its workers (sub-blocks of a range held in memory).

- a line end (JSONL: each line is a document);
- the start of a ``corpus.document_separator`` match that the text on each side of it matches the same way;
- in a stream (a text without separator), a line end where the tokenizer gives the same ids for the lines
  around it read whole as read in two pieces: BPE pre-tokenizers group whitespace runs differently at a string
  end, and SentencePiece adds a prefix at a string start, so a line end is a cut only where checked.
"""
from __future__ import annotations

import re

from memforge.pipelines.tokenizer import TokenIds

CONTEXT = 128  # characters each side of a candidate cut that checks it
CANDIDATES = 1024  # line ends tried per search before giving up on this stretch of text
BATCH = 32  # line ends checked in one call of the tokenizer


def line_cut(text: str, at: int) -> int | None:
    """The position just after the first line end at or after ``at``."""
    end = text.find("\n", at)
    return None if end < 0 else end + 1


def _around(text: str, cut: int) -> tuple[str, str]:
    """The whole lines within ``CONTEXT`` characters before and after ``cut`` (at most 4 x ``CONTEXT`` each)."""
    first = text.rfind("\n", max(0, cut - 4 * CONTEXT), max(0, cut - CONTEXT)) + 1 if cut > CONTEXT else 0
    last = text.find("\n", cut + CONTEXT, cut + 4 * CONTEXT)
    return text[first or max(0, cut - 4 * CONTEXT):cut], text[cut:len(text) if last < 0 else last + 1]


def joins_cleanly(token_ids: TokenIds, text: str, cut: int) -> bool:
    """Whether the lines around ``cut`` tokenize to the same ids whole as in two pieces."""
    return _clean_cuts(token_ids, text, [cut]) == [cut]


def _clean_cuts(token_ids: TokenIds, text: str, cuts: list[int]) -> list[int]:
    """Those of ``cuts`` where the lines around tokenize to the same ids whole as in two pieces (one call)."""
    sides = [_around(text, cut) for cut in cuts]
    ids = token_ids([piece for before, after in sides for piece in (before + after, before, after)])
    return [cut for i, cut in enumerate(cuts) if ids[3 * i] == ids[3 * i + 1] + ids[3 * i + 2]]


def stream_cut(token_ids: TokenIds, text: str, at: int, end: int | None = None) -> int | None:
    """The first line end at or after ``at`` (and ``CONTEXT`` characters before ``end``, the text's when None)
    where the tokenizer reads the two sides as the whole; None after ``CANDIDATES`` line ends that are not.
    Candidates are checked ``BATCH`` at a time."""
    end = len(text) - CONTEXT if end is None else end
    for _ in range(CANDIDATES // BATCH):
        cuts = []
        while len(cuts) < BATCH and (cut := line_cut(text, at)) is not None and cut <= end:
            cuts.append(cut)
            at = cut
        clean = _clean_cuts(token_ids, text, cuts) if cuts else []
        if clean or len(cuts) < BATCH:
            return clean[0] if clean else None
    return None


def separator_cut(separator: re.Pattern, text: str, at: int, end: int | None = None) -> int | None:
    """The start of the first separator match at or after ``at`` (ending ``CONTEXT`` characters before ``end``)
    that the text before it and the text from it match as the whole does: the pieces re.split gives there are
    those of the whole."""
    end = len(text) - CONTEXT if end is None else end
    whole = [m.span() for m in separator.finditer(text)]
    for start, stop in whole:
        if start < at or start == 0:
            continue
        if stop > end:
            return None
        before = [m.span() for m in separator.finditer(text, 0, start)]
        after = [(a + start, b + start) for a, b in (m.span() for m in separator.finditer(text[start:]))]
        if before + after == whole:
            return start
    return None
