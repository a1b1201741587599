"""Neighbour lists of whole batches (numpy, no per-row Python loop): padding, ordering by distance.

Distances are FAISS's squared L2; a missing neighbour is id -1 at distance inf. Per-row orderings are
plain ``np.sort`` calls on packed 64-bit keys, the fastest sort numpy has; equal distances are ordered by
id, so a list never depends on the order a search returned its candidates in.
"""
from __future__ import annotations

import numpy as np

MISSING = -1
_ID_BITS = 32  # a non-negative float32 (31 bits) above id + 1 (32 bits): one int64
_PACKED_IDS = (1 << _ID_BITS) - 1  # the id field's mask; ids below it are packed


def pad_to_k(dists: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at least ``k`` columns (padding: id -1, distance inf), as contiguous float32 / int64."""
    missing = k - ids.shape[1]
    if missing > 0:
        dists = np.pad(dists, ((0, 0), (0, missing)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=MISSING)
    return np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def sort_by_distance(dists: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by ascending (distance, id): non-negative float32 distances, equal ones in id order,
    missing entries (id -1, distance inf) last; whatever order the search gave them in, the same lists.
    Each (distance bits, id + 1) pair is packed into one int64, so a plain ``np.sort`` orders both at
    once and both are read back from the packed keys; ids of 2**32 - 1 or more need 2 sorts (ids, then
    distances, stably)."""
    dists = np.ascontiguousarray(dists, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and ids.max() >= _PACKED_IDS:
        by_id = np.argsort(ids, axis=1, kind="stable")
        order = np.take_along_axis(by_id, np.argsort(np.take_along_axis(dists, by_id, axis=1), axis=1,
                                                     kind="stable"), axis=1)
        return np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)
    packed = dists.view(np.int32).astype(np.int64) << _ID_BITS
    packed |= ids + 1
    packed.sort(axis=1)
    return (packed >> _ID_BITS).astype(np.int32).view(np.float32), (packed & _PACKED_IDS) - 1
