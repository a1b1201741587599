"""``memforge targets``: kNN neighbours and distillation distributions for each split (Beam).

One Beam element per query shard. Each query takes ``targets.candidates`` (default k) candidates from
the index (train queries, which are the datastore keys themselves, search one more and drop their own
global id — never "the first result"; optionally neighbours within ``exclude_same_document_window``
tokens of the query in the same document are dropped too), re-ranks them by exact distance from the
float32 keys stored with the index, and keeps the k nearest. Neighbour ids and squared L2 distances
are stored once; the distribution (softmax of -d/T summed per next token, sparse: the tokens the keep rule
``targets.width`` / ``min_prob`` / ``mass`` keeps, the rest one remainder) is derived from them, so
``memforge retemper`` can redo it for another T or a smaller k (same candidates).
"""
from __future__ import annotations

import logging

import numpy as np

from memforge.pipelines import datastore_rows, faiss_gpu, faiss_index, knn, sharded_index, worker_cache
from memforge.pipelines.faiss_build import faiss
from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.storage.artifact import Artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.paths import split_roles
from memforge.storage.shards import Shard, ShardPlan, load_plan
from memforge.storage.stores import (
    DistributionStore,
    KeyStore,
    NeighbourStore,
    PartOffsets,
    TokenStore,
    neighbour_id_dtype,
)
from memforge.storage.zarr_rows import shard_geometry

log = logging.getLogger("memforge")


