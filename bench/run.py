"""``memforge bench``: speed and memory of the stages against bare library baselines.

Every ratio is measured in one run on this machine: the stage as users run it (Beam, stores,
markers, checksums) against the bare library loop over the same data with the same thread count.
Parts: ``encode`` (encode_vs_bare for a tiny and a small GPT-2), ``encode_rss`` (peak RSS of
``memforge encode`` at 1x and 4x the corpus), ``storage`` (bytes per token on disk), ``faiss``
(index_vs_bare, targets_vs_bare, bytes per row of the target stores), ``memory`` (evaluate's tokens/s),
``dask`` (encode and targets on a local Dask cluster ÷ the default runner); only when asked for,
``scale`` (``--only scale``: growth with N, ``flows.bench_scale``) and, on a machine with CUDA,
``gpu`` (``--only gpu``: ``flows.bench_gpu``).
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params, load_params, parse_params

MODELS = {"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "small": {"n_layer": 4, "n_embd": 128, "n_head": 4}}
SHAPES = {**MODELS, "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12}}  # the GPU bench's encoder
CORPUS_BYTES = 1_000_000  # 1x; the 4x run reads four times as much of the standard library
# encode_vs_bare corpus per model: large enough that Beam's fixed cost (~8-10 s to start two worker
# processes that import torch and transformers, and to shut them down) is amortised.
RATIO_SCALES = {"tiny": 24, "small": 12}
BLOCK, STRIDE, VOCAB = 256, 128, 2048


class Workspace:
    """Models, corpora and params for one bench run, built on first use under a temp directory."""

    def __init__(self, root: Path, out_dir: str = "bench-out"):
        self.root, self.out_dir = root, out_dir
        self._models: dict[str, Path] = {}
        self._prepared: dict[int, Params] = {}

    def model(self, name: str) -> Path:
        if name not in self._models:
            import torch
            from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

            from memforge.pipelines.corpus import read_documents, source_files
            from memforge.pipelines.tokenizer import train_tokenizer

            path = self.root / f"model-{name}"
            corpus = parse_params({"corpus": self.corpus(1)}).corpus
            texts = (t for f in source_files(corpus) for _, t in read_documents(f, corpus) if t)
            train_tokenizer(texts, VOCAB, str(path))
            tokenizer = AutoTokenizer.from_pretrained(path)
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=BLOCK, **SHAPES[name],
                                       bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
            self._models[name] = path
        return self._models[name]

    @staticmethod
    def corpus(scale: int) -> dict:
        return {"train": ["{stdlib}/**/*.py"], "max_bytes": CORPUS_BYTES * scale, "validation_fraction": 0.05,
                "on_decode_error": "skip"}

    def params(self, scale: int, model: str) -> Params:
        """Params for an encode of the ``scale``x corpus with ``model`` (prepared once per scale)."""
        params = parse_params({
            "artifacts_dir": str(self.root / f"art-{scale}x"), "corpus": self.corpus(scale),
            "encode": {"model": str(self.model("tiny")), "block_size": BLOCK, "stride": STRIDE, "batch_size": 8},
            "runtime": {"num_workers": 2, "threads_per_worker": 1},
        })
        if scale not in self._prepared:
            from memforge.flows.stages import run_stage

            run_stage("prepare", params)
            self._prepared[scale] = params
        encode = {**params.section("encode"), "model": str(self.model(model))}
        return params.model_copy(update={"encode": params.encode.model_copy(update=encode)})


def _bare_encode_rows_per_second(params: Params, hooked: bool = False) -> tuple[float, int]:
    """Datastore rows/s of a bare forward loop over the same windows, batch size and thread count.

    ``hooked``: with the stage's own representation capture (which stops the forward pass once
    the key is captured), isolating the pipeline's overhead from that saving.
    """
    import numpy as np
    import torch

    from memforge.pipelines.encoder import RepresentationCapture, load_encoder
    from memforge.pipelines.windows import windows_for_rows
    from memforge.storage.paths import SPLITS, artifact_uri
    from memforge.storage.stores import PartOffsets, TokenStore

    tokens = open_artifact(artifact_uri(params.artifacts_dir, "tokens"), "tokens")
    model = load_encoder(params.encode.model)
    torch.set_num_threads(params.runtime.num_workers * params.runtime.threads_per_worker)
    batches, rows = [], 0
    for split in SPLITS:
        offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"][split]["parts"])
        stream = TokenStore.open(tokens.uri, split).read_rows(offsets, 0, offsets.total_rows).astype(np.int64)
        windows = windows_for_rows(0, offsets.total_rows - 1, offsets.total_rows, BLOCK, STRIDE)
        rows += offsets.total_rows - 1
        by_length: dict[int, list] = {}
        for w in windows:
            by_length.setdefault(w.end - w.begin, []).append(torch.from_numpy(stream[w.begin:w.end]))
        for group in by_length.values():
            batches += [torch.stack(group[i:i + params.encode.batch_size])
                        for i in range(0, len(group), params.encode.batch_size)]
    capture = RepresentationCapture(model, params.encode.representation, params.encode.layer) if hooked else None
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            if capture is None:
                model.base_model(input_ids=batch, use_cache=False)
            else:
                capture(model, batch)
    return rows / (time.perf_counter() - started), rows


def bench_encode(ws: Workspace) -> dict:
    """encode_vs_bare: stage rows/s (wall time of the whole stage) / bare forward-loop rows/s;
    encode_vs_bare_hooked: the same against a bare loop that also stops at the captured layer."""
    from memforge.flows.stages import run_stage

    figures = {}
    for name in MODELS:
        params = ws.params(RATIO_SCALES[name], name)
        started = time.perf_counter()
        run_stage("encode", params, rebuild=True)
        seconds = time.perf_counter() - started
        rows = sum(open_artifact(fs.join(params.artifacts_dir, "keys", s)).manifest["counts"]["rows"]
                   for s in ("train", "validation"))
        bare, bare_rows = _bare_encode_rows_per_second(params)
        hooked, _ = _bare_encode_rows_per_second(params, hooked=True)
        assert bare_rows == rows
        figures[f"encode_{name}_rows"] = rows
        figures[f"encode_{name}_stage_rows_per_s"] = round(rows / seconds, 1)
        figures[f"encode_{name}_bare_rows_per_s"] = round(bare, 1)
        figures[f"encode_{name}_bare_hooked_rows_per_s"] = round(hooked, 1)
        figures[f"encode_vs_bare_{name}"] = round(rows / seconds / bare, 3)
        figures[f"encode_vs_bare_hooked_{name}"] = round(rows / seconds / hooked, 3)
    return figures


class PeakMemory(NamedTuple):
    """Peaks of a command's process tree, summed over its processes (bytes), and its wall time."""
    rss: int  # resident set: private memory plus the file pages mapped in (memory-mapped stores, indexes)
    private: int  # resident minus shared (file-backed and shared-memory) pages: what the tree itself holds
    pss: int  # proportional set: each shared page split among the processes mapping it (counted once in all)
    seconds: float


