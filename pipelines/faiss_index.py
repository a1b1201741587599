"""FAISS index files of the index artifact: choosing a factory, (de)serialising, searching shards."""
from __future__ import annotations

import contextlib
import logging
import math
import threading

import faiss
import numpy as np

from memforge.pipelines.per_query_search import per_query
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


def faiss_gpu(setting: str, key: str = "index.device") -> str | int | None:
    """Where FAISS runs for ``setting``: None (the CPU), a GPU number, or ``"all"`` (every GPU it sees).

    ``auto`` and ``cuda`` take every GPU this FAISS build sees, ``cuda:N`` that one. With the CPU build
    (faiss-cpu; ``memforge-mlp[gpu]`` installs faiss-gpu) it runs on the CPU and says so in one log line when
    a GPU is there. A GPU asked for that the machine lacks is an error naming ``key``.
    """
    if setting == "cpu":
        return None
    from memforge.pipelines import devices  # torch: only here, not in every worker that merely reads indexes

    resolved = devices.resolve(setting, key)
    if resolved == "cpu":
        return None
    if not getattr(faiss, "get_num_gpus", lambda: 0)():
        log.warning("%s: %s, but this FAISS %s is a CPU build: FAISS runs on the CPU (install faiss-gpu: "
                    "pip install 'memforge-mlp[gpu]')", key, resolved, faiss.__version__)
        return None
    return int(resolved.split(":")[1]) if ":" in resolved else "all"


def to_gpu(index: faiss.Index, gpu: str | int) -> faiss.Index:
    """A GPU copy of ``index`` (on GPU ``gpu``, or replicated on all); PQ lookup tables in float16, which
    FAISS's GPU IVF-PQ needs for wide codes. The copy keeps its GPU resources alive."""
    if gpu == "all":
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(index, co=options)
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    resources = faiss.StandardGpuResources()
    copy = faiss.index_cpu_to_gpu(resources, gpu, index, options)
    copy.resources = resources
    return copy


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


class ShardedIndex:
    """The index artifact for search: the merged on-disk index, or every shard.

    IVF shards are copies of one trained index, so their inverted lists are stacked (FAISS's
    ``HStackInvertedLists``) under one index: list i is the concatenation of the shards' lists i,
    read from the memory-mapped shard files, and a query is quantized and its distance tables
    built once. Other index types search each shard and merge the results by distance. With ``gpu``
    (see ``faiss_gpu``) the searchers are copied to GPU memory.
    """

    def __init__(self, index_uri: str, content_key: str, shard_names: list[str], nprobe: int, merged: bool,
                 gpu: str | int | None = None):
        if merged:
            self.shards = [read_merged(index_uri, content_key)]
        else:
            self.shards = [read(fs.join(index_uri, shard_file(n)), mmap=True, content_key=content_key)
                           for n in shard_names]
        ivfs = [ivf_of(shard) for shard in self.shards]
        if len(self.shards) > 1 and all(ivf is not None for ivf in ivfs):
            self.lists = faiss.InvertedListsPtrVector()
            for ivf in ivfs:
                self.lists.push_back(ivf.invlists)
            self.stacked = faiss.HStackInvertedLists(self.lists.size(), self.lists.data())
            combined = read(fs.join(index_uri, TRAINED))
            ivf = ivf_of(combined)
            ivf.replace_invlists(self.stacked, False)
            ivf.ntotal = combined.ntotal = sum(shard.ntotal for shard in self.shards)
            self.searchers = [combined]
        else:
            self.searchers = self.shards
        for searcher in self.searchers:
            set_nprobe(searcher, nprobe)
        if gpu is not None:  # lists (and nprobe) copied into GPU memory; a GPU index serves one search at a time
            self.searchers = [to_gpu(searcher, gpu) for searcher in self.searchers]
        self.gpu_lock = threading.Lock() if gpu is not None else contextlib.nullcontext()
        self.dim = self.shards[0].d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest global ids and squared L2 distances over all shards; on the CPU a query's result does not
        depend on the other queries searched with it nor on the thread count (``per_query_search``)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self.gpu_lock, per_query(len(queries)):
            results = [searcher.search(queries, k) for searcher in self.searchers]
        if len(results) == 1:
            return results[0]
        return faiss.merge_knn_results(np.stack([d for d, _ in results]), np.stack([i for _, i in results]))
