"""FAISS index files of the index artifact: choosing a factory, (de)serialising, reading them for search."""
from __future__ import annotations

import logging
import math

import numpy as np

from memforge.pipelines.faiss_build import faiss
from memforge.storage import fs, local_cache
from memforge.storage.errors import MemforgeError
from memforge.storage.params import IndexParams

log = logging.getLogger("memforge")
TRAINED = "trained.index"
MERGED = "merged.index"
MERGED_DATA = "merged.ivfdata"


def worker_threads(params) -> int:
    """FAISS threads per Beam worker: ``index.threads``, else ``runtime.threads_per_worker``."""
    return params.index.threads or params.runtime.threads_per_worker


def shard_file(shard_name: str) -> str:
    return f"shard-{shard_name}.index"


def pq_subquantizers(dim: int) -> int:
    """PQ sub-quantizers for ``dim``: the most (up to 64) that divide it with at least 2 dims each."""
    return max(c for c in range(1, min(64, dim) + 1) if dim % c == 0 and dim // c >= 2)


def resolve_factory(params: IndexParams, n_rows: int, dim: int) -> str:
    """``index.factory``, or for ``auto``: exact Flat for small datastores, else IVF-PQ sized by N and d."""
    if params.factory != "auto":
        return params.factory
    if n_rows < params.flat_threshold:
        return "Flat"
    nlist = 2 ** math.ceil(math.log2(4 * math.sqrt(n_rows)))  # low in 4..16 * sqrt(N): quick to train
    m = pq_subquantizers(dim)
    prefix = f"OPQ{m}_{m * (dim // m)}," if dim > 1024 else ""
    return f"{prefix}IVF{nlist},PQ{m}"


def build_empty(factory: str, dim: int) -> faiss.Index:
    """An index from ``factory`` that accepts global ids (wrapped in an ID map when it has none)."""
    try:
        index = faiss.index_factory(dim, factory)
    except RuntimeError as exc:
        raise MemforgeError(f"index.factory: {factory!r} is not a valid FAISS factory string: "
                            f"{str(exc).splitlines()[-1]}") from None
    if ivf_of(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def ivf_of(index: faiss.Index):
    """The IVF part of ``index`` or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on an IVF index (refusing more probes than lists); no-op for others."""
    ivf = ivf_of(index)
    if ivf is None:
        return
    if nprobe > ivf.nlist:
        raise MemforgeError(f"nprobe ({nprobe}) exceeds the index's nlist ({ivf.nlist})")
    ivf.nprobe = nprobe


def write(index: faiss.Index, uri: str) -> str:
    """Serialise ``index`` to ``uri`` atomically; return its checksum."""
    return fs.write_bytes_atomic(uri, faiss.serialize_index(index))


def read(uri: str, mmap: bool = False, content_key: str | None = None) -> faiss.Index:
    """Read an index; with ``mmap`` its file is memory-mapped (FAISS's IO_FLAG_MMAP), from the local copy
    fetched once per process for ``content_key`` when it lies on an object store."""
    if fs.is_local(uri) or (mmap and content_key):
        return faiss.read_index(local_cache.local_path(uri, content_key), faiss.IO_FLAG_MMAP if mmap else 0)
    filesystem, path = fs.filesystem(uri)
    with filesystem.open(path, "rb") as handle:
        return faiss.deserialize_index(np.frombuffer(handle.read(), dtype=np.uint8))


def read_merged(index_uri: str, content_key: str = "") -> faiss.Index:
    """The on-disk merged index; its inverted lists are memory-mapped read-only from ``merged.ivfdata``
    found beside it (so the artifact can move), never loaded into memory; on an object store both files are
    fetched once per process for ``content_key``. (FAISS's IO_FLAG_ONDISK_SAME_DIR does the same but prints
    to the C stdout, which memforge keeps for results.)"""
    index = faiss.read_index(local_cache.local_path(fs.join(index_uri, MERGED), content_key),
                             faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = faiss.downcast_InvertedLists(ivf_of(index).invlists)
    lists.filename = local_cache.local_path(fs.join(index_uri, MERGED_DATA), content_key)
    lists.read_only = True
    lists.do_mmap()
    # FAISS would start 32 prefetch threads per search call; the lists are paged in on first touch
    # anyway, and those threads only compete with the searching workers for the cores.
    lists.prefetch_nthread = 0
    return index