PSS_EVERY = 4  # of the 50 ms memory samples


def _peak_tree_memory(command: list[str]) -> PeakMemory:
    """Run ``command``; return the peak summed RSS, private memory and PSS of it and its children, and its wall
    time. PSS (which reads each process's page map, ~1 ms per GB resident) is sampled every
    ``PSS_EVERY``-th time."""
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, private, pss, done = 0, 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, private, pss
        for tick in itertools.count():
            if done.is_set():
                return
            try:
                tree = [p for p in (process, *process.children(recursive=True)) if p.is_running()]
                infos = [p.memory_info() for p in tree]
                peak = max(peak, sum(i.rss for i in infos))
                private = max(private, sum(i.rss - i.shared for i in infos))
                if tick % PSS_EVERY == 0:
                    pss = max(pss, sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}")
    return PeakMemory(peak, private, pss, time.perf_counter() - started)


def bench_encode_rss(ws: Workspace) -> dict:
    """Peak RSS (driver + Beam workers) of `memforge encode` at 1x and 4x the corpus, tiny model."""
    figures = {}
    for scale in (1, 4):
        params = ws.params(scale, "tiny")
        config = ws.root / f"params-{scale}x.json"
        config.write_text(json.dumps(params.model_dump(mode="json")))
        command = [str(Path(sys.executable).parent / "memforge"), "encode", "--params", str(config), "--rebuild"]
        peak = _peak_tree_memory(command).rss
        figures[f"encode_peak_rss_mb_{scale}x"] = round(peak / 2**20, 1)
    figures["encode_rss_4x_vs_1x"] = round(figures["encode_peak_rss_mb_4x"] / figures["encode_peak_rss_mb_1x"], 3)
    return figures


