"""``memforge bench --only gpu``: the torch stages and FAISS on a CUDA GPU, against bare loops and the CPU.

On a GPT-2-small-shaped encoder (12 layers, d 768; random weights, built here) and the standard
library as corpus, it measures:

- ``encode_gpu_vs_bare``: rows/s of ``memforge encode`` on the GPU (whole stage: Beam, stores,
  markers, checksums) ÷ a bare HF forward loop on the same GPU over the same windows and batch size
  (fp16 keys copied to the host, as the reference kNN-LM saves them);
- ``keys_gpu_vs_cpu_max_row_ulps``: the largest difference between stored GPU keys and keys computed
  on the CPU, in ULPs of the stored dtype at the key's scale (≤ 1: the rounding of the stored format);
- the memory trained a few hundred steps on the GPU; a run killed on the GPU and resumed on the CPU
  (and the reverse), with its final loss against the uninterrupted GPU run's;
- ``evaluate`` on the GPU;
- FAISS on the GPU on the encoded datastore (``memforge.bench.faiss_gpu``), when a GPU build of FAISS is
  installed (else it says so).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np

from memforge.bench import faiss_gpu
from memforge.bench.measure import Note
from memforge.bench.memory import IN_METRICS
from memforge.bench.workspace import SHAPES, with_sections
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params

ENCODER = "gpt2-small"
log = logging.getLogger("memforge")

DEVICE = "cuda"
ENCODE_SCALE = 16  # corpus megabytes for encode_gpu_vs_bare: Beam's fixed start-up cost must be amortised
FAISS_SCALE = 4  # corpus megabytes of the FAISS figures' datastore (about a million rows at d 768)
CHECK_ROWS = 4096  # train rows whose GPU keys are compared with CPU keys
# Four worker processes share the GPU: while one writes its shard (compression, checksums), the others compute.
ENCODE = {"device": DEVICE, "batch_size": 32}
RUNTIME = {"num_workers": 4, "threads_per_worker": 4}
INDEX = {"factory": "IVF1024,PQ64", "train_points_per_list": 39, "nprobe": 32}
MEMORY = {"depth": 2, "batch_size": 256, "max_steps": 300, "checkpoint_every": 100, "warmup_steps": 20}
KILL_AT = 200  # the interrupted runs are killed once this step's checkpoint is written
RESUMES = ((DEVICE, "cpu"), ("cpu", DEVICE))  # (killed on, resumed on)
EVALUATED = ("decoder", "knnlm", "memory")

NOTES = {
    "gpu_name": Note("the CUDA device the part ran on (device 0)"),
    "torch_version": Note("torch's version"),
    "encoder_shape": Note(f"the encoder's shape ({ENCODER}, random weights)"),
    "encode_gpu_rows": Note(f"datastore rows (both splits) of {ENCODE_SCALE} MB of text"),
    "encode_gpu_devices": Note("the devices the encode workers used (from the key store's manifest)"),
    "encode_gpu_rows_per_s": Note(f"rows/s of the whole encode stage on the GPU, {RUNTIME['num_workers']} workers"),
    "encode_bare_gpu_rows_per_s": Note("rows/s of a bare HF forward loop on the GPU, same windows and batch size, "
                                       "fp16 keys copied to the host"),
    "encode_gpu_vs_bare": Note("stage rows/s ÷ bare GPU loop rows/s", ("encode_gpu_rows_per_s",
                                                                      "encode_bare_gpu_rows_per_s")),
    "encode_gpu_first_shard_s": Note("seconds from the stage's start to its first finished shard (start-up)"),
    "encode_gpu_steady_rows_per_s": Note("rows/s once every worker has finished its first shard"),
    "encode_gpu_steady_vs_bare": Note("steady rows/s ÷ bare GPU loop rows/s", ("encode_gpu_steady_rows_per_s",
                                                                              "encode_bare_gpu_rows_per_s")),
    "keys_checked_rows": Note("train rows whose stored GPU keys are compared with keys computed on the CPU"),
    "keys_stored_dtype": Note("the key store's dtype"),
    "keys_gpu_vs_cpu_max_abs": Note("largest absolute difference between stored GPU keys and CPU keys"),
    "keys_gpu_vs_cpu_max_row_ulps": Note("that difference in ULPs of the stored dtype at each row's scale (≤ 1: "
                                         "the stored format's rounding)"),
    "keys_gpu_vs_cpu_within_rounding": Note("whether every checked key is within one such ULP"),
    "keys_fp32_gpu_vs_cpu_max_rel": Note("largest float32 GPU-vs-CPU difference before rounding ÷ the row's scale"),
    "memory_gpu_steps": Note("memory training steps on the GPU"),
    "memory_gpu_rows_per_s": Note("memory training rows/s on the GPU (from the memory's manifest)"),
    "memory_gpu_seconds": Note("wall seconds of `train-memory` on the GPU"),
    "memory_gpu_final_loss": Note("final loss of the uninterrupted GPU run"),
    **{figure: note for first, second in RESUMES for figure, note in {
        f"memory_{first}_checkpoint_resumes_on_{second}": Note(f"a run killed on {first} after step {KILL_AT}'s "
                                                               f"checkpoint resumed from that step on {second}"),
        f"memory_{first}_to_{second}_final_loss": Note("that resumed run's final loss (compare "
                                                       "memory_gpu_final_loss)"),
    }.items()},
    "evaluate_gpu_seconds": Note("wall seconds of `evaluate` on the GPU"),
    "evaluate_gpu_device": Note("the device evaluate recorded"),
    **{f"evaluate_gpu_tokens_per_s_{name}": Note(f"evaluate's {name} tokens/s on the GPU") for name in EVALUATED},
    **{f"evaluate_gpu_perplexity_{name}": Note(f"evaluate's {name} test perplexity on the GPU")
       for name in (*EVALUATED, "memory_alone")},
    **faiss_gpu.NOTES,
}


def _bare_gpu_rows_per_second(params: Params) -> float:
    """Rows/s of a bare HF forward loop on the GPU over the encode stage's windows and batch size."""
    import torch

    from memforge.pipelines.encoder import load_encoder
    from memforge.pipelines.windows import window_batches, windows_for_rows
    from memforge.storage.paths import SPLITS, artifact_uri
    from memforge.storage.stores import PartOffsets, TokenStore

    tokens = open_artifact(artifact_uri(params.artifacts_dir, "tokens"), "tokens")
    model = load_encoder(params.encode.model).to(DEVICE)
    batches, rows = [], 0
    for split in SPLITS:
        offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"][split]["parts"])
        stream = TokenStore.open(tokens.uri, split).read_rows(offsets, 0, offsets.total_rows).astype(np.int64)
        windows = windows_for_rows(0, offsets.total_rows - 1, offsets.total_rows, params.encode.block_size,
                                   params.encode.stride)
        rows += offsets.total_rows - 1
        batches += [torch.from_numpy(np.stack([stream[w.begin:w.end] for w in batch]))
                    for batch in window_batches(windows, params.encode.batch_size)]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            hidden = model.base_model(input_ids=batch.to(DEVICE), use_cache=False).last_hidden_state
            hidden.to(torch.float16).cpu()  # waits for the GPU
    return rows / (time.perf_counter() - started)


