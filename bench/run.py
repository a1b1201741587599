"""``memforge bench``: speed and memory of the stages against bare library baselines.

Every ratio is measured in one run on this machine: the stage as users run it (Beam, stores,
markers, checksums) against the bare library loop over the same data with the same thread count.
Parts: ``encode`` (encode_vs_bare for a tiny and a small GPT-2), ``encode_rss`` (peak RSS of
``memforge encode`` at 1x and 4x the corpus), ``storage`` (bytes per token on disk), ``faiss``
(index_vs_bare, targets_vs_bare, bytes per row of the target stores), ``memory`` (evaluate's tokens/s),
``dask`` (encode and targets on a local Dask cluster ÷ the default runner); only when asked for,
``shape`` (``--only shape``: the targets' keep rules, each through targets, train-memory and evaluate on the
demo, ``memforge.bench.shape``),
``scale`` (``--only scale``: growth with N, ``memforge.bench.scale``), ``prepare`` (``--only prepare``: one
200 MB text file with every worker and in one process, ``memforge.bench.prepare``), ``train`` (``--only train``:
train-memory on 1 and 2 torch.distributed ranks, ``memforge.bench.train``), ``generate`` (``--only generate``:
generate()'s tokens/s of the decoder, decoder + memory and kNN-LM over 4 M keys, ``memforge.bench.generate``) and,
on a machine with CUDA, ``gpu`` (``--only gpu``: ``memforge.bench.gpu``) and its FAISS figures alone,
``gpu_faiss`` (``--only gpu_faiss``: ``memforge.bench.faiss_gpu``). Each part's module holds its ``NOTES``:
what each of its figures measures.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from memforge.bench import (
    dask_runner,
    encode,
    faiss_gpu,
    faiss_search,
    generate,
    gpu,
    memory,
    prepare,
    scale,
    shape,
    storage,
    train,
)
from memforge.bench.measure import PartRun
from memforge.bench.workspace import Workspace
from memforge.storage.params import load_params

PARTS = {"encode": encode.bench_encode, "encode_rss": encode.bench_encode_rss, "storage": storage.bench_storage,
         "faiss": faiss_search.bench_faiss, "memory": memory.bench_memory, "dask": dask_runner.bench_dask,
         "scale": scale.bench_scale, "gpu": gpu.bench_gpu, "gpu_faiss": gpu.bench_gpu_faiss, "shape": shape.bench_shape,
         "prepare": prepare.bench_prepare, "train": train.bench_train, "generate": generate.bench_generate}
NOTES = {"encode": encode.NOTES, "encode_rss": encode.RSS_NOTES, "storage": storage.NOTES,
         "faiss": faiss_search.NOTES, "memory": memory.NOTES, "dask": dask_runner.NOTES, "scale": scale.NOTES,
         "gpu": gpu.NOTES, "gpu_faiss": faiss_gpu.NOTES, "shape": shape.NOTES, "prepare": prepare.NOTES,
         "train": train.NOTES, "generate": generate.NOTES}
# gpu and gpu_faiss need a GPU (--only gpu, --only gpu_faiss); scale takes ~40 minutes (--only scale); shape
# trains the demo's memory three times (--only shape); prepare reads a 200 MB file twice (--only prepare); train
# trains a memory twice (--only train); generate builds a 4 M-key datastore (--only generate)
DEFAULT_PARTS = ("encode", "encode_rss", "storage", "faiss", "memory", "dask")


def run(only: list[str] | None = None, workdir: str | None = None,
        out_dir: str = "bench-out") -> dict[str, PartRun]:
    """Run the selected parts (all but scale and gpu by default); return each part's figures and wall seconds.
    Parts that write files (scale) write them into ``out_dir``. The scratch space is a temporary directory
    inside ``workdir`` (made if missing), removed at the end."""
    parts = only or DEFAULT_PARTS
    if "memory" in parts:
        # before any part runs, so a long run does not fail at its end with nothing printed
        memory.demo_artifacts(load_params())
    runs: dict[str, PartRun] = {}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        ws = Workspace(Path(scratch), out_dir)
        for name in parts:
            started = time.perf_counter()
            done = PARTS[name](ws)
            runs[name] = PartRun(done, time.perf_counter() - started)
            # each part's figures reach stderr as it ends, so a later part's failure does not lose them
            print(f"memforge bench: {name}: {json.dumps(done)}", file=sys.stderr, flush=True)
    return runs


def flat(runs: dict[str, PartRun]) -> dict:
    """All parts' figures in one dict."""
    return {figure: value for ran in runs.values() for figure, value in ran.figures.items()}


def table(figures: dict) -> str:
    """The figures as aligned ``name  value`` lines."""
    width = max(len(k) for k in figures)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in figures.items())
