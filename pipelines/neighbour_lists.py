"""Neighbour lists of whole batches (numpy, no per-row Python loop): padding, ordering by distance.

Distances are FAISS's squared L2; a missing neighbour is id -1 at distance inf. Per-row orderings are
plain ``np.sort`` calls on packed 64-bit keys, the fastest sort numpy has.
"""
from __future__ import annotations

import numpy as np

MISSING = -1


def column_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def _sorted_packed(sort_key: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The first ``k`` of each row's (key, column) pairs packed into int64 and sorted, and the column bits.
    Packing makes a plain ``np.sort`` stable and fast; for k below the row width a partition goes first."""
    bits = column_bits(sort_key.shape[1])
    packed = (sort_key.astype(np.int64) << bits) | np.arange(sort_key.shape[1], dtype=np.int64)
    if k < packed.shape[1]:
        packed = np.partition(packed, k - 1, axis=1)[:, :k]
    packed.sort(axis=1)
    return packed, bits


def first_columns(sort_key: np.ndarray, k: int) -> np.ndarray:
    """Column order of each row by ``sort_key`` (non-negative ints below 2**32), ties in column order;
    the first ``k`` columns."""
    packed, bits = _sorted_packed(sort_key, k)
    return (packed & ((1 << bits) - 1)).astype(np.intp)


def pad_to_k(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at least ``k`` columns (padding: id -1, distance inf), as contiguous float32 / int64."""
    missing = k - ids.shape[1]
    if missing > 0:
        dists = np.pad(dists, ((0, 0), (0, missing)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=MISSING)
    return np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def sort_by_distance(dists: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reorder each row by ascending distance (non-negative float32; ties keep their order), and
    ``columns`` (e.g. ids, values) the same way. The sorted distances are read back from the packed keys
    (their upper bits are the float's bits), which spares a gather."""
    packed, bits = _sorted_packed(np.ascontiguousarray(dists, dtype=np.float32).view(np.int32), dists.shape[1])
    order = (packed & ((1 << bits) - 1)).astype(np.intp)
    ordered = (packed >> bits).astype(np.int32).view(np.float32)
    return (ordered, *(np.take_along_axis(a, order, axis=1) for a in columns))