def _keys_against_cpu(params: Params) -> dict:
    """The stored GPU keys of the first ``CHECK_ROWS`` train rows against the same rows encoded on the CPU.

    The rounding of the stored format is measured at each key's scale (one ULP of the stored dtype at the
    row's largest magnitude): summation order moves every element by a few float32 ULPs of that scale,
    which are many ULPs of an element close to zero but nothing a distance can see. Also reported: the
    float32 GPU and CPU keys' largest difference before rounding, relative to the row's scale.
    """
    from memforge.pipelines.encoder import RepresentationCapture, load_encoder
    from memforge.pipelines.windows import encode_rows
    from memforge.storage.paths import artifact_uri
    from memforge.storage.stores import KeyStore, PartOffsets, TokenStore

    tokens = open_artifact(artifact_uri(params.artifacts_dir, "tokens"), "tokens")
    model = load_encoder(params.encode.model)
    capture = RepresentationCapture(model, params.encode.representation, params.encode.layer)
    offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"]["train"]["parts"])

    def encoded() -> np.ndarray:
        return encode_rows(model, capture, TokenStore(tokens.uri, "train"), offsets, 0, CHECK_ROWS,
                           params.encode.block_size, params.encode.stride, 8, model.config.n_embd)[0]

    cpu = encoded()
    model.to(DEVICE)
    gpu = encoded()
    stored = np.asarray(KeyStore.open(artifact_uri(params.artifacts_dir, "keys/train")).keys(0, CHECK_ROWS))
    scale = np.abs(cpu).max(axis=1, keepdims=True)
    row_ulp = np.spacing(scale.astype(stored.dtype)).astype(np.float64)
    row_ulps = (np.abs(stored.astype(np.float64) - cpu) / row_ulp).max()
    return {"keys_checked_rows": CHECK_ROWS, "keys_stored_dtype": str(stored.dtype),
            "keys_gpu_vs_cpu_max_abs": float(np.abs(stored.astype(np.float32) - cpu).max()),
            "keys_gpu_vs_cpu_max_row_ulps": round(float(row_ulps), 3),
            "keys_gpu_vs_cpu_within_rounding": bool(row_ulps <= 1),
            "keys_fp32_gpu_vs_cpu_max_rel": float((np.abs(gpu - cpu) / scale).max())}


