"""The targets kernel: kNN distributions of whole batches (numpy, no per-row Python loop, no [rows, vocab]
buffer), and dropping a query's own id from its neighbours.

A row's distribution is p(v) ∝ Σ_{neighbours j with value v} exp(-d_j / T), stored sparsely: the
``width`` most probable tokens, padded with (-1, 0), plus the probability mass cut off. Ties in the
stored (float32) probability put the lower token id first; a token whose float32 weight underflows to 0
(a distance more than ~100·T beyond the nearest) is not stored.
"""
from __future__ import annotations

import numpy as np

from pipelines.neighbour_lists import MISSING, column_bits, first_columns, pad_to_k

_NO_TOKEN = np.iinfo(np.int32).max  # sorts after every real token id


def drop_ids(dists: np.ndarray, ids: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove the entries flagged in ``drop`` (e.g. the query's own id) from each row, keeping order,
    and return the first ``k`` of the rest (padded with id -1, distance inf)."""
    if ids.shape[1] > k and bool(drop[:, 0].all()) and not drop[:, 1:].any() and \
            not (ids[:, 1:k + 1] == MISSING).any():
        return pad_to_k(dists[:, 1:k + 1], ids[:, 1:k + 1], k)  # the usual case: each row's own id came first
    keep = ~drop & (ids != MISSING)
    columns = first_columns(~keep, k)  # kept entries first, in their original order
    ids = np.take_along_axis(np.where(keep, ids, MISSING), columns, axis=1)
    dists = np.take_along_axis(np.where(keep, dists, np.inf), columns, axis=1)
    return pad_to_k(dists, ids, k)


def distributions(dists: np.ndarray, values: np.ndarray, temperature: float,
                  width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse kNN distributions of a batch: (tokens int32 [n, width], probs float32 [n, width], truncated [n]).

    ``values`` holds each neighbour's next token (-1 where there is no neighbour). Weights are float32
    (exp of ``-(d - d_min) / T``), summed per token in float64.
    """
    n, k = values.shape
    valid = values != MISSING
    gaps = np.where(valid, dists, np.inf).astype(np.float32)
    nearest = gaps.min(axis=1, keepdims=True)
    nearest[~np.isfinite(nearest)] = 0.0
    gaps -= nearest  # distance beyond the nearest neighbour: exact where the weights are large
    weights = np.exp(gaps / np.float32(-temperature))  # 0 where there is no neighbour
    # Group equal tokens: sort each row by (token, column) packed into one integer (32 bits when token ids and
    # columns fit, as they do for vocabularies below 2^31 / k), then segment.
    bits = column_bits(k)
    narrow = int(values.max(initial=0)) < (1 << (31 - bits)) - 1
    no_token = (1 << (31 - bits)) - 1 if narrow else _NO_TOKEN  # sorts after every real token id
    key_type = np.int32 if narrow else np.int64
    key = (np.where(valid, values, no_token).astype(key_type) << key_type(bits)) | np.arange(k, dtype=key_type)
    key.sort(axis=1)
    tokens = key >> key_type(bits)
    weights = np.take_along_axis(weights, key & key_type((1 << bits) - 1), axis=1)
    starts = np.ones((n, k), dtype=bool)
    starts[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    local = np.cumsum(starts, axis=1, dtype=np.int32)
    local -= 1
    # Segments of a row are numbered from 0; only the widest row's count of them needs a column.
    columns = int(local[:, -1].max(initial=0)) + 1 if k else 1
    slot = local.astype(np.int64) + (np.arange(n, dtype=np.int64) * columns)[:, None]
    mass = np.bincount(slot.ravel(), weights=weights.ravel(), minlength=n * columns).reshape(n, columns)
    segment_tokens = np.full((n, columns), MISSING, dtype=np.int64)
    segment_tokens.ravel()[slot[starts]] = tokens[starts]
    segment_tokens[mass == 0] = MISSING
    total = mass.sum(axis=1, keepdims=True)
    probs = mass / np.where(total > 0, total, 1.0)
    # Most probable first, then the lower token id (segments are in token order).
    ranked = first_columns(~probs.astype(np.float32).view(np.uint32), min(width, columns))
    out_tokens = np.take_along_axis(segment_tokens, ranked, axis=1)
    out_probs = np.where(out_tokens == MISSING, 0.0, np.take_along_axis(probs, ranked, axis=1))
    pad = width - out_tokens.shape[1]
    if pad > 0:
        out_tokens = np.pad(out_tokens, ((0, 0), (0, pad)), constant_values=MISSING)
        out_probs = np.pad(out_probs, ((0, 0), (0, pad)))
    truncated = np.where(total[:, 0] > 0, 1.0 - out_probs.sum(axis=1), 0.0)
    return out_tokens.astype(np.int32), out_probs.astype(np.float32), np.clip(truncated, 0.0, 1.0).astype(np.float32)
