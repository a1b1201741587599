"""``memforge index``: train the FAISS index once on a random sample, then add each key-store
shard in parallel (Beam) with its global row ids; merge the shards on disk (IVF, local storage).

Its steps, in order, are named parts of the declaration: ``train`` (before the plan), ``add`` (the
Beam shards), ``datastore_rows`` (beside the workers), ``merge`` and ``recall`` (at publish; recall
reads the validation keys, a declared input).

Output ``<artifacts_dir>/index``: ``trained.index``, ``shard-NNNNN.index`` (one per key-store
shard), ``values.npy`` and ``keys.npy`` (the datastore in row order for memory-mapped lookups,
see ``datastore_rows``), and for ``index.merge: ondisk`` ``merged.index`` + ``merged.ivfdata``.
The manifest records the factory, nlist, code size, nprobe, training sample, merge, and recall@k
against exact search measured on held-out (validation) queries.
"""
from __future__ import annotations

import logging

import numpy as np

from memforge.pipelines import datastore_rows, faiss_gpu, faiss_index, neighbour_lists, ondisk_merge, sharded_index
from memforge.pipelines.datastore_rows import DatastoreRows
from memforge.pipelines.faiss_build import faiss
from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.storage import fs
from memforge.storage.errors import MemforgeError
from memforge.storage.shards import Shard, ShardPlan, load_plan
from memforge.storage.stores import KeyStore

log = logging.getLogger("memforge")
TRAINING_RECORD = "_training.json"


class AddShards(ShardWorker):
    """Add one key-store shard to a copy of the trained index with global ids; write it. With ``gpu``, an IVF
    index's shard is added on a GPU (``faiss_gpu.add_on_gpu``)."""

    def __init__(self, index_uri: str, keys_uri: str, threads: int, gpu: str | int | None):
        self.index_uri, self.keys_uri, self.threads, self.gpu = index_uri, keys_uri, threads, gpu

    def setup(self) -> None:
        self.trained = faiss_index.read(fs.join(self.index_uri, faiss_index.TRAINED))
        self.keys = KeyStore.open(self.keys_uri)

    def process(self, role: str, uri: str, shard: Shard):
        faiss.omp_set_num_threads(self.threads)  # per call: OpenMP settings are per thread under multi_threading
        index = faiss.clone_index(self.trained)
        vectors = np.ascontiguousarray(self.keys.keys(shard.start, shard.stop), dtype=np.float32)
        ids = np.arange(shard.start, shard.stop, dtype=np.int64)
        if self.gpu is not None and faiss_index.ivf_of(index) is not None:
            index = faiss_gpu.add_on_gpu(index, self.gpu, shard.id, vectors, ids)
        else:
            index.add_with_ids(vectors, ids)
        name = faiss_index.shard_file(shard.name)
        return {name: faiss_index.write(index, fs.join(self.index_uri, name))}, {}