def _steady_rows_per_second(params: Params, started: float) -> tuple[float, float]:
    """(rows/s once every worker has finished its first shard, seconds from the stage's start to the first
    finished shard) from the shard markers' times: the first round of shards carries the workers' start-up
    (processes importing torch, CUDA contexts, models loaded), which a 100 M-token run pays once."""
    from memforge.storage.shards import MARKERS_DIR

    done = []
    for split in ("train", "validation"):
        markers = fs.join(params.artifacts_dir, "keys", split, MARKERS_DIR)
        done += [(os.path.getmtime(fs.join(markers, name)), fs.read_json(fs.join(markers, name))["stats"]["rows"])
                 for name in fs.list_files(markers) if name.endswith(".json")]
    done.sort()
    first_round = params.runtime.num_workers
    rows = sum(count for _, count in done[first_round:])
    return rows / (done[-1][0] - done[first_round - 1][0]), done[0][0] - started


def _encode_on_gpu(ws) -> dict:
    from memforge.flows.stages import run_stage

    params = with_sections(ws.params(ENCODE_SCALE, ENCODER), encode=ENCODE, runtime=RUNTIME)
    started, wall = time.perf_counter(), time.time()
    run_stage("encode", params, rebuild=True)
    seconds = time.perf_counter() - started
    steady, startup = _steady_rows_per_second(params, wall)
    keys = open_artifact(fs.join(params.artifacts_dir, "keys", "train")).manifest
    rows = sum(open_artifact(fs.join(params.artifacts_dir, "keys", s)).manifest["counts"]["rows"]
               for s in ("train", "validation"))
    bare = _bare_gpu_rows_per_second(params)
    return {"encode_gpu_rows": rows, "encode_gpu_devices": keys["stats"]["devices"],
            "encode_gpu_rows_per_s": round(rows / seconds, 1), "encode_bare_gpu_rows_per_s": round(bare, 1),
            "encode_gpu_vs_bare": round(rows / seconds / bare, 3), "encode_gpu_first_shard_s": round(startup, 1),
            "encode_gpu_steady_rows_per_s": round(steady, 1), "encode_gpu_steady_vs_bare": round(steady / bare, 3),
            **_keys_against_cpu(params)}


