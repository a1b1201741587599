"""Part ``train``: train-memory's rows/s as one process and as two torch.distributed ranks (gloo, one thread
each) on the bench's 1x datastore, and the scaling efficiency; on a machine with CUDA, also on one GPU and on
every GPU (NCCL)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from memforge.bench.faiss_search import faiss_params
from memforge.bench.measure import Note, memforge_command
from memforge.bench.workspace import Workspace
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.params import Params

# A memory as wide as GPT-2 small's (768, over the tiny encoder's states through its input projection) at the
# default depth and expansion, trained on the bench tokenizer's 2048-token vocabulary with its own head
MEMORY = {"width": 768, "depth": 4, "hidden_mult": 8, "lm_head": "own", "warmup_steps": 2,
          "shuffle_buffer_chunks": 4}
# global batch (rows per step): steps per run. 512 is memory.batch_size's default; with more rows per step
# the work a rank does per step grows and the per-step costs every rank pays alike (the gradients' all-reduce,
# the optimizer step, the moving average) weigh less
BATCHES = {512: 24, 4096: 4}


def _batch_notes(batch: int) -> dict[str, Note]:
    prefix = f"train_cpu_b{batch}"
    return {
        f"{prefix}_1_rank_rows_per_s": Note(f"global batch {batch}: rows/s of train-memory's steps as one process, "
                                            "1 thread (run first; checkpoint writes not counted)"),
        f"{prefix}_2_ranks_rows_per_s": Note(f"global batch {batch}: rows/s of the same global batches on 2 gloo "
                                             "ranks of 1 thread each"),
        f"{prefix}_scaling_efficiency": Note("rows/s on 2 ranks ÷ (2 × rows/s on 1 rank)",
                                             (f"{prefix}_2_ranks_rows_per_s", f"{prefix}_1_rank_rows_per_s")),
        f"{prefix}_loss_gap": Note(f"global batch {batch}: largest per-step loss difference between the two runs"),
    }


NOTES = {
    "train_memory_parameters": Note("parameters of the memory trained (width 768, depth 4, hidden ×8, own head "
                                    "over the bench's 2048-token vocabulary)"),
    "train_rows": Note("train target rows of the bench's 1 MB datastore"),
    "train_steps": Note("optimizer steps of each run, by global batch"),
    **{figure: note for batch in BATCHES for figure, note in _batch_notes(batch).items()},
    "train_gpus": Note("CUDA devices on this machine (the GPU figures below appear only when there are some)"),
    "train_gpu_1_rank_rows_per_s": Note("global batch 4096: rows/s on one GPU"),
    "train_gpu_all_ranks_rows_per_s": Note("global batch 4096: rows/s on every GPU of the machine, one NCCL rank "
                                           "each"),
    "train_gpu_scaling_efficiency": Note("rows/s on every GPU ÷ (GPUs × rows/s on one)",
                                         ("train_gpu_all_ranks_rows_per_s", "train_gpu_1_rank_rows_per_s")),
}


def _train(params: Params, workdir: Path, name: str, ranks: int, device: str, threads: int | None,
           batch: int) -> dict:
    """Run ``memforge train-memory`` on ``ranks`` ranks as a user does (its own process, ``OMP_NUM_THREADS``
    when ``threads``) over the artifacts of ``params``; returns the memory's manifest and loss curve."""
    art = workdir / f"train-{name}"
    art.mkdir()
    for role in ("tokens", "decoder", "keys", "index", "targets"):
        if fs.exists(fs.join(params.artifacts_dir, role)):
            (art / role).symlink_to(fs.join(params.artifacts_dir, role), target_is_directory=True)
    dump = params.model_dump(mode="json")
    dump["artifacts_dir"] = str(art)
    steps = BATCHES[batch]
    dump["memory"].update(MEMORY, batch_size=batch, max_steps=steps, checkpoint_every=steps, nproc_per_node=ranks,
                          device=device)
    path = workdir / f"train-{name}.yaml"
    path.write_text(yaml.safe_dump(dump, sort_keys=False))
    environment = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(memforge_command("train-memory", "--params", str(path)), check=True, env=environment,
                   stdout=subprocess.DEVNULL)
    memory = fs.join(str(art), "memory")
    return {"manifest": open_artifact(memory, "memory").manifest,
            "losses": [row["loss"] for row in json.loads(open(fs.join(memory, "loss.json")).read())]}


def measure_scaling(params: Params, workdir: Path) -> dict:
    """The figures of ``bench_train`` over the targets of ``params`` (built), trained under ``workdir``."""
    import torch

    figures: dict = {}
    for batch in BATCHES:
        one = _train(params, workdir, f"cpu-1-b{batch}", 1, "cpu", 1, batch)
        two = _train(params, workdir, f"cpu-2-b{batch}", 2, "cpu", 1, batch)
        rates = [run["manifest"]["stats"]["rows_per_second"] for run in (one, two)]
        figures.setdefault("train_memory_parameters", one["manifest"]["counts"]["parameters"])
        figures.setdefault("train_rows", one["manifest"]["counts"]["rows"])
        figures.setdefault("train_steps", ", ".join(f"{steps} at batch {b}" for b, steps in BATCHES.items()))
        prefix = f"train_cpu_b{batch}"
        figures.update({f"{prefix}_1_rank_rows_per_s": rates[0], f"{prefix}_2_ranks_rows_per_s": rates[1],
                        f"{prefix}_scaling_efficiency": round(rates[1] / (2 * rates[0]), 3),
                        f"{prefix}_loss_gap": max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))})
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    figures["train_gpus"] = gpus
    if gpus:
        batch = max(BATCHES)
        single = _train(params, workdir, "gpu-1", 1, "cuda", None, batch)["manifest"]["stats"]["rows_per_second"]
        every = _train(params, workdir, "gpu-all", gpus, "cuda", None, batch)["manifest"]["stats"]["rows_per_second"]
        figures.update({"train_gpu_1_rank_rows_per_s": single, "train_gpu_all_ranks_rows_per_s": every,
                        "train_gpu_scaling_efficiency": round(every / (gpus * single), 3)})
    return figures


def bench_train(ws: Workspace) -> dict:
    """train_cpu_b*_scaling_efficiency: rows/s of the same global batches on 2 gloo ranks ÷ twice the rows/s of
    one process, each of one thread, on the 1x datastore's targets (built once, as the faiss part's), at the
    default global batch and a larger one; on a CUDA machine the same on every GPU ÷ on one."""
    from memforge.flows.stages import run_stage

    params = faiss_params(ws)
    if not fs.exists(fs.join(params.artifacts_dir, "targets", "train", "_manifest.json")):
        run_stage("index", params)
        run_stage("targets", params)
    return measure_scaling(params, ws.root)
