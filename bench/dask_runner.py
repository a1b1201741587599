"""Part ``dask``: the encode and targets stages on a local Dask cluster against the default local runner."""
from __future__ import annotations

import time

from memforge.bench.faiss_search import faiss_params
from memforge.bench.measure import Note
from memforge.bench.workspace import Workspace
from memforge.storage import fs
from memforge.storage.artifact import open_artifact

STAGES = {"encode": "keys", "targets": "targets"}  # stage: the artifact whose rows it counts

NOTES = {
    "dask_workers": Note("Dask workers (`runtime.num_workers`), separate processes on 127.0.0.1"),
    "dask_threads_per_worker": Note("threads per Dask worker (`runtime.threads_per_worker`)"),
    **{figure: note for stage in STAGES for figure, note in {
        f"{stage}_rows": Note(f"rows {stage} writes (both splits) from the bench's 1 MB datastore"),
        f"{stage}_local_s": Note(f"seconds of the whole {stage} stage on the default local runner (run first)"),
        f"{stage}_dask_s": Note(f"seconds of the whole {stage} stage on the Dask cluster, same workers and threads"),
        f"{stage}_dask_vs_local": Note("local seconds ÷ Dask seconds (> 1: Dask is faster)",
                                       (f"{stage}_local_s", f"{stage}_dask_s")),
    }.items()},
}


def bench_dask(ws: Workspace) -> dict:
    """encode_dask_vs_local, targets_dask_vs_local: the stage's rows/s on a Dask cluster of separate processes
    on 127.0.0.1 (``runtime.num_workers`` workers of ``runtime.threads_per_worker`` threads) ÷ on the default
    local runner with the same workers and threads, same data and params (the 1x datastore, the faiss part's
    index); each the wall time of the whole stage, local first."""
    from memforge.flows.dask_cluster import local_dask_cluster
    from memforge.flows.stages import run_stage

    params = faiss_params(ws)
    if not fs.exists(fs.join(params.artifacts_dir, "index", "_manifest.json")):
        run_stage("index", params)
    figures: dict = {"dask_workers": params.runtime.num_workers,
                     "dask_threads_per_worker": params.runtime.threads_per_worker}
    workers, threads = params.runtime.num_workers, params.runtime.threads_per_worker
    with local_dask_cluster(workers, threads, ws.root / "dask") as address:
        on_dask = ("--runner=dask", f"--dask_client_address={address}")
        for name, output in STAGES.items():
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