def _run_killed(params: Params, where: str) -> None:
    """``memforge train-memory`` in a subprocess, killed once the checkpoint of step ``KILL_AT`` is written."""
    config = fs.join(where, "params-killed.json")
    fs.write_json_atomic(config, params.model_dump(mode="json"))
    marker = fs.join(params.artifacts_dir, "memory", "_checkpoints", f"step-{KILL_AT:07d}", "trainer.json")
    process = subprocess.Popen([sys.executable, "-m", "memforge.flows.cli", "train-memory", "--params", config],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not fs.exists(marker):
        if process.poll() is not None:
            raise MemforgeError(f"bench gpu: train-memory ended before step {KILL_AT}: "
                                f"{process.stderr.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _training_on_gpu(ws) -> dict:
    """The 1x datastore encoded, indexed and targeted, then the memory trained and evaluated on the GPU."""
    from memforge.flows.stages import run_stage

    base = with_sections(ws.params(1, ENCODER), encode=ENCODE, runtime=RUNTIME, index=INDEX, memory=MEMORY)
    for name in ("encode", "index", "targets"):
        run_stage(name, base)
    figures = {}
    started = time.perf_counter()
    run_stage("train-memory", with_sections(base, memory={"device": DEVICE}), rebuild=True)
    uninterrupted = open_artifact(fs.join(base.artifacts_dir, "memory")).manifest["stats"]
    figures.update(memory_gpu_steps=MEMORY["max_steps"], memory_gpu_rows_per_s=uninterrupted["rows_per_second"],
                   memory_gpu_seconds=round(time.perf_counter() - started, 1),
                   memory_gpu_final_loss=uninterrupted["final_loss"])
    for turn, (first, second) in enumerate(RESUMES):
        art = str(ws.root / f"resume-{turn}")
        os.makedirs(art)
        for name in ("tokens", "keys", "index", "targets"):
            os.symlink(fs.join(base.artifacts_dir, name), os.path.join(art, name))
        moved = base.model_copy(update={"artifacts_dir": art})
        _run_killed(with_sections(moved, memory={"device": first}), str(ws.root))
        run_stage("train-memory", with_sections(moved, memory={"device": second}))
        resumed = open_artifact(fs.join(art, "memory")).manifest["stats"]
        figures[f"memory_{first}_checkpoint_resumes_on_{second}"] = resumed["resumed_from_step"] == KILL_AT
        figures[f"memory_{first}_to_{second}_final_loss"] = resumed["final_loss"]
    started = time.perf_counter()
    run_stage("evaluate", with_sections(base, evaluate={"device": DEVICE}), rebuild=True)
    metrics = fs.read_json(fs.join(base.artifacts_dir, "eval", "metrics.json"))
    figures.update(evaluate_gpu_seconds=round(time.perf_counter() - started, 1),
                   evaluate_gpu_device=open_artifact(fs.join(base.artifacts_dir, "eval")).manifest["stats"]["device"],
                   **{f"evaluate_gpu_tokens_per_s_{name}": metrics["tokens_per_second"][IN_METRICS[name]]
                      for name in EVALUATED},
                   **{f"evaluate_gpu_perplexity_{name}": metrics["perplexity"][IN_METRICS.get(name, name)]
                      for name in (*EVALUATED, "memory_alone")})
    return figures


def bench_gpu_faiss(ws) -> dict:
    """FAISS's figures (``memforge.bench.faiss_gpu``; alone: ``--only gpu_faiss``) on a datastore of
    ``FAISS_SCALE`` MB of text encoded on the GPU; without a GPU build of FAISS, only why they are missing."""
    from memforge.flows.stages import run_stage

    missing = faiss_gpu.unavailable()
    if missing:
        return {"faiss_gpu": missing}
    params = with_sections(ws.params(FAISS_SCALE, ENCODER), encode=ENCODE, runtime=RUNTIME)
    run_stage("encode", params)
    return faiss_gpu.bench_faiss_gpu(params)


def bench_gpu(ws) -> dict:
    """Every GPU figure of the module doc, on the first CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise MemforgeError("bench gpu: torch sees no CUDA device on this machine; run it where there is one")
    figures = {"gpu_name": torch.cuda.get_device_name(0), "torch_version": torch.__version__,
               "encoder_shape": json.dumps(SHAPES[ENCODER])}
    for part in (_encode_on_gpu, _training_on_gpu, bench_gpu_faiss):
        found = part(ws)
        log.info("bench gpu: %s", json.dumps(found))  # a run stopped later still shows what it measured
        figures.update(found)
    return figures
