"""The datastore in row order for search-time lookups, stored in the index artifact.

``values.npy`` (int32, the next token of every datastore row) turns neighbour ids into tokens,
and ``keys.npy`` (the stored keys in the key store's own dtype, optional: ``index.exact_keys``) gives
exact squared L2 distances for re-ranking PQ results: float16 and float32 as they are, bfloat16 as its
raw 16-bit patterns (``uint16``, as in the key store). Both are plain ``.npy`` files that every search
worker memory-maps (from an object store: a local copy fetched once per worker process), so the
page cache holds one copy per machine rather than one per worker, and a lookup reads only the rows
it needs. Distances are FAISS's ``fvec_L2sqr_by_idx`` (C++) for float32 keys, and a compiled kernel
that widens 16-bit keys to float32 exactly on the way (``half_distances``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memforge.pipelines.faiss_build import faiss
from memforge.pipelines.half_distances import l2_by_idx
from memforge.pipelines.neighbour_lists import MISSING, sort_by_distance
from memforge.storage import fs, headers, local_cache
from memforge.storage.errors import ArtifactError
from memforge.storage.shards import ShardPlan
from memforge.storage.stores import KeyStore, bfloat16_to_float32

VALUES = "values.npy"
KEYS = "keys.npy"


def _write_npy(uri: str, dtype: np.dtype, shape: tuple[int, ...], blocks) -> str:
    """Stream ``blocks`` (in row order) into one ``.npy`` file, published atomically; return its checksum,
    hashed on the way out."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with fs.atomic_writer(uri) as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for block in blocks:
            handle.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
    return handle.checksum()


def write(keys: KeyStore, plan: ShardPlan, root: str, exact_keys: bool) -> dict[str, str]:
    """Write ``values.npy`` (and ``keys.npy`` when ``exact_keys``) from the key store, one shard at
    a time; a file already written (by an interrupted run) is kept. Returns the checksums of the files
    written now (the artifact's manifest takes them instead of reading the files back)."""
    n_rows, written = keys.rows.n_rows, {}
    if not fs.exists(fs.join(root, VALUES)):
        written[VALUES] = _write_npy(fs.join(root, VALUES), np.int32, (n_rows,),
                                     (keys.vals(s.start, s.stop) for s in plan.shards))
    if exact_keys and not fs.exists(fs.join(root, KEYS)):
        written[KEYS] = _write_npy(fs.join(root, KEYS), keys.rows.array("keys").dtype, (n_rows, keys.dim),
                                   (keys.rows.read("keys", s.start, s.stop) for s in plan.shards))
    return written


def _widen(keys: np.ndarray) -> np.ndarray:
    """Stored keys (float16, float32, or bfloat16 bit patterns) as contiguous float32, exactly."""
    if keys.dtype == np.uint16:
        return bfloat16_to_float32(keys)
    return np.ascontiguousarray(keys, dtype=np.float32)


class DatastoreRows:
    """Values and (optionally) exact keys of the datastore, memory-mapped from an index artifact (on an object
    store, from local copies fetched once per process for ``content_key``, e.g. the index's fingerprint)."""

    def __init__(self, index_uri: str, content_key: str):
        def load(uri: str) -> np.ndarray:
            path = local_cache.local_path(uri, content_key)
            headers.npy_header(path, uri)  # an object dtype is refused here, naming the file, before numpy reads it
            return np.load(path, mmap_mode="r", allow_pickle=False)

        self.values = load(fs.join(index_uri, VALUES))
        keys_uri = fs.join(index_uri, KEYS)
        self.keys = load(keys_uri) if fs.exists(keys_uri) else None
        self.index_uri = index_uri

    def values_of(self, ids: np.ndarray) -> np.ndarray:
        """Next tokens (int64) of neighbour ``ids``; -1 where the id is -1."""
        found = np.asarray(self.values[np.maximum(ids, 0)], dtype=np.int64)
        found[ids == MISSING] = MISSING
        return found

    def key_rows(self, start: int, stop: int) -> np.ndarray:
        """Keys of rows ``[start, stop)`` as float32."""
        return _widen(self.keys[start:stop])

    def distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared L2 distances between each query and its neighbours ``ids`` (inf where -1)."""
        if self.keys is None:
            raise ArtifactError(f"{self.index_uri}: has no {KEYS} (built with index.exact_keys: false); "
                                "set targets.exact_distances: false or rebuild the index with exact keys")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        lookup = np.ascontiguousarray(np.maximum(ids, 0), dtype=np.int64)
        out = np.empty(ids.shape, dtype=np.float32)
        base = np.asarray(self.keys)  # a memory map stays a view: only the neighbours' rows are read
        if base.dtype == np.float32:
            faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(queries), faiss.swig_ptr(base),
                                    faiss.swig_ptr(lookup), queries.shape[1], ids.shape[0], ids.shape[1])
        else:  # float16, or bfloat16 bit patterns (uint16): as many threads as FAISS would use (nogil kernel)
            bits, bfloat16 = base.view(np.uint16), base.dtype == np.uint16

            def rerank(start: int, stop: int) -> None:
                l2_by_idx(queries[start:stop], bits, lookup[start:stop], bfloat16, out[start:stop])

            parts = min(faiss.omp_get_max_threads(), max(1, len(ids) // 64))
            if parts == 1:
                rerank(0, len(ids))
            else:
                bounds = np.linspace(0, len(ids), parts + 1).astype(int)
                with ThreadPoolExecutor(parts) as pool:
                    list(pool.map(rerank, bounds[:-1], bounds[1:]))
        out[ids == MISSING] = np.inf
        return out

    def neighbours(self, queries: np.ndarray, dists: np.ndarray, ids: np.ndarray, exact: bool,
                   k: int | None = None, ordered: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, ids, values) of the ``k`` nearest (default: all) of the candidates found by a search;
        with ``exact`` the candidates are re-ranked by (exact distance, id) first. When every candidate is kept
        and ``ordered`` is false they keep the search's order (the same for a query in any block): the sort by
        exact distance is skipped."""
        if exact:
            dists = self.distances(queries, ids)
            if ordered or (k is not None and k < ids.shape[1]):
                dists, ids = sort_by_distance(dists, ids)
        dists, ids = dists[:, :k], ids[:, :k]
        return dists, ids, self.values_of(ids)
