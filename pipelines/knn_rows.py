"""Row loops of the targets kernel, compiled by Numba (``nogil``: Beam's worker threads run them at once).

At k 1024 a numpy formulation of "group a row's neighbours by next token" needs a per-row sort and half a
dozen full passes over the [rows, k] block: about a third of the time of the search itself. Here each row
is one pass: a small open-addressing table sums the weights per token in neighbour order, and the ``width``
most probable tokens are kept by insertion into a sorted list. Compiled once per machine (Numba's cache).
"""
from __future__ import annotations

import numba
import numpy as np

from pipelines.neighbour_lists import MISSING

_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: token ids are small, dense integers


@numba.njit(inline="always")
def _copy_run(dists, ids, row, start, stop, kept, out_dists, out_ids):
    """Copy row ``row``'s columns [start, stop) to the outputs from column ``kept`` on; return the new ``kept``."""
    out_ids[row, kept:kept + stop - start] = ids[row, start:stop]
    out_dists[row, kept:kept + stop - start] = dists[row, start:stop]
    return kept + stop - start


@numba.njit(nogil=True, cache=True)
def drop_entries(dists, ids, own_first, drop, k, out_dists, out_ids):
    """Copy each row's entries that are neither missing, nor the row's own id (``own_first + row``; none when
    ``own_first`` < 0), nor flagged in ``drop`` (a [rows, columns] mask, or shape (0, 0) for none), in order,
    into the first ``k`` columns of the outputs; pad the rest with (inf, -1). The kept runs between dropped
    entries are copied whole (a row typically has one dropped entry: itself)."""
    flagged = drop.shape[0] > 0
    for row in range(ids.shape[0]):
        own = own_first + row if own_first >= 0 else MISSING
        kept, run, column = 0, 0, 0
        while column < ids.shape[1] and kept + column - run < k:
            found = ids[row, column]
            if found == MISSING or found == own or (flagged and drop[row, column]):
                kept = _copy_run(dists, ids, row, run, column, kept, out_dists, out_ids)
                run = column + 1
            column += 1
        kept = _copy_run(dists, ids, row, run, column, kept, out_dists, out_ids)
        out_ids[row, kept:] = MISSING
        out_dists[row, kept:] = np.inf


@numba.njit(inline="always")
def _ranks_before(p_a, token_a, p_b, token_b):
    """Rank order of the stored distribution: higher float32 probability first, then the lower token id."""
    return p_a > p_b or (p_a == p_b and token_a < token_b)


@numba.njit(nogil=True, cache=True)
def sparse_distributions(dists, values, temperature, width, out_tokens, out_probs, out_truncated):
    """Per row: float32 weights exp(-(d - d_nearest) / T), summed per value token in float64 (in neighbour
    order), normalised; the ``width`` most probable tokens into ``out_tokens``/``out_probs`` (padding -1 / 0)
    and the probability mass left out into ``out_truncated``. Tokens whose weight sum is 0 are not stored."""
    n, k = values.shape
    bits = 1
    while (1 << bits) < 2 * k:
        bits += 1
    size = 1 << bits
    shift = np.uint64(64 - bits)
    table_token = np.empty(size, np.int64)
    table_segment = np.empty(size, np.int32)
    table_row = np.full(size, -1, np.int64)  # which row last used a bucket: no clearing between rows
    segment_token = np.empty(k, np.int64)
    segment_mass = np.empty(k, np.float64)
    best_token = np.empty(width, np.int64)
    best_p32 = np.empty(width, np.float32)
    best_p = np.empty(width, np.float64)
    scale = np.float32(-temperature)
    for row in range(n):
        nearest = np.float32(np.inf)
        for column in range(k):
            if values[row, column] != MISSING and dists[row, column] < nearest:
                nearest = dists[row, column]
        if nearest == np.inf:
            nearest = np.float32(0.0)
        segments = 0
        for column in range(k):
            token = values[row, column]
            if token == MISSING:
                continue
            weight = np.exp((dists[row, column] - nearest) / scale)
            bucket = (np.uint64(token) * _HASH) >> shift
            while table_row[bucket] == row and table_token[bucket] != token:
                bucket = (bucket + np.uint64(1)) & np.uint64(size - 1)
            if table_row[bucket] == row:
                segment_mass[table_segment[bucket]] += weight
            else:
                table_row[bucket], table_token[bucket], table_segment[bucket] = row, token, segments
                segment_token[segments], segment_mass[segments] = token, weight
                segments += 1
        total = 0.0
        for segment in range(segments):
            total += segment_mass[segment]
        kept = 0
        for segment in range(segments):
            if segment_mass[segment] == 0.0:
                continue
            p = segment_mass[segment] / total
            p32, token = np.float32(p), segment_token[segment]
            if kept == width and not _ranks_before(p32, token, best_p32[width - 1], best_token[width - 1]):
                continue
            slot = min(kept, width - 1)
            while slot > 0 and _ranks_before(p32, token, best_p32[slot - 1], best_token[slot - 1]):
                best_p32[slot], best_token[slot] = best_p32[slot - 1], best_token[slot - 1]
                best_p[slot] = best_p[slot - 1]
                slot -= 1
            best_p32[slot], best_token[slot], best_p[slot] = p32, token, p
            kept = min(kept + 1, width)
        stored = 0.0
        for slot in range(width):
            if slot < kept:
                out_tokens[row, slot], out_probs[row, slot] = best_token[slot], best_p[slot]
                stored += best_p[slot]
            else:
                out_tokens[row, slot], out_probs[row, slot] = MISSING, 0.0
        out_truncated[row] = min(max(1.0 - stored, 0.0), 1.0) if total > 0.0 else 0.0
