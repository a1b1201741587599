"""kNN-LM against decoder + memory as the datastore grows to ``max(SIZES)`` keys (part of ``bench --only scale``).

The paper's speed claim (the memory ~80x faster than kNN-LM at 500 M tokens) depends on N: kNN-LM's search
cost grows with the datastore, the memory's does not. Beyond what this machine can encode, the datastore is
synthetic but costs what a real one does:

- keys: the real keys of the bench's ``KNN_SCALE`` x corpus encoded by the bench's ``small`` GPT-2 (4 layers,
  d 128: the demo decoder's shape) come first; every further row is one of them plus Gaussian noise of
  ``NOISE`` x the keys' per-dimension std, so the IVF lists fill as the real keys' lists do. They are written
  float16 to ``keys.npy`` for exact re-ranking, as the index stage does;
- values: the real next tokens, repeated with their keys;
- index: the reference kNN-LM configuration, IVF 4096 lists with PQ (one sub-quantizer per 2 dims, as
  ``auto`` chooses for d 128), trained on 4096 x 39 real keys, searched at nprobe 32 for k 1024 with exact
  re-ranking. Real rows join the list of their nearest centroid; a noisy copy joins its source's list
  (FAISS's ``add_core`` with that assignment), so every list grows in proportion to its real size and
  adding skips the 4096-centroid search per row (which took most of the 11 min that adding 33 M rows
  took here). One index grows through the sizes (rows are only added), and each size is timed as it is
  reached. The ``auto`` index is measured on the real datastores of ``bench_scale`` (its nlist grows with N;
  building it for 33 M synthetic keys would take hours here: adding costs N x nlist distance computations).

At each size, evaluate's own three passes (``training.evaluate.score_three_ways``: decoder, kNN-LM,
decoder + memory) score the same validation tokens (the ``KNN_SCALE`` x corpus's validation split). The
timed memory is a freshly initialised one of the default shape (``memory.*`` params; seeded): its speed
does not depend on its weights. The decoder and decoder + memory passes (~1 s each here) are timed
``FAST_PASS_REPEATS`` times per size, alternating, and their medians taken. This VM's speed drifts by
10-20 % over a sweep (the decoder alone, which never reads the datastore, drifts with it), so the
spread of decoder + memory's speed over the decoder's at the same size is reported beside its raw spread:
the memory's own cost, free of the machine's drift. kNN-LM's time per token is fitted as a + c·N and extrapolated
to 100 M and 500 M keys (labelled as extrapolation).
"""
from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from memforge.bench.measure import Note, tree_bytes
from memforge.pipelines.faiss_build import faiss
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.params import Params

if TYPE_CHECKING:  # numba (the re-ranking kernel) is imported only when a datastore is read
    from memforge.pipelines.datastore_rows import DatastoreRows

log = logging.getLogger("memforge")

KNN_SCALE = 2  # the corpus (x the bench's 1 MB) whose small-model keys seed the synthetic datastore
SIZES = tuple(2 ** p for p in range(19, 26))  # 524k .. 33.5M keys
NOISE = 0.05
REFERENCE = {"nlist": 4096, "nprobe": 32, "k": 1024, "train_points_per_list": 39}
ADD_BLOCK = 1 << 20
FAST_PASS_REPEATS = 5  # decoder and decoder + memory take ~1 s a pass here: their median of 5 is timed
EXTRAPOLATE_TO = (100_000_000, 500_000_000)
REFERENCE_INDEX = f"IVF{REFERENCE['nlist']},PQ (d/2 sub-quantizers), nprobe {REFERENCE['nprobe']}, k {REFERENCE['k']}"