def _bytes(uri: str, suffixes: tuple[str, ...]) -> int:
    filesystem, path = fs.filesystem(uri)
    return sum(filesystem.size(fs.join(path, rel)) for rel in fs.list_files(uri) if rel.endswith(suffixes)
               or "/c/" in rel)


def bench_storage(ws: Workspace) -> dict:
    """Bytes per token on disk: token store (Parquet) and key store (Zarr keys + values)."""
    params = ws.params(4, "tiny")
    tokens = open_artifact(fs.join(params.artifacts_dir, "tokens"))
    n_tokens = tokens.manifest["counts"]["train_tokens"] + tokens.manifest["counts"]["validation_tokens"]
    keys = fs.join(params.artifacts_dir, "keys", "train")
    if not fs.exists(fs.join(keys, "_manifest.json")):
        from memforge.flows.stages import run_stage

        run_stage("encode", params)
    manifest = open_artifact(keys).manifest
    rows, dim = manifest["counts"]["rows"], manifest["stats"]["hidden_size"]
    return {
        "tokens_bytes_per_token": round(_bytes(tokens.uri, (".parquet",)) / n_tokens, 3),
        "keys_bytes_per_token": round(_bytes(keys, ()) / rows, 2),
        "keys_raw_bytes_per_token": 2 * dim + 4,
    }


# A query scans nprobe/nlist of the datastore: at nprobe 128 of 1024 lists about 35k PQ codes, as
# real kNN-LM datastores do at their usual nprobe (e.g. 100M keys, IVF4096, nprobe 32: 800k codes).
# targets_vs_bare is also measured at the default nprobe 32, where a query here scans only ~9k codes.
FAISS_PARAMS = {"factory": "IVF1024,PQ16", "train_points_per_list": 39, "nprobe": 128}
LIGHT_NPROBE = 32
# 4096-row work shards (70 Beam elements). The local FnApiRunner deals a stage's elements to its workers up
# front (round robin), so one worker can still be busy with a whole element after the other ran dry: with
# 8192-row elements that tail cost 3-5 % of the stage; it is ~1-2 % with 4096 (same speed per query).
TARGET_SHARD_CHUNKS = 1
# targets_vs_bare and its bytes per row are at k 64, T 16 (the settings since the bench began); the paper's
# k 1024 is measured by _paper_settings
BENCH_TARGETS = {"k": 64, "temperature": 16.0, "keep_neighbours": True, "shard_chunks": TARGET_SHARD_CHUNKS}


def _faiss_params(ws: Workspace) -> Params:
    """The 1x tiny-model datastore (encoded once) with the bench's index and target configuration."""
    from memforge.flows.stages import run_stage

    params = ws.params(1, "tiny")
    if not fs.exists(fs.join(params.artifacts_dir, "keys", "train", "_manifest.json")):
        run_stage("encode", params)
    return params.model_copy(update={
        "index": params.index.model_copy(update=FAISS_PARAMS),
        "targets": params.targets.model_copy(update=BENCH_TARGETS),
    })


