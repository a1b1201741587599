"""``memforge bench --only gpu``, its FAISS figures: index build and targets search on the GPU, against the
CPU and a bare GPU search, on a datastore encoded by the part (``gpu.FAISS_SCALE`` MB of text through a
GPT-2-small-shaped encoder: about a million rows at d 768).

- the ``index`` stage built with ``index.device: cuda`` and, last, ``cpu`` (factory ``auto``): its seconds,
  and the recall@k (against exact search, measured the same way for both) of each built index;
- the bare GPU search: FAISS alone, the merged index copied to GPU 0 as memforge copies it (float16
  lookup tables), every query of both splits searched in blocks at nprobe 32 and k 1024 (+1 for a
  train query, which finds itself), then at k 2048; only the search calls are timed;
- the ``targets`` stage on the GPU at k 1024, twice: with ``targets.exact_distances: false`` (what the
  bare search does, plus memforge's distributions and stores) and with the default exact re-ranking
  (the stored keys gathered on the CPU), each as rows/s against the bare search;
- at k 2048 the train split asks for 2049 results: above the 2048 that FAISS's own GPU indexes select,
  so memforge searches it on the CPU copy; a cuVS build (16384) keeps it on the GPU, and only then is
  targets timed at k 2048.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from memforge.bench.measure import Note
from memforge.bench.workspace import with_sections
from memforge.pipelines import faiss_build, faiss_gpu, faiss_index
from memforge.pipelines.faiss_build import faiss
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.params import Params
from memforge.storage.paths import artifact_uri
from memforge.storage.stores import KeyStore

log = logging.getLogger("memforge")
INDEX = {"factory": "auto", "train_points_per_list": 39, "nprobe": 32}
KS = (1024, 2048)
SEARCH_BLOCK = 16384  # queries per bare search call
SPLITS = (("train", True), ("validation", False))  # (split, searched with itself in the datastore)

NOTES = {
    "faiss_gpu": Note("why the FAISS figures are missing: no GPU build of FAISS or no GPU it sees"),
    "faiss_build": Note("the FAISS distribution installed (faiss-gpu: CUDA 12; faiss-gpu-cuvs: CUDA 13 with cuVS)"),
    "faiss_gpu_max_k": Note("the most results per query this build's GPU indexes select"),
    "faiss_datastore_rows": Note("rows of the datastore indexed (train split)"),
    "faiss_query_rows": Note("queries searched by targets (both splits)"),
    "faiss_dim": Note("key dimension"),
    "index_factory": Note("the factory index.factory: auto resolved to"),
    **{f"index_build_{device}_seconds": Note(f"wall seconds of the index stage with index.device: {device}")
       for device in ("cpu", "cuda")},
    "index_build_gpu_vs_cpu": Note("index seconds on the CPU ÷ on the GPU", ("index_build_cpu_seconds",
                                                                            "index_build_cuda_seconds")),
    **{f"index_recall_{device}_built": Note(f"recall@k against exact search of the index built with index.device: "
                                            f"{device}") for device in ("cpu", "cuda")},
    "index_recall_gpu_minus_cpu": Note("the GPU-built index's recall@k minus the CPU-built one's (goal: within 0.01)"),
    **{f"bare_gpu_search_k{k}_rows_per_s": Note(f"queries/s of FAISS alone on GPU 0 at k {k}, nprobe 32, blocks of "
                                                f"{SEARCH_BLOCK}") for k in KS},
    "targets_gpu_k1024_search_only_rows_per_s": Note("queries/s of the targets stage on the GPU at k 1024 without "
                                                     "exact re-ranking"),
    "targets_gpu_vs_bare_search": Note(
        "targets (no re-ranking) ÷ the bare GPU search at k 1024 (goal ≥ 0.9)",
        ("targets_gpu_k1024_search_only_rows_per_s", "bare_gpu_search_k1024_rows_per_s")),
    "targets_gpu_k1024_rows_per_s": Note("queries/s of the targets stage on the GPU at k 1024 with exact re-ranking "
                                         "(the default)"),
    "targets_gpu_exact_vs_bare_search": Note("targets (exact re-ranking) ÷ the bare GPU search at k 1024",
                                             ("targets_gpu_k1024_rows_per_s", "bare_gpu_search_k1024_rows_per_s")),
    "targets_k2048_train_search": Note("where targets searches the train split at k 2048 (2049 results per query)"),
    "targets_gpu_k2048_rows_per_s": Note("queries/s of the targets stage at k 2048 (a cuVS build only)"),
}


def _timed_stage(name: str, params: Params) -> float:
    from memforge.flows.stages import run_stage

    started = time.perf_counter()
    run_stage(name, params, rebuild=True)
    return time.perf_counter() - started


def bare_gpu_search(params: Params, k: int) -> tuple[float, int]:
    """(queries/s, queries) of FAISS alone searching every query of both splits on GPU 0 (search calls timed)."""
    index = open_artifact(artifact_uri(params.artifacts_dir, "index"), "index")
    host = faiss_index.read_merged(index.uri, index.fingerprint)
    faiss_index.set_nprobe(host, params.index.nprobe)
    searcher = faiss_gpu.to_gpu(host, 0)
    seconds, rows = 0.0, 0
    for split, itself in SPLITS:
        keys = KeyStore.open(artifact_uri(params.artifacts_dir, f"keys/{split}"))
        n_rows = keys.rows.n_rows
        for start in range(0, n_rows, SEARCH_BLOCK):
            queries = np.ascontiguousarray(keys.keys(start, min(start + SEARCH_BLOCK, n_rows)), dtype=np.float32)
            started = time.perf_counter()
            searcher.search(queries, k + itself)
            seconds += time.perf_counter() - started
        rows += n_rows
    return rows / seconds, rows


def unavailable() -> str | None:
    """Why this machine cannot give the figures (no GPU build of FAISS, or no GPU it sees), or None."""
    if faiss_build.is_gpu_build(faiss) and faiss.get_num_gpus():
        return None
    problem = "sees no GPU" if faiss_build.is_gpu_build(faiss) else "is a CPU build"
    return f"not available: FAISS {faiss.__version__} {problem} ({faiss_build.CHOOSE})"


def _built(params: Params, device: str) -> dict:
    """The index stage with ``index.device: device``: its seconds and the built index's recall@k."""
    seconds = _timed_stage("index", with_sections(params, index={**INDEX, "device": device}))
    index = open_artifact(fs.join(params.artifacts_dir, "index"))
    return {f"index_build_{device}_seconds": round(seconds, 1),
            f"index_recall_{device}_built": index.manifest["stats"]["recall_at_k"],
            "index_factory": index.manifest["stats"]["factory"], "faiss_dim": index.manifest["stats"]["dim"],
            "faiss_datastore_rows": index.manifest["counts"]["rows"]}


