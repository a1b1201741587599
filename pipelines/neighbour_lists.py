"""Neighbour lists of whole batches (numpy, no per-row Python loop): padding, ordering by distance.

Distances are FAISS's squared L2; a missing neighbour is id -1 at distance inf. Per-row orderings are
plain ``np.sort`` calls on packed 64-bit keys, the fastest sort numpy has.
"""
from __future__ import annotations

import numpy as np

MISSING = -1


def pad_to_k(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at least ``k`` columns (padding: id -1, distance inf), as contiguous float32 / int64."""
    missing = k - ids.shape[1]
    if missing > 0:
        dists = np.pad(dists, ((0, 0), (0, missing)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=MISSING)
    return np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def sort_by_distance(dists: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reorder each row by ascending distance (non-negative float32; ties keep their order), and
    ``columns`` (e.g. ids, values) the same way. Each (distance bits, column) pair is packed into one int64,
    so a plain ``np.sort`` is stable; the sorted distances are read back from the packed keys (their upper
    bits are the float's bits), which spares a gather."""
    width = dists.shape[1]
    bits = max(1, (width - 1).bit_length())
    packed = np.ascontiguousarray(dists, dtype=np.float32).view(np.int32).astype(np.int64) << bits
    packed |= np.arange(width, dtype=np.int64)
    packed.sort(axis=1)
    order = (packed & ((1 << bits) - 1)).astype(np.intp)
    ordered = (packed >> bits).astype(np.int32).view(np.float32)
    return (ordered, *(np.take_along_axis(a, order, axis=1) for a in columns))
