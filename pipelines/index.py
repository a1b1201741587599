"""``memforge index``: train the FAISS index once on a random sample, then add each key-store
shard in parallel (Beam) with its global row ids; merge the shards on disk (IVF, local storage).

Output ``<artifacts_dir>/index``: ``trained.index``, ``shard-NNNNN.index`` (one per key-store
shard), ``values.npy`` and ``keys.f32.npy`` (the datastore in row order for memory-mapped lookups,
see ``datastore_rows``), and for ``index.merge: ondisk`` ``merged.index`` + ``merged.ivfdata``.
The manifest records the factory, nlist, code size, nprobe, training sample, merge, and recall@k
against exact search measured on held-out (validation) queries.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import asdict

import apache_beam as beam
import faiss
import numpy as np

from pipelines import datastore_rows, faiss_index, knn
from pipelines.datastore_rows import DatastoreRows
from pipelines.encode import keys_uri
from pipelines.progress import ShardProgress
from pipelines.runner import pipeline
from storage import fs
from storage.artifact import ArtifactBuild, open_artifact
from storage.errors import MemforgeError
from storage.params import Params
from storage.shards import Shard, ShardMarkers, ShardPlan, load_plan
from storage.stores import KeyStore

log = logging.getLogger("memforge")


def index_uri(params: Params) -> str:
    return fs.join(params.artifacts_dir, "index")


def worker_threads(params: Params) -> int:
    """FAISS threads per Beam worker: ``index.threads``, else ``encode.threads_per_worker``."""
    return params.index.threads or params.encode.threads_per_worker


class AddShard(beam.DoFn):
    """Add one key-store shard to a copy of the trained index with global ids; write it; mark it done."""

    def __init__(self, index_uri: str, keys_uri: str, threads: int):
        self.index_uri, self.keys_uri, self.threads = index_uri, keys_uri, threads

    def setup(self) -> None:
        self.trained = faiss_index.read(fs.join(self.index_uri, faiss_index.TRAINED))
        self.keys = KeyStore.open(self.keys_uri)
        self.markers = ShardMarkers(self.index_uri)

    def process(self, element: dict):
        shard = Shard(**element)
        if self.markers.is_done(shard):
            return
        faiss.omp_set_num_threads(self.threads)  # per call: OpenMP settings are per thread under multi_threading
        started = time.perf_counter()
        index = faiss.clone_index(self.trained)
        index.add_with_ids(np.ascontiguousarray(self.keys.keys(shard.start, shard.stop), dtype=np.float32),
                           np.arange(shard.start, shard.stop, dtype=np.int64))
        name = faiss_index.shard_file(shard.name)
        checksum = faiss_index.write(index, fs.join(self.index_uri, name))
        self.markers.mark_done(shard, {name: checksum}, {"rows": shard.rows,
                                                         "seconds": time.perf_counter() - started})
        yield shard.name


def exact_knn(blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest datastore rows of ``queries`` from ``(first_row, keys)`` blocks, one block at a time."""
    best = None
    for start, block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        dists, ids = faiss.knn(queries, block, min(k, len(block)))
        dists, ids = knn.pad_to_k(dists, ids + start, k)
        if best is not None:
            dists, ids = faiss.merge_knn_results(np.stack([best[0], dists]), np.stack([best[1], ids]))
        best = (dists, ids)
    return best


def key_blocks(keys: KeyStore, plan: ShardPlan, rows: DatastoreRows):
    """The datastore's keys one shard at a time: from the memory-mapped float32 copy when the index
    has one, else from the key store."""
    for shard in plan.shards:
        source = rows.keys[shard.start:shard.stop] if rows.keys is not None else keys.keys(shard.start, shard.stop)
        yield shard.start, source