class SearchShards(ShardWorker):
    """Neighbours and distributions of one query shard of either split; both stores' files under one marker.

    ``setup`` opens the index (merged or shards, memory-mapped) and the datastore rows once per worker
    process (``worker_cache``): worker threads share them, so an IVF-PQ index's precomputed distance
    tables sit in the CPU caches once, not once per thread, and a runner that sets up a worker per
    bundle does not open them again.
    """

    def __init__(self, common: dict, splits: dict[str, dict]):
        self.common, self.splits = common, splits

    def setup(self) -> None:
        common = self.common
        self.index, self.rows = worker_cache.cached(
            ("search", common["index_uri"], common["index_fingerprint"], common["nprobe"], common["gpu"]),
            lambda: (sharded_index.ShardedIndex(common["index_uri"], common["index_fingerprint"],
                                                common["index_shards"], common["nprobe"], common["merged"],
                                                common["gpu"]),
                     datastore_rows.DatastoreRows(common["index_uri"], common["index_fingerprint"])))
        self.outputs = {}
        for role, spec in self.splits.items():
            self.outputs[role] = (KeyStore.open(spec["queries_uri"]),
                                  NeighbourStore.open(spec["out_uri"], writable=True) if common["keep"] else None,
                                  DistributionStore.open(spec["out_uri"], writable=True))
        self.docs = None
        if common["window"]:
            self.docs = (TokenStore(common["tokens_uri"], "train"), PartOffsets.from_json(common["parts"]))

    def process(self, role: str, uri: str, shard: Shard):
        """The shard chunk by chunk, each chunk in blocks of ``query_block_rows`` queries: a worker's memory is
        one block's [block, k] temporaries plus one chunk of neighbours and distributions (each written as soon
        as it is done, one Zarr file per chunk), whatever the shard size and the keep rule's width."""
        queries_store, neighbours, distributions = self.outputs[role]
        common = self.common
        rule = knn.KeepRule.of(*common["rule"])
        faiss.omp_set_num_threads(common["threads"])  # per call: OpenMP settings are per thread under multi_threading
        files = {}
        for chunk_start in range(shard.start, shard.stop, common["chunk_rows"]):
            chunk_stop, sparse = min(chunk_start + common["chunk_rows"], shard.stop), []
            if neighbours is not None:  # the chunk's neighbours, filled block by block (ids narrowed as they land)
                kept_ids = np.empty((chunk_stop - chunk_start, common["k"]), neighbours.rows.array("ids").dtype)
                kept_dists = np.empty((chunk_stop - chunk_start, common["k"]), np.float32)
            for start in range(chunk_start, chunk_stop, common["block"]):
                stop = min(start + common["block"], chunk_stop)
                queries = np.ascontiguousarray(queries_store.keys(start, stop), dtype=np.float32)
                if neighbours is None and common["candidates"] == common["k"]:
                    sparse.append(self.distributions_of(start, stop, queries, self.splits[role]["self_query"], rule))
                    continue
                dists, ids = self.neighbours_of(start, stop, queries, self.splits[role]["self_query"])
                dists, ids, values = self.rows.neighbours(queries, dists, ids, common["exact_distances"], common["k"],
                                                          ordered=neighbours is not None)
                sparse.append(knn.distributions(dists, values, common["temperature"], rule))
                if neighbours is not None:
                    kept_ids[start - chunk_start:stop - chunk_start] = ids
                    kept_dists[start - chunk_start:stop - chunk_start] = dists
            chunk = Shard(shard.id, chunk_start, chunk_stop)
            if neighbours is not None:
                files.update(neighbours.write_shard(chunk, kept_ids, kept_dists))
            files.update(distributions.write_shard(chunk, *(np.concatenate(column) for column in zip(*sparse))))
        return files, {}

    def search(self, start: int, stop: int, queries: np.ndarray, self_query: bool):
        """(distances, ids, own_first, nearby) of rows [start, stop): the raw search, with enough extra results for
        the query itself and its same-document neighbours (``nearby``, flagged) to be dropped afterwards."""
        common = self.common
        dists, ids = self.index.search(queries, searched_per_query(common["candidates"], common["window"],
                                                                   common["datastore_rows"], self_query))
        nearby = self.same_document_nearby(start, stop, ids) if self_query and common["window"] else None
        return dists, ids, start if self_query else None, nearby

    def neighbours_of(self, start: int, stop: int, queries: np.ndarray,
                      self_query: bool) -> tuple[np.ndarray, np.ndarray]:
        """Search rows [start, stop), then drop the query itself (by id) and same-document neighbours; the first
        ``candidates`` per row, in the index's order."""
        dists, ids, own_first, nearby = self.search(start, stop, queries, self_query)
        return knn.drop_ids(dists, ids, self.common["candidates"], own_first, nearby)

    def distributions_of(self, start: int, stop: int, queries: np.ndarray, self_query: bool, rule: knn.KeepRule):
        """The distributions of rows [start, stop) when neither the neighbours are kept nor re-ranking picks among
        more candidates than k: straight from the search (exact distances replace the PQ ones in place), one
        compiled pass for dropping, value lookup and aggregation (as ``neighbours_of`` + ``knn.distributions``)."""
        common = self.common
        dists, ids, own_first, nearby = self.search(start, stop, queries, self_query)
        if common["exact_distances"]:
            dists = self.rows.distances(queries, ids)
        return knn.search_distributions(dists, ids, self.rows.values, common["k"], common["temperature"], rule,
                                        own_first, nearby)

    def same_document_nearby(self, start: int, stop: int, ids: np.ndarray) -> np.ndarray:
        """Neighbours of queries [start, stop) within ``window`` rows of the query whose value token is in the
        query's document."""
        window = self.common["window"]
        own = np.arange(start, stop, dtype=np.int64)[:, None]
        reader, offsets = self.docs
        first = max(0, start - window)
        last = min(offsets.total_rows - 1, stop + window)
        docs = reader.read_rows(offsets, first + 1, last + 1, column="doc")  # row i's value is token i + 1
        near = (ids >= 0) & (np.abs(ids - own) <= window)
        neighbour_docs = docs[np.clip(ids - first, 0, len(docs) - 1)]
        return near & (neighbour_docs == docs[own - first])


def candidates(config) -> int:
    """Neighbour candidates searched per query (``targets.candidates``, else ``targets.k``)."""
    return config.candidates or config.k