def exact_knn(blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest datastore rows of ``queries`` from ``(first_row, keys)`` blocks, one block at a time."""
    best = None
    for start, block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        dists, ids = faiss.knn(queries, block, min(k, len(block)))
        dists, ids = neighbour_lists.pad_to_k(dists, ids + start, k)
        if best is not None:
            dists, ids = faiss.merge_knn_results(np.stack([best[0], dists]), np.stack([best[1], ids]))
        best = (dists, ids)
    return best


def key_blocks(keys: KeyStore, plan: ShardPlan, rows: DatastoreRows):
    """The datastore's keys one shard at a time: from the index's memory-mapped copy when it has one,
    else from the key store."""
    for shard in plan.shards:
        source = rows.key_rows(shard.start, shard.stop) if rows.keys is not None else keys.keys(shard.start, shard.stop)
        yield shard.start, source


def recall_at_k(index: sharded_index.ShardedIndex, blocks, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact k nearest neighbours (over key ``blocks``) that the index returns."""
    _, exact = exact_knn(blocks, queries, k)
    _, found = index.search(queries, k)
    hits = [len(set(e[e >= 0]) & set(f[f >= 0])) / max(1, int((e >= 0).sum())) for e, f in zip(exact, found)]
    return float(np.mean(hits))


def _train(params, keys: KeyStore, index: faiss.Index, factory: str, n_rows: int, root: str,
           gpu: str | int | None) -> tuple[dict, str]:
    """Train ``index`` (fresh from ``factory``) on a seeded sample of keys and write ``trained.index``; with
    ``gpu``, the k-means of the IVF lists assigns points on the GPU (FAISS's clustering index). Returns the
    training record and the written file's checksum."""
    ivf = faiss_index.ivf_of(index)
    sample_size, where = 0, "cpu"
    if not index.is_trained:
        wanted = ivf.nlist * params.index.train_points_per_list if ivf is not None else params.index.train_sample
        sample_size = min(n_rows, wanted)
        rows = np.sort(np.random.default_rng(params.index.seed).choice(n_rows, sample_size, replace=False))
        clustering = None
        if gpu is not None and ivf is not None:
            clustering = faiss_gpu.to_gpu(faiss.IndexFlat(ivf.d, ivf.metric_type), gpu)
            ivf.clustering_index, where = clustering, faiss_gpu.describe(gpu)
        log.info("index: training %s on %d sampled keys (%s)", factory, sample_size, where)
        try:
            index.train(np.ascontiguousarray(keys.take(rows), dtype=np.float32))
        except RuntimeError as exc:  # FAISS refuses what these params ask of this sample
            raise MemforgeError(f"index.factory: FAISS cannot train {factory} on {sample_size} sampled keys "
                                f"(index.train_points_per_list, index.train_sample): "
                                f"{str(exc).strip().splitlines()[-1]}") from None
        finally:
            if clustering is not None:
                ivf.clustering_index = None  # FAISS holds no reference to it
    if ivf is not None:
        faiss_index.set_nprobe(index, params.index.nprobe)
    checksum = faiss_index.write(index, fs.join(root, faiss_index.TRAINED))
    return {"train_sample": sample_size, "train_device": where}, checksum


def _resolve_merge(merge: str, is_ivf: bool, root: str) -> str:
    """``index.merge`` resolved: ``auto`` is ``ondisk`` for IVF indexes on local storage, else ``none``."""
    if merge == "auto":
        return "ondisk" if is_ivf and fs.is_local(root) else "none"
    if merge == "ondisk" and not fs.is_local(root):
        raise MemforgeError("index.merge: ondisk needs a local artifacts_dir (FAISS writes the merged lists to a "
                            "local file; a merged index copied to an object store is searched from there)")
    if merge == "ondisk" and not is_ivf:
        raise MemforgeError("index.merge: ondisk applies to IVF indexes only; use index.merge: none")
    return merge


class Index(Stage):
    """The FAISS index over the train keys: train, add (Beam), datastore rows, merge, recall."""

    name = "index"
    summary = "train the FAISS index once, then add key shards in parallel (Beam)"
    outputs = ("index",)
    format = "faiss"
    inputs = ("keys/train", "keys/validation")
    content = ("index.factory", "index.flat_threshold", "index.train_points_per_list", "index.train_sample",
               "index.nprobe", "index.merge", "index.exact_keys", "index.recall_queries", "index.recall_k",
               "index.seed")
    execution = ("index.threads", "index.device", "runtime.num_workers", "runtime.threads_per_worker")
    sharded = True
    running_mode = "multi_threading"
    progress_unit = "keys"
    steps = ("train", "add", "datastore_rows", "merge", "recall")

    def check(self, ctx: Context) -> None:
        keys = ctx.inputs["keys/train"]
        dim = keys.manifest["stats"]["hidden_size"]
        factory = faiss_index.resolve_factory(ctx.params.index, keys.manifest["counts"]["rows"], dim)
        empty = faiss_index.build_empty(factory, dim)  # a bad factory string fails here, before any work
        ivf, n_rows = faiss_index.ivf_of(empty), keys.manifest["counts"]["rows"]
        if ivf is not None and ivf.nlist > n_rows:
            raise MemforgeError(f"index.factory: {factory} has {ivf.nlist} inverted lists, more than the "
                                f"{n_rows} keys to train them on; use fewer lists (or factory: auto)")
        if ivf is not None and ctx.params.index.nprobe > ivf.nlist:
            raise MemforgeError(f"index.nprobe: {ctx.params.index.nprobe} exceeds the {ivf.nlist} lists of {factory}")
        ctx.scratch.update(factory=factory, merge=_resolve_merge(ctx.params.index.merge, ivf is not None,
                                                                 ctx.uri("index")),
                           gpu=faiss_gpu.faiss_gpu(ctx.params.index.device))

    def artifact_params(self, ctx: Context, role: str) -> dict:
        return {**ctx.params.values(self.content, strip="index"), "resolved_factory": ctx.scratch["factory"]}

    def artifact_inputs(self, ctx: Context, role: str) -> dict:
        return {"keys": ctx.inputs["keys/train"], "recall_queries": ctx.inputs["keys/validation"]}

    def before_plan(self, ctx: Context, role: str, build) -> None:
        """Step ``train``: the index is trained once, before its plan is written."""
        if ctx.params.index.threads:  # training runs in the driver, on all cores unless set
            faiss.omp_set_num_threads(ctx.params.index.threads)
        keys = ctx.inputs["keys/train"]
        factory = ctx.scratch["factory"]
        empty = faiss_index.build_empty(factory, keys.manifest["stats"]["hidden_size"])
        record, checksum = _train(ctx.params, KeyStore.open(keys.uri), empty, factory, keys.manifest["counts"]["rows"],
                                  build.uri, ctx.scratch["gpu"])
        fs.write_json_atomic(fs.join(build.uri, TRAINING_RECORD), record)
        ctx.scratch.setdefault("hashed", {})[faiss_index.TRAINED] = checksum

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        """Step ``add``: one element per key-store shard."""
        return load_plan(ctx.inputs["keys/train"].uri)

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        return AddShards(roles["index"], ctx.inputs["keys/train"].uri, faiss_index.worker_threads(ctx.params),
                         ctx.scratch["gpu"])

    def beside_workers(self, ctx: Context, role: str):
        """Step ``datastore_rows``: the datastore in row order, written while the workers add the shards
        (not during training, whose OpenMP threads hold every core)."""
        keys, root, exact = ctx.inputs["keys/train"].uri, ctx.uri(role), ctx.params.index.exact_keys
        return lambda: ctx.scratch.setdefault("hashed", {}).update(
            datastore_rows.write(KeyStore.open(keys), load_plan(keys), root, exact))

    def finalize(self, ctx: Context, role: str, build) -> Published:
        root, plan = build.uri, load_plan(build.uri)
        merge = ctx.scratch["merge"]
        if merge == "ondisk" and not fs.exists(fs.join(root, faiss_index.MERGED)):
            ctx.scratch.setdefault("hashed", {}).update(
                ondisk_merge.merge_in_child(root, [shard.name for shard in plan.shards]))
        keys = KeyStore.open(ctx.inputs["keys/train"].uri)
        n_rows = keys.rows.n_rows
        trained = faiss_index.read(fs.join(root, faiss_index.TRAINED))
        ivf = faiss_index.ivf_of(trained)
        stats = {
            "factory": ctx.scratch["factory"], "nlist": ivf.nlist if ivf is not None else None,
            "code_size": trained.sa_code_size() if ivf is not None else 4 * keys.dim,
            "nprobe": ctx.params.index.nprobe if ivf is not None else None,
            **fs.read_json(fs.join(root, TRAINING_RECORD)),
            "add_device": faiss_gpu.describe(ctx.scratch["gpu"] if ivf is not None else None),
            "seed": ctx.params.index.seed, "faiss_version": faiss.__version__,
            "merge": merge, "dim": keys.dim, "exact_keys": ctx.params.index.exact_keys,
        }
        stats.update(self.recall(ctx, build, plan, keys, merge))
        return Published(counts={"rows": n_rows, "datastore_rows": n_rows, "dim": keys.dim}, stats=stats,
                         hashed=ctx.scratch.get("hashed"))

    def recall(self, ctx: Context, build, plan: ShardPlan, keys: KeyStore, merge: str) -> dict:
        """Step ``recall``: recall@k against exact search on a seeded sample of validation keys."""
        root = build.uri
        searcher = sharded_index.ShardedIndex(root, build.fingerprint, [s.name for s in plan.shards],
                                            ctx.params.index.nprobe, merged=merge == "ondisk")
        validation = KeyStore.open(ctx.inputs["keys/validation"].uri)
        n_queries = validation.rows.n_rows
        rows = np.sort(np.random.default_rng(ctx.params.index.seed + 1).choice(
            n_queries, min(n_queries, ctx.params.index.recall_queries), replace=False))
        k = min(ctx.params.index.recall_k, keys.rows.n_rows)
        blocks = key_blocks(keys, plan, DatastoreRows(root, build.fingerprint))
        found = round(recall_at_k(searcher, blocks, validation.take(rows), k), 4)
        log.info("index: recall@%d = %.4f on %d held-out queries", k, found, len(rows))
        return {"recall_k": k, "recall_queries": len(rows), "recall_at_k": found}