NOTES = {
    "knnlm_scale_factory": Note("the index factory of the kNN-LM sweep (the reference kNN-LM configuration)"),
    "knnlm_scale_largest_rows": Note("keys of the sweep's largest datastore (real small-model keys, then noisy "
                                     "copies)"),
    "knnlm_scale_memory_vs_knnlm_largest": Note(f"decoder + memory tokens/s ÷ kNN-LM tokens/s ({REFERENCE_INDEX}, "
                                                "exact re-ranking) at the largest size"),
    "knnlm_scale_decoder_vs_knnlm_largest": Note("decoder tokens/s ÷ kNN-LM tokens/s at the largest size"),
    "knnlm_scale_b_largest_two": Note("b of kNN-LM time per token ∝ N^b between the two largest sizes"),
    "knnlm_scale_memory_speed_spread": Note("decoder + memory tokens/s over the sizes: lowest and highest ÷ mean, "
                                            "minus 1 (the machine's drift included)"),
    "knnlm_scale_memory_per_decoder_spread": Note("the same for decoder + memory tokens/s ÷ decoder tokens/s at "
                                                  "each size (the memory's own cost, free of drift)"),
    **{f"knnlm_scale_memory_vs_knnlm_{n // 1_000_000}M_extrapolated": Note(
        f"decoder + memory ÷ kNN-LM at {n // 1_000_000} M keys from the fit a + c·N: extrapolated, not measured")
       for n in EXTRAPOLATE_TO},
}


class IndexSearcher:
    """``ShardedIndex.search`` over an index held in memory (the grown synthetic index)."""

    def __init__(self, index: faiss.Index):
        self.index = index

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def synthetic_rows(real_keys: np.ndarray, real_values: np.ndarray, noise: np.ndarray, start: int, stop: int):
    """Rows ``[start, stop)`` of the synthetic datastore: the real rows first, then copies of them plus
    Gaussian noise of std ``noise`` (per dimension), seeded by ``start``. Returns keys, values and each
    row's source (the real row it copies)."""
    n_real = len(real_keys)
    rows = np.arange(start, stop)
    source = rows % n_real
    keys = real_keys[source].astype(np.float32)
    copies = rows >= n_real
    if copies.any():
        rng = np.random.default_rng(start)
        keys[copies] += rng.standard_normal((int(copies.sum()), keys.shape[1]), dtype=np.float32) * noise
    return keys, real_values[source], source


def real_lists(index: faiss.Index, real_keys: np.ndarray) -> np.ndarray:
    """The IVF list of each real key: its nearest centroid (int64, as ``add_core`` takes it)."""
    _, lists = faiss.extract_index_ivf(index).quantizer.search(np.ascontiguousarray(real_keys, dtype=np.float32), 1)
    return np.ascontiguousarray(lists.ravel(), dtype=np.int64)


def add_to_lists(index: faiss.Index, keys: np.ndarray, lists: np.ndarray) -> None:
    """Append ``keys`` to ``index`` in the given IVF ``lists`` (ids continue from ``ntotal``)."""
    keys, lists = np.ascontiguousarray(keys, dtype=np.float32), np.ascontiguousarray(lists, dtype=np.int64)
    index.add_core(len(keys), faiss.swig_ptr(keys), None, faiss.swig_ptr(lists))


class Seed(NamedTuple):
    """The real datastore that seeds the synthetic one: the ``KNN_SCALE`` x corpus encoded by the bench's
    ``small`` model (its params), its keys and next tokens, and the validation keys' manifest stats
    (representation, layer, hidden size, block size, stride) and rows."""
    params: Params
    keys: np.ndarray
    values: np.ndarray
    stats: dict
    validation_rows: int


def seed_datastore(ws) -> Seed:
    """The ``KNN_SCALE`` x corpus encoded by the small model (prepared and encoded once), read."""
    from memforge.flows.stages import run_stage
    from memforge.storage.stores import KeyStore

    params = ws.params(KNN_SCALE, "small")
    art = params.artifacts_dir
    if not fs.exists(fs.join(art, "keys", "train", "_manifest.json")):
        run_stage("encode", params)
    store = KeyStore.open(fs.join(art, "keys", "train"))
    queries = open_artifact(fs.join(art, "keys", "validation"))
    return Seed(params, np.asarray(store.keys()), np.asarray(store.vals()), queries.manifest["stats"],
                queries.manifest["counts"]["rows"])