def searched_per_query(candidate_count: int, window: int, datastore_rows: int, self_query: bool) -> int:
    """Results one search asks for: the candidates, plus for a query in the datastore itself and the rows of its
    same-document window (dropped afterwards), at most the datastore."""
    return min(candidate_count + ((1 + 2 * window) if self_query else 0), datastore_rows)


def keep_rule(config) -> knn.KeepRule:
    """The keep rule of ``targets.width`` / ``min_prob`` / ``mass`` at ``targets.k``."""
    return knn.KeepRule.of(config.k, config.width, config.min_prob, config.mass)


def check_compatible(params, index: Artifact, datastore: Artifact) -> None:
    """Refuse inputs that cannot give meaningful targets, naming the value at fault."""
    n_rows, k = datastore.manifest["counts"]["rows"], params.targets.k
    if k >= n_rows:
        raise MemforgeError(f"targets.k: {k} must be smaller than the datastore size ({n_rows} rows)")
    if candidates(params.targets) >= n_rows:
        raise MemforgeError(f"targets.candidates: {params.targets.candidates} must be smaller than the datastore "
                            f"size ({n_rows} rows)")
    if params.targets.exact_distances and datastore_rows.KEYS not in index.manifest["files"]:
        raise MemforgeError(f"targets.exact_distances: {index.uri} has no exact keys (built with "
                            "index.exact_keys: false); set targets.exact_distances: false or rebuild the index")
    nlist, nprobe = index.manifest["stats"]["nlist"], params.targets.nprobe or params.index.nprobe
    if nlist is not None and nprobe > nlist:
        raise MemforgeError(f"targets.nprobe: {nprobe} exceeds the index's nlist ({nlist})")