def recall_at_k(index: faiss_index.ShardedIndex, blocks, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact k nearest neighbours (over key ``blocks``) that the index returns."""
    _, exact = exact_knn(blocks, queries, k)
    _, found = index.search(queries, k)
    hits = [len(set(e[e >= 0]) & set(f[f >= 0])) / max(1, int((e >= 0).sum())) for e, f in zip(exact, found)]
    return float(np.mean(hits))


def _train(params: Params, keys: KeyStore, index: faiss.Index, factory: str, n_rows: int) -> dict:
    """Train ``index`` (fresh from ``factory``) on a seeded sample of keys and write ``trained.index``."""
    ivf = faiss_index.ivf_of(index)
    sample_size = 0
    if not index.is_trained:
        wanted = ivf.nlist * params.index.train_points_per_list if ivf is not None else params.index.train_sample
        sample_size = min(n_rows, wanted)
        rows = np.sort(np.random.default_rng(params.index.seed).choice(n_rows, sample_size, replace=False))
        log.info("index: training %s on %d sampled keys", factory, sample_size)
        index.train(np.ascontiguousarray(keys.take(rows), dtype=np.float32))
    if ivf is not None:
        faiss_index.set_nprobe(index, params.index.nprobe)
    faiss_index.write(index, fs.join(index_uri(params), faiss_index.TRAINED))
    return {"train_sample": sample_size}


def _resolve_merge(merge: str, is_ivf: bool, root: str) -> str:
    """``index.merge`` resolved: ``auto`` is ``ondisk`` for IVF indexes on local storage, else ``none``."""
    if merge == "auto":
        return "ondisk" if is_ivf and fs.is_local(root) else "none"
    if merge == "ondisk" and not fs.is_local(root):
        raise MemforgeError("index.merge: ondisk needs a local artifacts_dir (FAISS memory-maps the merged lists)")
    if merge == "ondisk" and not is_ivf:
        raise MemforgeError("index.merge: ondisk applies to IVF indexes only; use index.merge: none")
    return merge


def _merge_ondisk(root: str, plan: ShardPlan) -> None:
    """Merge the shards' inverted lists into ``merged.ivfdata`` with FAISS's ``merge_ondisk``; the
    index file that points to it is written last."""
    from faiss.contrib.ondisk import merge_ondisk

    trained = faiss_index.read(fs.join(root, faiss_index.TRAINED))
    data = fs.join(root, faiss_index.MERGED_DATA)
    fs.remove_tree(data)  # debris of an interrupted merge
    with faiss_index.native_stdout_to_stderr():  # FAISS prints the data file's size
        merge_ondisk(trained, [fs.join(root, faiss_index.shard_file(s.name)) for s in plan.shards], data)
    faiss_index.write(trained, fs.join(root, faiss_index.MERGED))


def index(params: Params, *, rebuild: bool = False, beam_args: list[str] = ()) -> str:
    """Run the index stage over the train key store; returns the index artifact's location."""
    keys_artifact = open_artifact(keys_uri(params, "train"), "keys")
    keys = KeyStore.open(keys_artifact.uri)
    n_rows = keys_artifact.manifest["counts"]["rows"]
    factory = faiss_index.resolve_factory(params.index, n_rows, keys.dim)
    section = {**params.section("index"), "resolved_factory": factory}
    root = index_uri(params)
    build = ArtifactBuild.begin(root, "index", section, {"keys": keys_artifact}, fmt="faiss", rebuild=rebuild)
    if build.up_to_date:
        log.info("index: %s is up to date (fingerprint %s)", root, build.fingerprint[:12])
        return root
    if params.index.threads:  # training runs here, on all cores unless set
        faiss.omp_set_num_threads(params.index.threads)
    empty = faiss_index.build_empty(factory, keys.dim)  # a bad factory string fails here, before any work
    merge = _resolve_merge(params.index.merge, faiss_index.ivf_of(empty) is not None, root)
    plan_uri = fs.join(root, "_plan.json")
    training_uri = fs.join(root, "_training.json")
    plan_of_keys = load_plan(keys_artifact.uri)
    if not fs.exists(plan_uri):  # the plan is written only after training finished
        fs.write_json_atomic(training_uri, _train(params, keys, empty, factory, n_rows))
    training = fs.read_json(training_uri)
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        # The datastore in row order is written while Beam starts and adds the shards; not during
        # training, whose OpenMP threads hold every core and stall when one of them is preempted.
        rows_written = background.submit(datastore_rows.write, KeyStore.open(keys_artifact.uri), plan_of_keys,
                                         root, params.index.exact_keys)
        plan = build.plan(plan_of_keys)
        pending = build.pending(plan)
        log.info("index: %s, %d key shards; %d already done (skipped), %d to add",
                 factory, len(plan.shards), len(plan.shards) - len(pending), len(pending))
        runner = None
        if pending:
            beam_pipeline, runner = pipeline(list(beam_args), params.encode.num_workers, "multi_threading")
            with ShardProgress("index", root, pending, unit="keys"):
                with beam_pipeline as p:
                    (p | "shards" >> beam.Create([asdict(s) for s in pending]) | beam.Reshuffle()
                       | "add" >> beam.ParDo(AddShard(root, keys_artifact.uri, worker_threads(params))))
        rows_written.result()
    if merge == "ondisk" and not fs.exists(fs.join(root, faiss_index.MERGED)):
        _merge_ondisk(root, plan)
    trained = faiss_index.read(fs.join(root, faiss_index.TRAINED))
    ivf = faiss_index.ivf_of(trained)
    searcher = faiss_index.ShardedIndex(root, [s.name for s in plan.shards], params.index.nprobe,
                                        merged=merge == "ondisk")
    stats = {
        "factory": factory, "nlist": ivf.nlist if ivf is not None else None,
        "code_size": trained.sa_code_size() if ivf is not None else 4 * keys.dim,
        "nprobe": params.index.nprobe if ivf is not None else None,
        "train_sample": training["train_sample"], "seed": params.index.seed, "faiss_version": faiss.__version__,
        "merge": merge, "dim": keys.dim, "exact_keys": params.index.exact_keys,
    }
    queries_uri = keys_uri(params, "validation")
    if fs.exists(fs.join(queries_uri, "_manifest.json")):
        validation = KeyStore.open(queries_uri)
        n_queries = validation.rows.n_rows
        rows = np.sort(np.random.default_rng(params.index.seed + 1).choice(
            n_queries, min(n_queries, params.index.recall_queries), replace=False))
        k = min(params.index.recall_k, n_rows)
        stats.update(recall_k=k, recall_queries=len(rows),
                     recall_at_k=round(recall_at_k(searcher, key_blocks(keys, plan, DatastoreRows(root)),
                                                   validation.take(rows), k), 4))
        log.info("index: recall@%d = %.4f on %d held-out queries", k, stats["recall_at_k"], len(rows))
    build.publish(counts={"rows": n_rows, "datastore_rows": n_rows, "dim": keys.dim}, stats=stats,
                  beam_runner=runner)
    log.info("index: published %s", root)
    return root
