"""``memforge targets``: kNN neighbours and distillation distributions for each split (Beam).

One Beam element per query shard. Train queries are the datastore keys themselves: each searches
k+1 neighbours over every index shard (merged by distance with FAISS's merge helper) and drops
its own global id — never "the first result". Validation queries search k. Optionally neighbours
within ``exclude_same_document_window`` tokens of the query in the same document are dropped too,
and distances are recomputed exactly from the float32 keys stored with the index. Neighbour ids and squared L2
distances are stored once; the distribution (softmax of -d/T summed per next token, sparse,
width m) is derived from them, so ``memforge retemper`` can redo it for another T or smaller k.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict

import apache_beam as beam
from apache_beam.utils import shared
import faiss
import numpy as np

from pipelines import datastore_rows, faiss_index, knn
from pipelines.encode import keys_uri
from pipelines.index import index_uri, worker_threads
from pipelines.prepare import SPLITS, tokens_uri
from pipelines.progress import ShardProgress
from pipelines.runner import pipeline
from storage import fs
from storage.artifact import Artifact, ArtifactBuild, open_artifact
from storage.errors import MemforgeError
from storage.params import Params
from storage.shards import Shard, ShardMarkers, load_plan
from storage.stores import DistributionStore, KeyStore, NeighbourStore, PartOffsets, TokenStore
from storage.zarr_rows import shard_geometry

log = logging.getLogger("memforge")


def targets_uri(params: Params, split: str) -> str:
    return fs.join(params.artifacts_dir, "targets", split)


class _SearchResources:
    """What every search worker of a process reads: the index and the datastore rows (weak-referenceable
    for Beam's ``Shared``)."""

    def __init__(self, common: dict):
        self.index = faiss_index.ShardedIndex(common["index_uri"], common["index_shards"], common["nprobe"],
                                              common["merged"])
        self.rows = datastore_rows.DatastoreRows(common["index_uri"])


class SearchShard(beam.DoFn):
    """Neighbours and distributions of one query shard of either split; both stores' files under one marker.

    ``setup`` opens the index (merged or shards, memory-mapped) and the datastore rows once per worker
    process: worker threads share them through Beam's ``Shared`` handle, so an IVF-PQ index's
    precomputed distance tables sit in the CPU caches once, not once per thread.
    """

    def __init__(self, common: dict, splits: dict[str, dict], search_resources: shared.Shared):
        self.common, self.splits, self.search_resources = common, splits, search_resources

    def setup(self) -> None:
        common = self.common
        resources = self.search_resources.acquire(lambda: _SearchResources(common))
        self.index, self.rows = resources.index, resources.rows
        self.outputs = {}
        for split, spec in self.splits.items():
            self.outputs[split] = (KeyStore.open(spec["queries_uri"]),
                                   NeighbourStore.open(spec["out_uri"], writable=True),
                                   DistributionStore.open(spec["out_uri"], writable=True),
                                   ShardMarkers(spec["out_uri"]))
        self.docs = None
        if common["window"]:
            self.docs = (TokenStore(common["tokens_uri"], "train"), PartOffsets.from_json(common["parts"]))

    def process(self, element: dict):
        split, shard = element["split"], Shard(**element["shard"])
        queries_store, neighbours, distributions, markers = self.outputs[split]
        if markers.is_done(shard):
            return
        started = time.perf_counter()
        common = self.common
        faiss.omp_set_num_threads(common["threads"])  # per call: OpenMP settings are per thread under multi_threading
        queries = np.ascontiguousarray(queries_store.keys(shard.start, shard.stop), dtype=np.float32)
        dists, ids = self.neighbours_of(shard, queries, self.splits[split]["self_query"])
        dists, ids, values = self.rows.neighbours(queries, dists, ids, common["exact_distances"])
        tokens, probs, truncated = knn.distributions(dists, values, common["temperature"], common["width"])
        files = neighbours.write_shard(shard, ids, dists)
        files.update(distributions.write_shard(shard, tokens, probs, truncated))
        markers.mark_done(shard, files, {"rows": shard.rows, "seconds": time.perf_counter() - started})
        yield f"{split}/{shard.name}"

    def neighbours_of(self, shard: Shard, queries: np.ndarray, self_query: bool) -> tuple[np.ndarray, np.ndarray]:
        """Search, then drop the query itself (by id) and same-document neighbours; k per row."""
        common = self.common
        extra = (1 + 2 * common["window"]) if self_query else 0
        dists, ids = self.index.search(queries, min(common["k"] + extra, common["datastore_rows"]))
        drop = np.zeros(ids.shape, dtype=bool)
        if self_query:
            own = np.arange(shard.start, shard.stop, dtype=np.int64)[:, None]
            drop = ids == own
            if common["window"]:
                drop |= self.same_document_nearby(own, ids)
        return knn.drop_ids(dists, ids, drop, common["k"])

    def same_document_nearby(self, own: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Neighbours within ``window`` rows of the query whose value token is in the query's document."""
        window = self.common["window"]
        reader, offsets = self.docs
        first = max(0, int(own[0, 0]) - window)
        last = min(offsets.total_rows - 1, int(own[-1, 0]) + window + 1)
        docs = reader.read_rows(offsets, first + 1, last + 1, column="doc")  # row i's value is token i + 1
        near = (ids >= 0) & (np.abs(ids - own) <= window)
        neighbour_docs = docs[np.clip(ids - first, 0, len(docs) - 1)]
        return near & (neighbour_docs == docs[own - first])


def check_compatible(params: Params, index: Artifact, datastore: Artifact, queries: Artifact) -> None:
    """Refuse inputs that cannot give meaningful targets, naming the value at fault."""
    n_rows, k = datastore.manifest["counts"]["rows"], params.targets.k
    if k >= n_rows:
        raise MemforgeError(f"targets.k: {k} must be smaller than the datastore size ({n_rows} rows)")
    built_from = next((i["fingerprint"] for i in index.manifest["inputs"] if i["role"] == "keys"), None)
    if built_from != datastore.fingerprint:
        raise MemforgeError(f"{index.uri}: built from another key store (fingerprint {str(built_from)[:12]}), "
                            f"not {datastore.uri} ({datastore.fingerprint[:12]}); rebuild the index")
    dim = queries.manifest["stats"]["hidden_size"]
    if dim != index.manifest["stats"]["dim"]:
        raise MemforgeError(f"{queries.uri}: key dimension {dim} differs from the index dimension "
                            f"{index.manifest['stats']['dim']}")
    if params.targets.exact_distances and datastore_rows.KEYS not in index.manifest["files"]:
        raise MemforgeError(f"targets.exact_distances: {index.uri} has no exact keys (built with "
                            "index.exact_keys: false); set targets.exact_distances: false or rebuild the index")
    nlist, nprobe = index.manifest["stats"]["nlist"], params.targets.nprobe or params.index.nprobe
    if nlist is not None and nprobe > nlist:
        raise MemforgeError(f"targets.nprobe: {nprobe} exceeds the index's nlist ({nlist})")


def targets(params: Params, *, rebuild: bool = False, beam_args: list[str] = ()) -> str:
    """Run the targets stage for both splits (one Beam pipeline); returns the targets directory."""
    index = open_artifact(index_uri(params), "index")
    datastore = open_artifact(keys_uri(params, "train"), "keys")
    tokens = open_artifact(tokens_uri(params), "tokens")
    queries_by_split = {split: open_artifact(keys_uri(params, split), "keys") for split in SPLITS}
    for queries in queries_by_split.values():  # every split is checked before any work starts
        check_compatible(params, index, datastore, queries)
    nprobe = params.targets.nprobe or params.index.nprobe
    builds, splits, elements = {}, {}, []
    for split, queries in queries_by_split.items():
        begun = _begin_split(params, split, index, datastore, queries, tokens, nprobe, rebuild)
        if begun is not None:
            builds[split], splits[split], pending = begun
            elements += [{"split": split, "shard": asdict(s)} for s in pending]
    if not builds:
        return fs.join(params.artifacts_dir, "targets")
    common = {
        "index_uri": index.uri, "index_shards": [s.name for s in load_plan(index.uri).shards],
        "merged": index.manifest["stats"]["merge"] == "ondisk", "nprobe": nprobe,
        "k": params.targets.k, "temperature": params.targets.temperature, "width": params.targets.width,
        "exact_distances": params.targets.exact_distances, "datastore_rows": datastore.manifest["counts"]["rows"],
        "window": params.targets.exclude_same_document_window,
        "tokens_uri": tokens.uri, "parts": tokens.manifest["stats"]["splits"]["train"]["parts"],
        "threads": worker_threads(params),
    }
    runner = None
    if elements:
        beam_pipeline, runner = pipeline(list(beam_args), params.encode.num_workers, "multi_threading")
        with contextlib.ExitStack() as progress:
            for split, spec in splits.items():
                pending = [Shard(**e["shard"]) for e in elements if e["split"] == split]
                progress.enter_context(ShardProgress(f"targets {split}", spec["out_uri"], pending, unit="queries"))
            with beam_pipeline as p:
                (p | "shards" >> beam.Create(elements) | beam.Reshuffle()
                   | "search" >> beam.ParDo(SearchShard(common, splits, shared.Shared())))
    for split, build in builds.items():
        _publish_split(build, params, index, datastore, queries_by_split[split], splits[split], nprobe, runner)
    return fs.join(params.artifacts_dir, "targets")


def _begin_split(params, split, index, datastore, queries, tokens, nprobe, rebuild):
    """Begin (or resume) one split's build and create its stores; None when it is up to date."""
    uri = targets_uri(params, split)
    section = {**params.section("targets"), "nprobe": nprobe, "split": split}
    inputs = {"queries": queries, "index": index, "datastore": datastore}
    if params.targets.exclude_same_document_window:
        inputs["tokens"] = tokens
    build = ArtifactBuild.begin(uri, "targets", section, inputs, fmt="zarr-v3", rebuild=rebuild)
    if build.up_to_date:
        log.info("targets: %s is up to date (fingerprint %s)", uri, build.fingerprint[:12])
        return None
    n_rows = queries.manifest["counts"]["rows"]
    chunk_rows, shard_rows = shard_geometry(n_rows, params.encode.chunk_rows, params.targets.shard_chunks)
    neighbours = NeighbourStore.create(uri, n_rows, params.targets.k, chunk_rows, shard_rows // chunk_rows)
    DistributionStore.create(uri, n_rows, params.targets.width, params.targets.probs_dtype, chunk_rows,
                             shard_rows // chunk_rows)
    plan = build.plan(neighbours.rows.plan())  # one Beam element per Zarr shard of the target stores
    pending = build.pending(plan)
    log.info("targets: %s: %d queries in %d shards; %d already done (skipped), %d to run",
             split, n_rows, len(plan.shards), len(plan.shards) - len(pending), len(pending))
    spec = {"queries_uri": queries.uri, "out_uri": uri, "self_query": split == "train"}
    return build, spec, pending


def _publish_split(build, params, index, datastore, queries, spec, nprobe, runner) -> None:
    neighbours = NeighbourStore.open(spec["out_uri"], writable=True)
    distributions = DistributionStore.open(spec["out_uri"], writable=True)
    build.publish(
        counts={"rows": queries.manifest["counts"]["rows"], "vocab_size": datastore.manifest["counts"]["vocab_size"],
                "datastore_rows": datastore.manifest["counts"]["rows"], "query_offset": 0},
        arrays={**neighbours.rows.describe(), **distributions.rows.describe()},
        stats={"self_query": spec["self_query"], "k": params.targets.k, "temperature": params.targets.temperature,
               "width": params.targets.width, "nprobe": nprobe, "exact_distances": params.targets.exact_distances,
               "index_factory": index.manifest["stats"]["factory"],
               "index_recall_at_k": index.manifest["stats"].get("recall_at_k"),
               "faiss_version": index.manifest["stats"]["faiss_version"]},
        beam_runner=runner,
    )
    log.info("targets: published %s", build.uri)
