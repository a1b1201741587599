"""Row loops of the targets kernel, compiled by Numba (``nogil``: Beam's worker threads run them at once).

At k 1024 a numpy formulation of "group a row's neighbours by next token" needs a per-row sort and half a
dozen full passes over the [rows, k] block: about a third of the time of the search itself. Here each row
is one pass: a small open-addressing table sums the weights per token in neighbour order, and the tokens
that pass the keep rule's floor are ranked by one sort of int64 keys. When the neighbours themselves are not
kept, ``search_distributions`` goes straight from a search's raw result (dropping the query itself and
looking up each neighbour's next token on the way): one pass and no [rows, k] intermediate arrays.
Compiled once per machine (Numba's cache).
"""
from __future__ import annotations

import numba
import numpy as np

from memforge.pipelines.neighbour_lists import MISSING

_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: token ids are small, dense integers


@numba.njit(inline="always")
def _copy_run(dists, ids, row, start, stop, kept, out_dists, out_ids):
    """Copy row ``row``'s columns [start, stop) to the outputs from column ``kept`` on; return the new ``kept``."""
    out_ids[row, kept:kept + stop - start] = ids[row, start:stop]
    out_dists[row, kept:kept + stop - start] = dists[row, start:stop]
    return kept + stop - start


@numba.njit(inline="always")
def _dropped(ids, drop, flagged, own, row, column):
    """Whether entry (row, column) of a search goes: missing, the query's own id, or flagged in ``drop``."""
    found = ids[row, column]
    return found == MISSING or found == own or (flagged and drop[row, column])


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
            if _dropped(ids, drop, flagged, own, row, column):
                kept = _copy_run(dists, ids, row, run, column, kept, out_dists, out_ids)
                run = column + 1
            column += 1
        kept = _copy_run(dists, ids, row, run, column, kept, out_dists, out_ids)
        out_ids[row, kept:] = MISSING
        out_dists[row, kept:] = np.inf


@numba.njit(inline="always")
def _bucket_of(token, stamp, shift, table_row):
    """The bucket of ``token`` in row ``stamp``'s table: where it is, or the free bucket where it goes."""
    size = table_row.shape[0]
    key = (stamp << 32) | token  # the bucket's owner row and token in one word
    bucket = (np.uint64(token) * _HASH) >> shift
    while table_row[bucket] >> 32 == stamp and table_row[bucket] != key:
        bucket = (bucket + np.uint64(1)) & np.uint64(size - 1)
    return bucket


@numba.njit(inline="always")
def _row_distribution(dists, values, count, stamp, scale, rule, scratch, out_tokens, out_probs):
    """One row's sparse distribution from its first ``count`` (distance, value) entries (value -1: none) into
    ``out_tokens``/``out_probs`` (padded with -1 / 0); returns the probability mass left out. Tokens are summed
    in an open-addressing table whose buckets hold (``stamp`` << 32) | token: a distinct ``stamp`` per row
    makes the previous rows' buckets free without clearing them. The tokens that pass ``rule``'s floor are
    sorted once by rank (float32 probability descending, then token id) as one int64 key each, and kept in
    that order while within its width and below its mass. ``scratch``: ``_scratch``'s buffers."""
    shift, table_segment, table_row, segment_token, segment_mass, ranked, p32 = scratch
    width, min_prob, mass = rule
    nearest = np.float32(np.inf)
    for column in range(count):
        if values[column] != MISSING and dists[column] < nearest:
            nearest = dists[column]
    if nearest == np.inf:
        nearest = np.float32(0.0)
    segments = 0
    for column in range(count):
        token = values[column]
        if token == MISSING:
            continue
        weight = np.exp((dists[column] - nearest) / scale)
        bucket = _bucket_of(token, stamp, shift, table_row)
        if table_row[bucket] == (stamp << 32) | token:
            segment_mass[table_segment[bucket]] += weight
        else:
            table_row[bucket], table_segment[bucket] = (stamp << 32) | token, segments
            segment_token[segments], segment_mass[segments] = token, weight
            segments += 1
    total = 0.0
    for segment in range(segments):
        total += segment_mass[segment]
    candidates = 0
    for segment in range(segments):
        if segment_mass[segment] == 0.0 or segment_mass[segment] / total < min_prob:
            continue
        p32[0] = segment_mass[segment] / total
        # non-negative float32 bits grow with the value: 0x7FFFFFFF - bits ranks the most probable first
        ranked[candidates] = ((np.int64(0x7FFFFFFF) - np.int64(p32.view(np.uint32)[0])) << 32) | segment_token[segment]
        candidates += 1
    ranked[:candidates].sort()
    kept, stored = 0, 0.0
    while kept < min(candidates, width) and stored < mass:
        token = ranked[kept] & 0xFFFFFFFF
        p = segment_mass[table_segment[_bucket_of(token, stamp, shift, table_row)]] / total
        out_tokens[kept], out_probs[kept] = token, p
        stored += p
        kept += 1
    out_tokens[kept:] = MISSING
    out_probs[kept:] = 0.0
    return min(max(1.0 - stored, 0.0), 1.0) if total > 0.0 else 0.0