def timed_models(seed: Seed, memory_config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The seed's encoder (the small model: the decoder whose speed is timed) and a freshly initialised memory
    of ``memory_config``'s shape over its keys (seed 0): speed does not depend on the weights."""
    from memforge.pipelines.encoder import load_encoder
    from memforge.training.memory import build_memory

    decoder = load_encoder(seed.params.encode.model)
    torch.manual_seed(0)
    memory = build_memory(memory_config, seed.stats["hidden_size"], int(decoder.config.vocab_size)).eval()
    return decoder, memory


class SyntheticDatastore:
    """The reference index (``REFERENCE``) trained on real keys and grown with them and their noisy copies
    (``synthetic_rows``; each row in its source's IVF list), its rows also written to ``keys.npy`` (float16) and
    ``values.npy`` under ``directory`` (up to ``capacity`` rows) for exact re-ranking (``rows``)."""

    def __init__(self, real_keys: np.ndarray, real_values: np.ndarray, directory: str, capacity: int):
        from memforge.pipelines import faiss_index
        from memforge.pipelines.datastore_rows import KEYS, VALUES

        self.real_keys, self.real_values, self.directory = real_keys, real_values, directory
        dim = real_keys.shape[1]
        self.factory = f"IVF{REFERENCE['nlist']},PQ{faiss_index.pq_subquantizers(dim)}"
        self.index = faiss.index_factory(dim, self.factory)
        points = REFERENCE["nlist"] * REFERENCE["train_points_per_list"]
        sample = np.random.default_rng(0).choice(len(real_keys), points, replace=False)
        started = time.perf_counter()
        self.index.train(real_keys[np.sort(sample)].astype(np.float32))
        faiss.extract_index_ivf(self.index).nprobe = REFERENCE["nprobe"]
        self.train_seconds, self.add_seconds = time.perf_counter() - started, 0.0
        real_keys32 = real_keys.astype(np.float32)
        self.noise = NOISE * real_keys32.std(axis=0)
        self.lists = real_lists(self.index, real_keys32)
        self.keys_file = np.lib.format.open_memmap(f"{directory}/{KEYS}", "w+", np.float16, (capacity, dim))
        self.values_file = np.lib.format.open_memmap(f"{directory}/{VALUES}", "w+", np.int32, (capacity,))
        self.searcher = IndexSearcher(self.index)

    def grow(self, size: int) -> None:
        """Add rows until the datastore has ``size`` (timed into ``add_seconds``)."""
        started = time.perf_counter()
        for start in range(self.index.ntotal, size, ADD_BLOCK):
            stop = min(size, start + ADD_BLOCK)
            keys, values, source = synthetic_rows(self.real_keys, self.real_values, self.noise, start, stop)
            self.keys_file[start:stop], self.values_file[start:stop] = keys, values
            add_to_lists(self.index, keys, self.lists[source])
        self.keys_file.flush()
        self.values_file.flush()
        self.add_seconds += time.perf_counter() - started

    def rows(self) -> DatastoreRows:
        """The rows as a search reads them (``DatastoreRows``: next tokens, exact keys)."""
        from memforge.pipelines.datastore_rows import DatastoreRows

        return DatastoreRows(self.directory, f"synthetic-{self.index.ntotal}")


def knnlm_sweep(ws, scale_params: Params) -> dict:
    """Time decoder, kNN-LM (reference configuration) and decoder + memory at each of ``SIZES``."""
    from memforge.training.evaluate import Scorer, score_three_ways
    from memforge.training.token_stream import TokenStream

    seed = seed_datastore(ws)
    stats = seed.stats
    decoder, memory = timed_models(seed, scale_params.memory)
    scorer = Scorer(decoder, TokenStream(open_artifact(fs.join(seed.params.artifacts_dir, "tokens")), "validation"),
                    seed.validation_rows, stats["block_size"], stats["stride"], Params().evaluate.batch_size)
    series = []
    with tempfile.TemporaryDirectory(dir=ws.root) as scratch:
        datastore = SyntheticDatastore(seed.keys, seed.values, scratch, max(SIZES))
        for size in SIZES:
            datastore.grow(size)
            rows = datastore.rows()
            timings = [score_three_ways(scorer, datastore.searcher, rows, memory, REFERENCE["k"], np.array([1.0]),
                                        (stats["representation"], stats["layer"]),
                                        (stats["representation"], stats["layer"]), "fp32",
                                        only=("decoder", "knnlm", "memory") if not repeat else ("decoder", "memory")
                                        ).timings for repeat in range(FAST_PASS_REPEATS)]
            speed = {name: round(scorer.n_rows / statistics.median(t[name] for t in timings if name in t), 1)
                     for name in ("decoder", "knnlm", "memory")}
            point = {"datastore_rows": size, "real_rows": min(size, len(seed.keys)), "tokens_per_second": speed,
                     "memory_vs_knnlm": round(speed["memory"] / speed["knnlm"], 3),
                     "decoder_vs_knnlm": round(speed["decoder"] / speed["knnlm"], 3)}
            log.info("bench scale: kNN-LM at %d keys: %s", size, point)
            series.append(point)
        disk_gb = round(tree_bytes(ws.root) / 2**30, 2)  # the largest synthetic datastore, on disk
    return {"factory": datastore.factory, "nprobe": REFERENCE["nprobe"], "k": REFERENCE["k"], "exact_distances": True,
            "validation_rows": scorer.n_rows, "real_keys": len(seed.keys), "noise": NOISE,
            "decoder": "bench small GPT-2 (4 layers, d 128)", "memory": "default shape, seeded init (speed only)",
            "train_seconds": round(datastore.train_seconds, 1), "add_seconds": round(datastore.add_seconds, 1),
            "workspace_disk_gb": disk_gb,
            "series": {"reference": series}, "fit": fit(series)}


def spread(values: list[float]) -> list[float]:
    """The lowest and highest of ``values`` relative to their mean, minus 1 (rounded to 0.1 %)."""
    mean = float(np.mean(values))
    return [round(min(values) / mean - 1, 3), round(max(values) / mean - 1, 3)]


def fit(series: list[dict]) -> dict:
    """kNN-LM's seconds per token fitted as a + c·N (least squares): with nlist and nprobe fixed, the codes a
    query scans grow in proportion to N, on top of the decoder, quantizer and re-ranking costs that do not.
    Extrapolated to ``EXTRAPOLATE_TO`` keys (not measured), with decoder + memory's speed taken as constant
    (its mean over the sizes: its spread is reported)."""
    sizes = np.array([p["datastore_rows"] for p in series], float)
    per_token = np.array([1 / p["tokens_per_second"]["knnlm"] for p in series])
    (c, a), *_ = np.linalg.lstsq(np.stack([sizes, np.ones_like(sizes)], axis=1), per_token, rcond=None)
    memory = float(np.mean([p["tokens_per_second"]["memory"] for p in series]))
    decoder = float(np.mean([p["tokens_per_second"]["decoder"] for p in series]))
    per_decoder = [p["tokens_per_second"]["memory"] / p["tokens_per_second"]["decoder"] for p in series]
    extrapolated = {}
    for n in EXTRAPOLATE_TO:
        knn_speed = float(1 / (a + c * n))
        extrapolated[f"{n // 1_000_000}M"] = {"knnlm_tokens_per_second": round(knn_speed, 1),
                                              "memory_vs_knnlm": round(memory / knn_speed, 2),
                                              "decoder_vs_knnlm": round(decoder / knn_speed, 2)}
    slope = math.log(per_token[-1] / per_token[-2]) / math.log(sizes[-1] / sizes[-2])
    return {"knnlm_seconds_per_token": {"fixed": float(f"{a:.4g}"), "per_key": float(f"{c:.4g}")},
            "knnlm_b_between_largest_two": round(slope, 3),
            "memory_tokens_per_second_mean": round(memory, 1),
            "memory_tokens_per_second_spread": spread([p["tokens_per_second"]["memory"] for p in series]),
            "memory_per_decoder_spread": spread(per_decoder),
            "extrapolation (not measured)": extrapolated}


def flat(knnlm: dict) -> dict:
    """The headline figures of the sweep, flat."""
    last = knnlm["series"]["reference"][-1]
    figures = {"knnlm_scale_factory": knnlm["factory"], "knnlm_scale_largest_rows": last["datastore_rows"],
               "knnlm_scale_memory_vs_knnlm_largest": last["memory_vs_knnlm"],
               "knnlm_scale_decoder_vs_knnlm_largest": last["decoder_vs_knnlm"],
               "knnlm_scale_b_largest_two": knnlm["fit"]["knnlm_b_between_largest_two"],
               "knnlm_scale_memory_speed_spread": knnlm["fit"]["memory_tokens_per_second_spread"],
               "knnlm_scale_memory_per_decoder_spread": knnlm["fit"]["memory_per_decoder_spread"]}
    for label, point in knnlm["fit"]["extrapolation (not measured)"].items():
        figures[f"knnlm_scale_memory_vs_knnlm_{label}_extrapolated"] = point["memory_vs_knnlm"]
    return figures