def bench_faiss_gpu(params: Params) -> dict:
    """The module doc's figures on the datastore of ``params`` (keys encoded; index and targets rebuilt). The
    GPU-built index is searched first and the CPU build comes last; each group of figures is logged as it is
    measured, so a run stopped early still shows them."""
    max_k = faiss_build.max_gpu_k(faiss)
    figures = {"faiss_build": ", ".join(f"{name} {version}" for name, version in faiss_build.providers()),
               "faiss_gpu_max_k": max_k}

    def measured(found: dict) -> None:
        figures.update(found)
        log.info("bench gpu_faiss: %s", json.dumps(found))

    measured(_built(params, "cuda"))
    on_gpu = with_sections(params, index={**INDEX, "device": "cuda"})
    for k in KS:
        per_second, rows = bare_gpu_search(on_gpu, k)
        measured({f"bare_gpu_search_k{k}_rows_per_s": round(per_second), "faiss_query_rows": rows})
    bare = figures["bare_gpu_search_k1024_rows_per_s"]
    for name, exact in (("targets_gpu_k1024_search_only_rows_per_s", False), ("targets_gpu_k1024_rows_per_s", True)):
        measured({name: round(rows / _timed_stage("targets", with_sections(on_gpu, targets={
            "k": 1024, "exact_distances": exact})))})
    figures["targets_gpu_vs_bare_search"] = round(figures["targets_gpu_k1024_search_only_rows_per_s"] / bare, 3)
    figures["targets_gpu_exact_vs_bare_search"] = round(figures["targets_gpu_k1024_rows_per_s"] / bare, 3)
    on_host = 2048 + 1 > max_k
    figures["targets_k2048_train_search"] = (f"cpu: 2049 results > the {max_k} GPU FAISS selects" if on_host
                                             else f"gpu: 2049 results ≤ the {max_k} this cuVS build selects")
    if not on_host:
        measured({"targets_gpu_k2048_rows_per_s": round(rows / _timed_stage("targets", with_sections(on_gpu, targets={
            "k": 2048, "exact_distances": False})))})
    measured(_built(params, "cpu"))
    figures.update(index_build_gpu_vs_cpu=round(figures["index_build_cpu_seconds"]
                                                / figures["index_build_cuda_seconds"], 3),
                   index_recall_gpu_minus_cpu=round(figures["index_recall_cuda_built"]
                                                    - figures["index_recall_cpu_built"], 4))
    return figures
