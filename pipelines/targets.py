"""``memforge targets``: kNN neighbours and distillation distributions for each split (Beam).

One Beam element per query shard. Train queries are the datastore keys themselves: each searches
k+1 neighbours over every index shard (merged by distance with FAISS's merge helper) and drops
its own global id — never "the first result". Validation queries search k. Optionally neighbours
within ``exclude_same_document_window`` tokens of the query in the same document are dropped too,
and distances are recomputed exactly from the stored keys. Neighbour ids and squared L2
distances are stored once; the distribution (softmax of -d/T summed per next token, sparse,
width m) is derived from them, so ``memforge retemper`` can redo it for another T or smaller k.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import apache_beam as beam
import faiss
import numpy as np

from pipelines import faiss_index, knn
from pipelines.encode import keys_uri
from pipelines.index import index_uri
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


def gather_neighbours(datastore: KeyStore, ids: np.ndarray, queries: np.ndarray | None = None):
    """Values (int64, -1 where no neighbour) of neighbour ``ids`` and, given ``queries``, their exact
    squared L2 distances (inf where no neighbour). Streams the datastore one Zarr chunk at a time,
    so each chunk is read once per batch and no worker holds the whole datastore."""
    values = np.full(ids.shape, knn.MISSING, dtype=np.int64)
    dists = np.full(ids.shape, np.inf, dtype=np.float32) if queries is not None else None
    rows, cols = np.nonzero(ids >= 0)
    wanted = ids[rows, cols]
    order = np.argsort(wanted, kind="stable")
    rows, cols, wanted = rows[order], cols[order], wanted[order]
    step, n_rows = datastore.rows.array("vals").chunks[0], datastore.rows.n_rows
    bounds = np.searchsorted(wanted, np.arange(0, n_rows + step, step))
    for chunk, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a == b:
            continue
        start, stop = chunk * step, min((chunk + 1) * step, n_rows)
        local = wanted[a:b] - start
        values[rows[a:b], cols[a:b]] = datastore.vals(start, stop)[local]
        if queries is not None:
            difference = datastore.keys(start, stop).astype(np.float32)[local] - queries[rows[a:b]]
            dists[rows[a:b], cols[a:b]] = np.einsum("ij,ij->i", difference, difference)
    return values, dists


def distribution_of(datastore: KeyStore, dists: np.ndarray, ids: np.ndarray, temperature: float, width: int):
    """Sparse distributions of a batch of neighbour rows (values read from the datastore by id)."""
    values, _ = gather_neighbours(datastore, ids)
    return knn.distributions(dists, values, temperature, width)


class SearchShard(beam.DoFn):
    """Neighbours and distributions of one query shard; both stores' files under one marker."""

    def __init__(self, spec: dict):
        self.spec = spec

    def setup(self) -> None:
        spec = self.spec
        if spec["threads"]:
            faiss.omp_set_num_threads(spec["threads"])
        self.index = faiss_index.ShardedIndex(spec["index_uri"], spec["index_shards"], spec["nprobe"],
                                              spec["merged"])
        self.datastore = KeyStore.open(spec["datastore_uri"])
        self.queries = KeyStore.open(spec["queries_uri"])
        self.neighbours = NeighbourStore.open(spec["out_uri"], writable=True)
        self.distributions = DistributionStore.open(spec["out_uri"], writable=True)
        self.markers = ShardMarkers(spec["out_uri"])
        self.docs = None
        if spec["window"]:
            self.docs = (TokenStore(spec["tokens_uri"], "train"), PartOffsets.from_json(spec["parts"]))

    def process(self, element: dict):
        shard = Shard(**element)
        if self.markers.is_done(shard):
            return
        started = time.perf_counter()
        spec = self.spec
        queries = np.ascontiguousarray(self.queries.keys(shard.start, shard.stop), dtype=np.float32)
        dists, ids = self.neighbours_of(shard, queries)
        if spec["exact_distances"]:
            values, exact = gather_neighbours(self.datastore, ids, queries)
            order = np.argsort(exact, axis=1, kind="stable")
            dists, ids, values = (np.take_along_axis(a, order, axis=1) for a in (exact, ids, values))
        else:
            values, _ = gather_neighbours(self.datastore, ids)
        tokens, probs, truncated = knn.distributions(dists, values, spec["temperature"], spec["width"])
        files = self.neighbours.write_shard(shard, ids, dists)
        files.update(self.distributions.write_shard(shard, tokens, probs, truncated))
        self.markers.mark_done(shard, files, {"rows": shard.rows, "seconds": time.perf_counter() - started})
        yield shard.name

    def neighbours_of(self, shard: Shard, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search, then drop the query itself (by id) and same-document neighbours; k per row."""
        spec = self.spec
        extra = (1 + 2 * spec["window"]) if spec["self_query"] else 0
        dists, ids = self.index.search(queries, min(spec["k"] + extra, spec["datastore_rows"]))
        drop = np.zeros(ids.shape, dtype=bool)
        if spec["self_query"]:
            own = np.arange(shard.start, shard.stop, dtype=np.int64)[:, None]
            drop = ids == own
            if spec["window"]:
                drop |= self.same_document_nearby(own, ids)
        return knn.drop_ids(dists, ids, drop, spec["k"])

    def same_document_nearby(self, own: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Neighbours within ``window`` rows of the query whose value token is in the query's document."""
        window = self.spec["window"]
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
    nlist, nprobe = index.manifest["stats"]["nlist"], params.targets.nprobe or params.index.nprobe
    if nlist is not None and nprobe > nlist:
        raise MemforgeError(f"targets.nprobe: {nprobe} exceeds the index's nlist ({nlist})")


def targets(params: Params, *, rebuild: bool = False, beam_args: list[str] = ()) -> str:
    """Run the targets stage for both splits; returns the targets directory."""
    index = open_artifact(index_uri(params), "index")
    datastore = open_artifact(keys_uri(params, "train"), "keys")
    tokens = open_artifact(tokens_uri(params), "tokens")
    nprobe = params.targets.nprobe or params.index.nprobe
    index_plan = load_plan(index.uri)
    queries_by_split = {split: open_artifact(keys_uri(params, split), "keys") for split in SPLITS}
    for queries in queries_by_split.values():  # every split is checked before any work starts
        check_compatible(params, index, datastore, queries)
    runner = None
    for split, queries in queries_by_split.items():
        runner = _targets_for_split(params, split, index, datastore, queries, tokens, nprobe,
                                    [s.name for s in index_plan.shards], rebuild, beam_args) or runner
    return fs.join(params.artifacts_dir, "targets")


def _targets_for_split(params, split, index, datastore, queries, tokens, nprobe, index_shards, rebuild, beam_args):
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
    chunk_rows, shard_rows = shard_geometry(n_rows, params.encode.chunk_rows, params.encode.shard_chunks)
    shard_chunks = shard_rows // chunk_rows
    neighbours = NeighbourStore.create(uri, n_rows, params.targets.k, chunk_rows, shard_chunks)
    distributions = DistributionStore.create(uri, n_rows, params.targets.width, params.targets.probs_dtype,
                                             chunk_rows, shard_chunks)
    plan = build.plan(load_plan(queries.uri))
    pending = build.pending(plan)
    log.info("targets: %s: %d queries in %d shards; %d already done (skipped), %d to run",
             split, n_rows, len(plan.shards), len(plan.shards) - len(pending), len(pending))
    self_query = split == "train"
    spec = {
        "index_uri": index.uri, "index_shards": index_shards, "merged": index.manifest["stats"]["merge"] == "ondisk",
        "nprobe": nprobe, "datastore_uri": datastore.uri, "queries_uri": queries.uri, "out_uri": uri,
        "k": params.targets.k, "temperature": params.targets.temperature, "width": params.targets.width,
        "exact_distances": params.targets.exact_distances, "self_query": self_query,
        "datastore_rows": datastore.manifest["counts"]["rows"],
        "window": params.targets.exclude_same_document_window if self_query else 0,
        "tokens_uri": tokens.uri, "parts": tokens.manifest["stats"]["splits"]["train"]["parts"],
        "threads": params.index.threads or params.encode.threads_per_worker,
    }
    runner = None
    if pending:
        beam_pipeline, runner = pipeline(list(beam_args), params.encode.num_workers)
        with ShardProgress(f"targets {split}", uri, pending, unit="queries"):
            with beam_pipeline as p:
                (p | "shards" >> beam.Create([asdict(s) for s in pending]) | beam.Reshuffle()
                   | "search" >> beam.ParDo(SearchShard(spec)))
    arrays = {**neighbours.rows.describe(), **distributions.rows.describe()}
    build.publish(
        counts={"rows": n_rows, "vocab_size": datastore.manifest["counts"]["vocab_size"],
                "datastore_rows": spec["datastore_rows"], "query_offset": 0},
        arrays=arrays,
        stats={"self_query": self_query, "k": params.targets.k, "temperature": params.targets.temperature,
               "width": params.targets.width, "nprobe": nprobe, "exact_distances": params.targets.exact_distances,
               "index_factory": index.manifest["stats"]["factory"],
               "index_recall_at_k": index.manifest["stats"].get("recall_at_k"),
               "faiss_version": index.manifest["stats"]["faiss_version"]},
        beam_runner=runner,
    )
    log.info("targets: published %s", uri)
    return runner
