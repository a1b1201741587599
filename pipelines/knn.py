"""kNN-LM arithmetic on whole batches (numpy, no per-row Python loop, no [rows, vocab] buffer).

Distances are FAISS's squared L2. A row's distribution is p(v) ∝ Σ_{neighbours j with value v}
exp(-d_j / T), stored sparsely: the ``width`` most probable tokens, padded with (-1, 0), plus the
probability mass cut off. Ties in the stored (float32) probability put the lower token id first.
Per-row orderings are plain ``np.sort`` calls on packed 64-bit keys, the fastest sort numpy has.
"""
from __future__ import annotations

import numpy as np

MISSING = -1
_NO_TOKEN = np.iinfo(np.int32).max  # sorts after every real token id


def _column_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def _first_columns(sort_key: np.ndarray, k: int) -> np.ndarray:
    """Column order of each row by ``sort_key`` (non-negative ints below 2**32), ties in column order;
    the first ``k`` columns. Packing (key, column) into one int64 makes a plain ``np.sort`` stable and fast."""
    bits = _column_bits(sort_key.shape[1])
    packed = (sort_key.astype(np.int64) << bits) | np.arange(sort_key.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    return (packed[:, :k] & ((1 << bits) - 1)).astype(np.intp)


def pad_to_k(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at least ``k`` columns (padding: id -1, distance inf), as contiguous float32 / int64."""
    missing = k - ids.shape[1]
    if missing > 0:
        dists = np.pad(dists, ((0, 0), (0, missing)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=MISSING)
    return np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def drop_ids(dists: np.ndarray, ids: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove the entries flagged in ``drop`` (e.g. the query's own id) from each row, keeping order,
    and return the first ``k`` of the rest (padded with id -1, distance inf)."""
    keep = ~drop & (ids != MISSING)
    columns = _first_columns(~keep, k)  # kept entries first, in their original order
    ids = np.take_along_axis(np.where(keep, ids, MISSING), columns, axis=1)
    dists = np.take_along_axis(np.where(keep, dists, np.inf), columns, axis=1)
    return pad_to_k(dists, ids, k)


def sort_by_distance(dists: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reorder each row by ascending distance (non-negative float32; ties keep their order), and
    ``columns`` (e.g. ids, values) the same way."""
    order = _first_columns(np.ascontiguousarray(dists, dtype=np.float32).view(np.int32), dists.shape[1])
    return tuple(np.take_along_axis(a, order, axis=1) for a in (dists, *columns))


def distributions(dists: np.ndarray, values: np.ndarray, temperature: float,
                  width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse kNN distributions of a batch: (tokens int32 [n, width], probs float32 [n, width], truncated [n]).

    ``values`` holds each neighbour's next token (-1 where there is no neighbour).
    """
    n, k = values.shape
    valid = values != MISSING
    logits = dists.astype(np.float64) / -temperature
    logits[~valid] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    weights = np.exp(logits - top)  # 0 where there is no neighbour
    # Group equal tokens: sort each row by (token, column) packed into one int64, then segment.
    bits, columns = _column_bits(k), np.arange(k, dtype=np.int64)
    key = (np.where(valid, values, _NO_TOKEN).astype(np.int64) << bits) | columns
    key.sort(axis=1)
    tokens = key >> bits
    weights = np.take_along_axis(weights, key & ((1 << bits) - 1), axis=1)
    starts = np.ones((n, k), dtype=bool)
    starts[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    slot = np.cumsum(starts, axis=1) - 1 + (np.arange(n, dtype=np.int64) * k)[:, None]
    mass = np.bincount(slot.ravel(), weights=weights.ravel(), minlength=n * k).reshape(n, k)
    segment_tokens = np.full((n, k), MISSING, dtype=np.int64)
    segment_tokens.ravel()[slot[starts]] = tokens[starts]
    segment_tokens[mass == 0] = MISSING
    total = mass.sum(axis=1, keepdims=True)
    probs = mass / np.where(total > 0, total, 1.0)
    # Most probable first, then the lower token id (segments are in token order).
    ranked = _first_columns(~probs.astype(np.float32).view(np.uint32), width)
    out_tokens = np.take_along_axis(segment_tokens, ranked, axis=1)
    out_probs = np.where(out_tokens == MISSING, 0.0, np.take_along_axis(probs, ranked, axis=1))
    pad = width - out_tokens.shape[1]
    if pad > 0:
        out_tokens = np.pad(out_tokens, ((0, 0), (0, pad)), constant_values=MISSING)
        out_probs = np.pad(out_probs, ((0, 0), (0, pad)))
    truncated = np.where(total[:, 0] > 0, 1.0 - out_probs.sum(axis=1), 0.0)
    return out_tokens.astype(np.int32), out_probs.astype(np.float32), np.clip(truncated, 0.0, 1.0).astype(np.float32)
