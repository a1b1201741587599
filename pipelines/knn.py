"""kNN-LM arithmetic on whole batches (numpy, no per-row Python loop, no [rows, vocab] buffer).

Distances are FAISS's squared L2. A row's distribution is p(v) ∝ Σ_{neighbours j with value v}
exp(-d_j / T), stored sparsely: the ``width`` most probable tokens (ties: lower token id first),
padded with (-1, 0), plus the probability mass cut off.
"""
from __future__ import annotations

import numpy as np

MISSING = -1


def drop_ids(dists: np.ndarray, ids: np.ndarray, drop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove the entries flagged in ``drop`` (e.g. the query's own id) from each row, keeping order,
    and return the first ``k`` of the rest (padded with id -1, distance inf)."""
    keep = ~drop & (ids != MISSING)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their original order
    ids = np.take_along_axis(np.where(keep, ids, MISSING), order, axis=1)[:, :k]
    dists = np.take_along_axis(np.where(keep, dists, np.inf), order, axis=1)[:, :k]
    return np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)


def distributions(dists: np.ndarray, values: np.ndarray, temperature: float,
                  width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse kNN distributions of a batch: (tokens int32 [n, width], probs float32 [n, width], truncated [n]).

    ``values`` holds each neighbour's next token (-1 where there is no neighbour).
    """
    n, k = values.shape
    valid = values != MISSING
    logits = np.where(valid, -dists.astype(np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    # Group equal tokens: sort each row by token, start a segment where the token changes.
    order = np.argsort(np.where(valid, values, np.iinfo(np.int64).max), axis=1, kind="stable")
    tokens = np.take_along_axis(values, order, axis=1)
    weights = np.take_along_axis(weights, order, axis=1)
    starts = np.ones((n, k), dtype=bool)
    starts[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    segment = np.cumsum(starts, axis=1) - 1
    flat = (np.arange(n)[:, None] * k + segment).ravel()
    mass = np.bincount(flat, weights=weights.ravel(), minlength=n * k).reshape(n, k)
    segment_tokens = np.full((n, k), MISSING, dtype=np.int64)
    np.put_along_axis(segment_tokens, segment, tokens, axis=1)
    segment_tokens[mass == 0] = MISSING
    total = mass.sum(axis=1, keepdims=True)
    probs = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)
    # Most probable first; among equal probabilities the lower token id (segments are token-sorted).
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :width]
    out_tokens = np.take_along_axis(segment_tokens, ranked, axis=1)
    out_probs = np.take_along_axis(probs, ranked, axis=1)
    pad = width - out_tokens.shape[1]
    if pad > 0:
        out_tokens = np.pad(out_tokens, ((0, 0), (0, pad)), constant_values=MISSING)
        out_probs = np.pad(out_probs, ((0, 0), (0, pad)))
    out_probs = np.where(out_tokens == MISSING, 0.0, out_probs)
    truncated = np.where(total[:, 0] > 0, 1.0 - out_probs.sum(axis=1), 0.0)
    return out_tokens.astype(np.int32), out_probs.astype(np.float32), np.clip(truncated, 0.0, 1.0).astype(np.float32)
