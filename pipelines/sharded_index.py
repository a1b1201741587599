"""Searching the index artifact: its shards (or the merged index) as one searcher, on the CPU or on GPU
copies (``faiss_gpu``)."""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from memforge.pipelines import faiss_build, faiss_gpu, faiss_index
from memforge.pipelines.faiss_build import faiss
from memforge.pipelines.per_query_search import per_query
from memforge.storage import fs


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
            self.shards = [faiss_index.read_merged(index_uri, content_key)]
        else:
            self.shards = [faiss_index.read(fs.join(index_uri, faiss_index.shard_file(n)), mmap=True,
                                            content_key=content_key) for n in shard_names]
        ivfs = [faiss_index.ivf_of(shard) for shard in self.shards]
        if len(self.shards) > 1 and all(ivf is not None for ivf in ivfs):
            self.lists = faiss.InvertedListsPtrVector()
            for ivf in ivfs:
                self.lists.push_back(ivf.invlists)
            self.stacked = faiss.HStackInvertedLists(self.lists.size(), self.lists.data())
            combined = faiss_index.read(fs.join(index_uri, faiss_index.TRAINED))
            ivf = faiss_index.ivf_of(combined)
            ivf.replace_invlists(self.stacked, False)
            ivf.ntotal = combined.ntotal = sum(shard.ntotal for shard in self.shards)
            self.searchers = [combined]
        else:
            self.searchers = self.shards
        for searcher in self.searchers:
            faiss_index.set_nprobe(searcher, nprobe)
        # lists (and nprobe) copied into GPU memory; a GPU index serves one search at a time, and a search for
        # more results than GPU FAISS selects (faiss_build.max_gpu_k) runs on the host's searchers
        self.gpu_searchers = [faiss_gpu.to_gpu(searcher, gpu) for searcher in self.searchers] if gpu is not None else []
        self.max_gpu_k = faiss_build.max_gpu_k(faiss) if gpu is not None else 0
        self.gpu_lock = threading.Lock()
        self.dim = self.shards[0].d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest global ids and squared L2 distances over all shards; on the CPU a query's result does not
        depend on the other queries searched with it nor on the thread count (``per_query_search``)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        on_gpu = bool(self.gpu_searchers) and k <= self.max_gpu_k
        if self.gpu_searchers and not on_gpu:
            faiss_build.warn_once(f"{faiss_gpu.KEY}: searches for more than {self.max_gpu_k} results per query (the "
                                  "most GPU FAISS selects) run on the CPU")
        with self.gpu_lock if on_gpu else contextlib.nullcontext(), per_query(len(queries)):
            results = [searcher.search(queries, k) for searcher in (self.gpu_searchers if on_gpu else self.searchers)]
        if len(results) == 1:
            return results[0]
        return faiss.merge_knn_results(np.stack([d for d, _ in results]), np.stack([i for _, i in results]))