@numba.njit(inline="always")
def _scratch(k):
    """A row's working buffers for ``_row_distribution`` at ``k`` entries: the token table (the smallest power
    of two of at least 2k buckets, so at most half full) and its hash shift, the per-token sums, the rank keys
    and a float32's bits."""
    bits = 1
    while (1 << bits) < 2 * k:
        bits += 1
    table_segment = np.empty(1 << bits, np.int32)
    table_row = np.full(1 << bits, -1, np.int64)  # (row << 32) | token of the bucket's owner; -1: never used
    return (np.uint64(64 - bits), table_segment, table_row, np.empty(k, np.int64), np.empty(k, np.float64),
            np.empty(k, np.int64), np.empty(1, np.float32))


@numba.njit(nogil=True, cache=True)
def sparse_distributions(dists, values, temperature, rule, out_tokens, out_probs, out_truncated):
    """Per row: float32 weights exp(-(d - d_nearest) / T), summed per value token in float64 (in neighbour
    order), normalised; the tokens ``rule`` (width, floor, mass) keeps, most probable first, into
    ``out_tokens``/``out_probs`` (padding -1 / 0) and the probability mass left out into ``out_truncated``.
    Tokens whose weight sum is 0 are not stored."""
    n, k = values.shape
    scratch = _scratch(k)
    scale = np.float32(-temperature)
    for row in range(n):
        out_truncated[row] = _row_distribution(dists[row], values[row], k, row, scale, rule, scratch,
                                               out_tokens[row], out_probs[row])


@numba.njit(nogil=True, cache=True)
def search_distributions(dists, ids, token_of, own_first, drop, k, temperature, rule, out_tokens, out_probs,
                         out_truncated):
    """``drop_entries``, the value lookup and ``sparse_distributions`` in one pass over a search's raw
    [rows, columns] result: each row's first ``k`` entries that are neither missing, nor its own id, nor
    flagged in ``drop``, with their values from ``token_of`` (the datastore's next tokens), give the same
    distribution as those three steps, without their three [rows, k] intermediate arrays."""
    n, columns = ids.shape
    flagged = drop.shape[0] > 0
    scratch = _scratch(k)
    row_dists, row_values = np.empty(k, np.float32), np.empty(k, np.int64)
    scale = np.float32(-temperature)
    for row in range(n):
        own = own_first + row if own_first >= 0 else MISSING
        kept = 0
        for column in range(columns):
            if kept == k:
                break
            if _dropped(ids, drop, flagged, own, row, column):
                continue
            row_dists[kept], row_values[kept] = dists[row, column], token_of[ids[row, column]]
            kept += 1
        out_truncated[row] = _row_distribution(row_dists, row_values, kept, row, scale, rule, scratch,
                                               out_tokens[row], out_probs[row])
