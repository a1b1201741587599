"""FAISS searches whose results for a query do not depend on the other queries of the call, nor on threads.

FAISS computes a block's flat distances (IndexFlat, and an IVF index's coarse quantizer, whose distance
enters every IVF-PQ distance) either query by query or, for a large enough block, as one BLAS matrix
product whose rounding depends on the block's size and the BLAS threads; and with fewer queries than
threads it splits the database among the threads, which rounds otherwise again. Either way a query's
distances, hence its neighbours at the k-th place, would depend on ``targets.query_block_rows`` and the
thread settings. Within ``per_query`` FAISS takes the query-by-query path whatever the block size, with at
most one thread per query: the same bits for a query in any block, with any threads.
"""
from __future__ import annotations

import contextlib
import threading

from memforge.pipelines.faiss_build import faiss

_NEVER = 2 ** 31 - 1  # FAISS's switch to BLAS: above any block's size
_lock = threading.Lock()
_holders = 0  # searches inside per_query now (Beam's worker threads search at once)
_saved_threshold = 0


@contextlib.contextmanager
def per_query(n_queries: int):
    """Search ``n_queries`` queries query by query (no BLAS block product), on at most ``n_queries`` of this
    thread's FAISS threads; FAISS's own settings come back when the last search in the process ends."""
    global _holders, _saved_threshold
    with _lock:
        if _holders == 0:
            _saved_threshold = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = _NEVER
        _holders += 1
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(threads, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
        with _lock:
            _holders -= 1
            if _holders == 0:
                faiss.cvar.distance_compute_blas_threshold = _saved_threshold