def _bare_index_seconds(params: Params) -> float:
    """Seconds to train + add the whole key store into one index in one process (same factory, sample,
    threads)."""
    import faiss
    import numpy as np

    from memforge.pipelines import faiss_index
    from memforge.storage.stores import KeyStore

    keys = KeyStore.open(fs.join(params.artifacts_dir, "keys", "train"))
    vectors = np.ascontiguousarray(keys.keys(), dtype=np.float32)
    faiss.omp_set_num_threads(params.runtime.num_workers * params.runtime.threads_per_worker)
    started = time.perf_counter()
    index = faiss_index.build_empty(params.index.factory, keys.dim)
    nlist = faiss_index.ivf_of(index).nlist
    sample = min(len(vectors), nlist * params.index.train_points_per_list)
    rows = np.sort(np.random.default_rng(params.index.seed).choice(len(vectors), sample, replace=False))
    index.train(vectors[rows])
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return time.perf_counter() - started


def round_orders(variants: int, repeats: int) -> list[list[int]]:
    """The order of ``variants`` in each of ``repeats`` rounds: rotated by one per round, so that with
    ``repeats`` a multiple of ``variants`` each takes every position equally often, and the last round
    ends with the last variant."""
    return [[(position + round_ + 1 - repeats) % variants for position in range(variants)]
            for round_ in range(repeats)]


