"""The targets kernel: kNN distributions of whole batches (compiled row loops in ``knn_rows``, no
[rows, vocab] buffer), and dropping a query's own id from its neighbours; or both at once, straight from
a search's result, when the neighbours themselves are not kept.

A row's distribution is p(v) ∝ Σ_{neighbours j with value v} exp(-d_j / T), stored sparsely: the tokens
a ``KeepRule`` keeps, most probable first, padded with (-1, 0) to the rule's width, plus the probability
mass not kept. Ties in the stored (float32) probability put the lower token id first; a token whose float32
weight underflows to 0 (a distance more than ~100·T beyond the nearest) is not stored.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class KeepRule(NamedTuple):
    """Which tokens of a row's distribution are stored, most probable first: at most ``width`` (the store's
    width), each with probability ≥ ``min_prob``, stopping once the kept mass reaches ``mass``."""

    width: int
    min_prob: float = 0.0
    mass: float = math.inf

    @classmethod
    def of(cls, k: int, width: int | None = None, min_prob: float | None = None,
           mass: float | None = None) -> "KeepRule":
        """The rule of ``targets.width`` / ``min_prob`` / ``mass`` at ``k`` neighbours (null: no such bound;
        a null width is k, the most distinct tokens a row can have)."""
        return cls(int(width or k), float(min_prob or 0.0), float(mass or math.inf))


def _drop_args(own_first: int | None, drop: np.ndarray | None) -> tuple[int, np.ndarray]:
    """The kernels' form of a query block's first global row (-1: none) and its flags ((0, 0): none)."""
    flags = np.zeros((0, 0), dtype=np.bool_) if drop is None else np.ascontiguousarray(drop, dtype=np.bool_)
    return -1 if own_first is None else int(own_first), flags


def _outputs(n: int, rule: KeepRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' output buffers for ``n`` rows: tokens int32 and probs float32 [n, rule.width], truncated [n]."""
    return (np.empty((n, rule.width), dtype=np.int32), np.empty((n, rule.width), dtype=np.float32),
            np.empty(n, dtype=np.float32))


def drop_ids(dists: np.ndarray, ids: np.ndarray, k: int, own_first: int | None = None,
             drop: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove from each row its own id (row i of a block of queries starting at global row ``own_first`` is
    ``own_first + i``), the entries flagged in ``drop`` and the missing ones, keeping order, and return the
    first ``k`` of the rest (padded with id -1, distance inf) as float32 / int64."""
    from memforge.pipelines import knn_rows  # Numba: compiled (or loaded from its cache) on first use, not on import

    out_dists, out_ids = np.empty((len(ids), k), dtype=np.float32), np.empty((len(ids), k), dtype=np.int64)
    knn_rows.drop_entries(np.ascontiguousarray(dists, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64),
                          *_drop_args(own_first, drop), k, out_dists, out_ids)
    return out_dists, out_ids


def distributions(dists: np.ndarray, values: np.ndarray, temperature: float,
                  rule: KeepRule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse kNN distributions of a batch: (tokens int32 [n, rule.width], probs float32 [n, rule.width],
    truncated [n]).

    ``values`` holds each neighbour's next token (-1 where there is no neighbour). Weights are float32
    (exp of ``-(d - d_min) / T``), summed per token in float64.
    """
    from memforge.pipelines import knn_rows

    tokens, probs, truncated = _outputs(len(values), rule)
    knn_rows.sparse_distributions(np.ascontiguousarray(dists, dtype=np.float32),
                                  np.ascontiguousarray(values, dtype=np.int64), float(temperature), tuple(rule),
                                  tokens, probs, truncated)
    return tokens, probs, truncated


def search_distributions(dists: np.ndarray, ids: np.ndarray, token_of: np.ndarray, k: int, temperature: float,
                         rule: KeepRule, own_first: int | None = None,
                         drop: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``distributions`` of ``drop_ids(dists, ids, k, own_first, drop)`` with values ``token_of[ids]``, in one
    compiled pass over the search's result (same output, bit for bit; no [rows, k] intermediate arrays)."""
    from memforge.pipelines import knn_rows

    tokens, probs, truncated = _outputs(len(ids), rule)
    knn_rows.search_distributions(np.ascontiguousarray(dists, dtype=np.float32),
                                  np.ascontiguousarray(ids, dtype=np.int64), token_of, *_drop_args(own_first, drop),
                                  int(k), float(temperature), tuple(rule), tokens, probs, truncated)
    return tokens, probs, truncated