class Targets(Stage):
    """kNN neighbours and distillation distributions of both splits, one Beam pipeline."""

    name = "targets"
    summary = "kNN neighbours and distillation distributions for each split (Beam)"
    outputs = split_roles("targets")
    format = "zarr-v3"
    inputs = ("keys/train", "keys/validation", "index", "tokens")
    content = ("targets.k", "targets.candidates", "targets.temperature", "targets.width", "targets.min_prob",
               "targets.mass", "targets.nprobe",
               "targets.exact_distances", "targets.exclude_same_document_window", "targets.probs_dtype",
               "targets.keep_neighbours", "index.nprobe")
    layout = ("targets.shard_chunks", "encode.chunk_rows")
    execution = ("runtime.num_workers", "runtime.threads_per_worker", "index.threads", "index.device",
                 "targets.query_block_rows")
    sharded = True
    running_mode = "multi_threading"
    progress_unit = "queries"

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        """The token store only when same-document neighbours are excluded (it holds the document ids)."""
        return self.inputs if ctx.params.targets.exclude_same_document_window else self.inputs[:3]

    def nprobe(self, ctx: Context) -> int:
        return ctx.params.targets.nprobe or ctx.params.index.nprobe

    def check(self, ctx: Context) -> None:
        """Checked before any work starts (that the splits, the index and the datastore belong together is a
        contract: ``pipelines.contracts``)."""
        check_compatible(ctx.params, ctx.inputs["index"], ctx.inputs["keys/train"])
        ctx.scratch["gpu"] = faiss_gpu.faiss_gpu(ctx.params.index.device)

    def artifact_params(self, ctx: Context, role: str) -> dict:
        values = ctx.params.values([key for key in self.content if key != "index.nprobe"], strip="targets")
        return {**values, "candidates": candidates(ctx.params.targets), "nprobe": self.nprobe(ctx),
                "split": role.split("/")[1]}

    def artifact_inputs(self, ctx: Context, role: str) -> dict:
        inputs = {"queries": ctx.inputs["keys/" + role.split("/")[1]], "index": ctx.inputs["index"],
                  "datastore": ctx.inputs["keys/train"]}
        if "tokens" in ctx.inputs:
            inputs["tokens"] = ctx.inputs["tokens"]
        return inputs

    def geometry(self, ctx: Context, role: str) -> tuple[int, int, int]:
        """(query rows, chunk rows, shard rows) of the split's target stores."""
        n_rows = ctx.inputs["keys/" + role.split("/")[1]].manifest["counts"]["rows"]
        return (n_rows, *shard_geometry(n_rows, ctx.params.encode.chunk_rows, ctx.params.targets.shard_chunks))

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        """One element per Zarr shard of the target stores."""
        n_rows, _, shard_rows = self.geometry(ctx, role)
        return ShardPlan.even(n_rows, shard_rows)

    def create(self, ctx: Context, role: str, plan: ShardPlan) -> None:
        n_rows, chunk_rows, shard_rows = self.geometry(ctx, role)
        config = ctx.params.targets
        if config.keep_neighbours:
            NeighbourStore.create(ctx.uri(role), n_rows, config.k, chunk_rows, 1,  # a file per chunk: see process
                                  ids_dtype=neighbour_id_dtype(ctx.inputs["keys/train"].manifest["counts"]["rows"]))
        DistributionStore.create(ctx.uri(role), n_rows, keep_rule(config).width, config.probs_dtype, chunk_rows,
                                 1)  # a file per chunk: see process

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        index, datastore, config = ctx.inputs["index"], ctx.inputs["keys/train"], ctx.params.targets
        tokens = ctx.inputs.get("tokens")
        common = {
            "index_uri": index.uri, "index_fingerprint": index.fingerprint,
            "index_shards": [s.name for s in load_plan(index.uri).shards],
            "merged": index.manifest["stats"]["merge"] == "ondisk", "nprobe": self.nprobe(ctx),
            "k": config.k, "candidates": candidates(config), "temperature": config.temperature,
            "rule": (config.k, config.width, config.min_prob, config.mass),  # knn.KeepRule.of's arguments
            "exact_distances": config.exact_distances, "datastore_rows": datastore.manifest["counts"]["rows"],
            "window": config.exclude_same_document_window,
            "tokens_uri": tokens.uri if tokens else None,
            "parts": tokens.manifest["stats"]["splits"]["train"]["parts"] if tokens else None,
            "threads": faiss_index.worker_threads(ctx.params),
            "keep": config.keep_neighbours, "block": config.query_block_rows, "gpu": ctx.scratch["gpu"],
            "chunk_rows": ctx.params.encode.chunk_rows,  # rows per neighbours file (fewer in a smaller array)
        }
        splits = {role: {"queries_uri": ctx.inputs["keys/" + role.split("/")[1]].uri, "out_uri": uri,
                         "self_query": role == "targets/train"} for role, uri in roles.items()}
        return SearchShards(common, splits)

    def finalize(self, ctx: Context, role: str, build) -> Published:
        index, datastore, config = ctx.inputs["index"], ctx.inputs["keys/train"], ctx.params.targets
        arrays = DistributionStore.open(build.uri, writable=True).rows.describe()
        if config.keep_neighbours:
            arrays.update(NeighbourStore.open(build.uri, writable=True).rows.describe())
        queries = ctx.inputs["keys/" + role.split("/")[1]]
        return Published(
            counts={"rows": queries.manifest["counts"]["rows"],
                    "vocab_size": datastore.manifest["counts"]["vocab_size"],
                    "datastore_rows": datastore.manifest["counts"]["rows"], "query_offset": 0},
            arrays=dict(sorted(arrays.items())),
            stats={"self_query": role == "targets/train", "k": config.k, "candidates": candidates(config),
                   "temperature": config.temperature,
                   "width": config.width, "min_prob": config.min_prob, "mass": config.mass,
                   "nprobe": self.nprobe(ctx), "exact_distances": config.exact_distances,
                   "index_factory": index.manifest["stats"]["factory"],
                   "index_recall_at_k": index.manifest["stats"].get("recall_at_k"),
                   "faiss_version": index.manifest["stats"]["faiss_version"],
                   "search_device": faiss_gpu.search_device(ctx.scratch["gpu"], searched_per_query(
                       candidates(config), config.exclude_same_document_window,
                       datastore.manifest["counts"]["rows"], role == "targets/train"))},
        )