def _targets_vs_bare(variants: list[Params], bare_index, nprobe: int,
                     repeats: int = 1) -> list[tuple[float, float, float, list[float]]]:
    """(stage rows/s, bare search rows/s, ratio, every round's ratio) of the targets stage at ``nprobe`` over
    both splits, for each of ``variants`` (params that share k). The bare search runs before the first stage
    and after every one:
    each stage is compared with the mean of the two bare runs around it, as this VM's speed drifts by
    several per cent over a minute and one bare run beside one stage run would carry all of that drift.
    With ``repeats`` > 1 the variants run that many rounds, each round in a rotated order (every variant
    takes every position once when ``repeats`` is a multiple of their number, and the last round ends with
    the last variant, whose stores stay); each variant's figures are the round whose ratio is the median."""
    import faiss
    import numpy as np

    from memforge.flows.stages import run_stage
    from memforge.pipelines import faiss_index
    from memforge.storage.stores import KeyStore

    first = variants[0]
    splits = [(np.ascontiguousarray(KeyStore.open(fs.join(first.artifacts_dir, "keys", split)).keys(),
                                    dtype=np.float32), extra) for split, extra in (("train", 1), ("validation", 0))]
    rows = sum(len(queries) for queries, _ in splits)

    def bare_seconds() -> float:
        faiss_index.set_nprobe(bare_index, nprobe)
        faiss.omp_set_num_threads(first.runtime.num_workers * first.runtime.threads_per_worker)
        started = time.perf_counter()
        for queries, extra in splits:
            bare_index.search(queries, first.targets.k + extra)
        return time.perf_counter() - started

    rounds: list[list[tuple[float, float, float]]] = [[] for _ in variants]
    before = bare_seconds()
    for order in round_orders(len(variants), repeats):
        for which in order:
            params = variants[which]
            params = params.model_copy(update={"targets": params.targets.model_copy(update={"nprobe": nprobe})})
            started = time.perf_counter()
            run_stage("targets", params, rebuild=True)
            stage = rows / (time.perf_counter() - started)
            after = bare_seconds()
            bare = rows / ((before + after) / 2)
            rounds[which].append((round(stage, 1), round(bare, 1), round(stage / bare, 3)))
            before = after
    medians = [sorted(runs, key=lambda run: run[2])[len(runs) // 2] for runs in rounds]
    return [(*median, [run[2] for run in runs]) for median, runs in zip(medians, rounds)]


def bench_faiss(ws: Workspace) -> dict:
    """index_vs_bare: bare train+add time / index stage time; targets_vs_bare: targets stage rows/s /
    bare index.search rows/s (same index, k and nprobe); bytes per row of the target stores."""
    from memforge.flows.stages import run_stage
    from memforge.pipelines import faiss_index

    params = _faiss_params(ws)
    bare_before = _bare_index_seconds(params)  # before and after the stage, averaged (see _targets_vs_bare)
    started = time.perf_counter()
    run_stage("index", params, rebuild=True)
    index_seconds = time.perf_counter() - started
    bare_after = _bare_index_seconds(params)
    bare_seconds = (bare_before + bare_after) / 2
    # The bare search runs on the very index the stage searches: the artifact's merged on-disk index.
    searched = faiss_index.read_merged(fs.join(params.artifacts_dir, "index"))
    light, = _targets_vs_bare([params], searched, LIGHT_NPROBE)
    (stage, bare, ratio, _), = _targets_vs_bare([params], searched, params.index.nprobe)
    train = fs.join(params.artifacts_dir, "targets", "train")
    train_rows = open_artifact(train).manifest["counts"]["rows"]
    index_stats = open_artifact(fs.join(params.artifacts_dir, "index")).manifest["stats"]
    figures = {
        "faiss_factory": params.index.factory, "faiss_rows": train_rows, "faiss_nprobe": params.index.nprobe,
        "index_stage_s": round(index_seconds, 2), "index_bare_s": round(bare_seconds, 2),
        "index_vs_bare": round(bare_seconds / index_seconds, 3),
        "targets_stage_rows_per_s": stage, "targets_bare_rows_per_s": bare, "targets_vs_bare": ratio,
        f"targets_vs_bare_nprobe{LIGHT_NPROBE}": light[2],
        "recall_at_k": index_stats.get("recall_at_k"),
        "neighbours_bytes_per_row": round(_bytes(fs.join(train, "neighbours.zarr"), ()) / train_rows, 2),
        "distributions_bytes_per_row": round(_bytes(fs.join(train, "distributions.zarr"), ()) / train_rows, 2),
    }
    return {**figures, **_paper_settings(ws, params, searched)}


# The paper's targets: k 1024 neighbours at nprobe 32 (the stage's other params at their defaults).
PAPER_K, PAPER_NPROBE = 1024, 32
PAPER_REPEATS = 3  # rounds of the three k 1024 variants, in rotated orders; each figure is its median round


def _paper_settings(ws: Workspace, params: Params, searched) -> dict:
    """At k 1024, nprobe 32, the targets' other params at their defaults: targets_vs_bare with PQ distances,
    with exact re-ranking, and with exact re-ranking keeping the neighbours (what writing them costs); the
    peak RSS of `memforge targets` (process tree) with the default shard size and with it doubled; bytes per
    row of each store."""
    targets = {"k": PAPER_K, "nprobe": PAPER_NPROBE}
    defaults = Params().targets.model_copy(update={**targets, "shard_chunks": TARGET_SHARD_CHUNKS})
    variants = {"pq": {"exact_distances": False}, "exact": {"exact_distances": True},
                "exact_neighbours": {"exact_distances": True, "keep_neighbours": True}}  # the last one's stores stay
    paper = [params.model_copy(update={"targets": defaults.model_copy(update=update)}) for update in variants.values()]
    figures = {}
    measured = _targets_vs_bare(paper, searched, PAPER_NPROBE, repeats=PAPER_REPEATS)
    for label, (stage, bare, ratio, ratios) in zip(variants, measured):
        figures.update({f"targets_vs_bare_k{PAPER_K}_{label}": ratio,  # and its two sides: drift shows in bare
                        f"targets_rows_per_s_k{PAPER_K}_{label}": stage, f"bare_rows_per_s_k{PAPER_K}_{label}": bare,
                        f"targets_vs_bare_k{PAPER_K}_{label}_rounds": ratios})
    train = fs.join(params.artifacts_dir, "targets", "train")
    rows = open_artifact(train).manifest["counts"]["rows"]
    for store in ("neighbours", "distributions"):
        figures[f"{store}_bytes_per_row_k{PAPER_K}"] = round(_bytes(fs.join(train, f"{store}.zarr"), ()) / rows, 1)
    shard_chunks = Params().targets.shard_chunks
    for label, chunks in (("", shard_chunks), ("_2x_shards", 2 * shard_chunks)):
        config = ws.root / "params-paper-targets.json"
        defaults = {**params.model_dump(mode="json"), "targets": {**Params().section("targets"), **targets,
                                                                  "shard_chunks": chunks}}
        config.write_text(json.dumps(defaults))
        peak = _peak_tree_memory([str(Path(sys.executable).parent / "memforge"), "targets", "--params", str(config),
                                  "--rebuild"]).rss
        figures[f"targets_peak_rss_mb_k{PAPER_K}{label}"] = round(peak / 2**20, 1)
    figures[f"targets_rss_2x_shards_vs_1x_k{PAPER_K}"] = round(
        figures[f"targets_peak_rss_mb_k{PAPER_K}_2x_shards"] / figures[f"targets_peak_rss_mb_k{PAPER_K}"], 3)
    return figures


# The artifacts evaluate reads: the demo's, linked into the bench workspace so its eval is the bench's own.
EVALUATE_INPUTS = ("tokens", "decoder", "keys", "index", "memory")
MEMORY_RUNS = 5  # tokens/s per model: the median over this many evaluate runs


def demo_artifacts(params: Params) -> str:
    """The demo's artifacts directory (``params.artifacts_dir``); refuses, naming what is missing, unless
    ``memforge run`` has built every artifact the memory part reads."""
    demo = fs.normalize(params.artifacts_dir)
    missing = [name for name in ("tokens", "decoder", "keys/validation", "index", "memory")
               if not fs.exists(fs.join(demo, name, "_manifest.json"))]
    if missing:
        raise MemforgeError(f"bench memory: {demo} lacks the demo's {', '.join(missing)}: run `memforge run` first")
    return demo


def bench_memory(ws: Workspace) -> dict:
    """memory_vs_decoder, memory_vs_knnlm: tokens/s of decoder + memory ÷ decoder alone and ÷ kNN-LM over
    the same validation tokens in one process, each the median of ``MEMORY_RUNS`` ``evaluate`` runs over
    the demo's artifacts (``artifacts_dir`` of ./params.yaml, built by ``memforge run``)."""
    from memforge.flows.stages import run_stage

    params = load_params()
    demo = demo_artifacts(params)
    linked = ws.root / "demo-artifacts"
    linked.mkdir()
    for name in EVALUATE_INPUTS:
        (linked / name).symlink_to(fs.join(demo, name), target_is_directory=True)
    runs = []
    for _ in range(MEMORY_RUNS):  # one evaluate pass over the demo's validation split is only ~0.5-4 s
        evaluated = run_stage("evaluate", params.model_copy(update={"artifacts_dir": str(linked)}), rebuild=True)
        runs.append(fs.read_json(fs.join(evaluated, "metrics.json")))
    metrics = runs[0]
    speed = {name: statistics.median(run["tokens_per_second"][name] for run in runs)
             for name in ("decoder", "knnlm", "memory")}
    perplexity = metrics["perplexity"]
    return {
        "memory_bench_tokens": metrics["rows"], "memory_bench_knn_k": metrics["k"], "memory_bench_runs": MEMORY_RUNS,
        **{f"{name}_tokens_per_s": speed[name] for name in ("decoder", "knnlm", "memory")},
        **{f"{name}_perplexity": perplexity[name] for name in ("decoder", "knnlm", "memory")},
        "memory_vs_decoder": round(speed["memory"] / speed["decoder"], 3),
        "memory_vs_knnlm": round(speed["memory"] / speed["knnlm"], 3),
        # the bound on memory_vs_knnlm: what it would be if the memory cost nothing on top of the decoder
        "decoder_vs_knnlm": round(speed["decoder"] / speed["knnlm"], 3),
    }


def bench_dask(ws: Workspace) -> dict:
    """encode_dask_vs_local, targets_dask_vs_local: the stage's rows/s on a Dask cluster of separate processes
    on 127.0.0.1 (``runtime.num_workers`` workers of ``runtime.threads_per_worker`` threads) ÷ on the default
    local runner with the same workers and threads, same data and params (the 1x datastore, the faiss part's
    index); each the wall time of the whole stage, local first."""
    from memforge.flows.dask_cluster import local_dask_cluster
    from memforge.flows.stages import run_stage

    params = _faiss_params(ws)
    if not fs.exists(fs.join(params.artifacts_dir, "index", "_manifest.json")):
        run_stage("index", params)
    figures: dict = {"dask_workers": params.runtime.num_workers,
                     "dask_threads_per_worker": params.runtime.threads_per_worker}
    workers, threads = params.runtime.num_workers, params.runtime.threads_per_worker
    with local_dask_cluster(workers, threads, ws.root / "dask") as address:
        on_dask = ("--runner=dask", f"--dask_client_address={address}")
        for name, output in (("encode", "keys"), ("targets", "targets")):
            seconds = {}
            for runner, beam_args in (("local", ()), ("dask", on_dask)):
                started = time.perf_counter()
                run_stage(name, params, rebuild=True, beam_args=beam_args)
                seconds[runner] = time.perf_counter() - started
            rows = sum(open_artifact(fs.join(params.artifacts_dir, output, s)).manifest["counts"]["rows"]
                       for s in ("train", "validation"))
            figures.update({f"{name}_rows": rows, f"{name}_local_s": round(seconds["local"], 2),
                            f"{name}_dask_s": round(seconds["dask"], 2),
                            f"{name}_dask_vs_local": round(seconds["local"] / seconds["dask"], 3)})
    return figures


def bench_scale(ws: Workspace) -> dict:
    """How time, memory and disk grow with N, and kNN-LM against the memory up to 33 M keys
    (``flows.bench_scale``); only when asked for (``--only scale``: ~40 minutes)."""
    from memforge.bench import scale

    return scale.bench_scale(ws, ws.out_dir)


def bench_gpu(ws: Workspace) -> dict:
    """The torch stages and FAISS on a CUDA GPU (``flows.bench_gpu``); only when asked for (``--only gpu``)."""
    from memforge.bench import gpu as on_gpu

    return on_gpu.bench_gpu(ws)


PARTS = {"encode": bench_encode, "encode_rss": bench_encode_rss, "storage": bench_storage, "faiss": bench_faiss,
         "memory": bench_memory, "dask": bench_dask, "scale": bench_scale, "gpu": bench_gpu}
# gpu needs a GPU (--only gpu); scale takes ~40 minutes (--only scale)
DEFAULT_PARTS = ("encode", "encode_rss", "storage", "faiss", "memory", "dask")


def run(only: list[str] | None = None, workdir: str | None = None, out_dir: str = "bench-out") -> dict:
    """Run the selected parts (all but scale and gpu by default) and return one flat dict of figures;
    parts that write files (scale) write them into ``out_dir``. The scratch space is a temporary directory
    inside ``workdir`` (made if missing), removed at the end."""
    parts = only or DEFAULT_PARTS
    if "memory" in parts:
        # before any part runs, so a long run does not fail at its end with nothing printed
        demo_artifacts(load_params())
    figures: dict = {}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        ws = Workspace(Path(scratch), out_dir)
        for name in parts:
            done = PARTS[name](ws)
            # each part's figures reach stderr as it ends, so a later part's failure does not lose them
            print(f"memforge bench: {name}: {json.dumps(done)}", file=sys.stderr, flush=True)
            figures.update(done)
    return figures


def table(figures: dict) -> str:
    width = max(len(k) for k in figures)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in figures.items())
