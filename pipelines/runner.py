"""Beam pipeline options: offline-safe local default, Dask by a short name, any user options passed through."""
from __future__ import annotations

import contextlib

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from memforge.storage.extras import require

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DASK_NAMES = ("dask", "DaskRunner", DASK_RUNNER)  # how --runner may name it


def _given(beam_args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0].lstrip("-") for arg in beam_args if arg.startswith("--")}


def _dask_args(beam_args: list[str]) -> list[str]:
    """``--runner=dask`` spelled out, and one element per Dask partition unless the user sized them: Beam's
    DaskRunner puts ~128 elements in a partition, so a stage's few dozen shards would land on one worker."""
    args = [f"--runner={DASK_RUNNER}" if arg in [f"--runner={name}" for name in DASK_NAMES] else arg
            for arg in beam_args]
    if not _given(args) & {"dask_npartitions", "dask_partition_size"}:
        args.append("--dask_partition_size=1")
    return args


def pipeline(beam_args: list[str], num_workers: int,
             running_mode: str = "multi_processing") -> tuple[beam.Pipeline, str]:
    """A Beam pipeline and the name of its runner.

    Without ``--runner`` in ``beam_args`` it runs on ``FnApiRunner`` (DirectRunner would first try
    to download the Prism binary) with ``num_workers`` workers in ``running_mode``:
    ``multi_processing`` for Python-heavy stages, ``multi_threading`` for stages whose work is in
    libraries that release the GIL (FAISS, numpy), which then skip starting worker processes.
    ``beam_args`` override both (``--direct_running_mode=in_memory`` runs in this thread).
    ``--runner=dask --dask_client_address=tcp://HOST:8786`` runs on a Dask cluster, one shard per Dask
    task. Every other option is passed to Beam, e.g. ``--runner=FlinkRunner --flink_master=host:8081``
    or ``--runner=PortableRunner --job_endpoint=localhost:8099 --environment_type=LOOPBACK``.
    """
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner is not None:
        if runner in DASK_NAMES:
            require("distributed", "dask", "--runner=dask")
            options = PipelineOptions(_dask_args(beam_args))
            runner = "DaskRunner"
        return beam.Pipeline(options=options), runner
    defaults = {"direct_running_mode": running_mode, "direct_num_workers": num_workers,
                "default_sdk_harness_log_level": "WARNING"}
    given = _given(beam_args)
    options = PipelineOptions(beam_args, **{k: v for k, v in defaults.items() if k not in given})
    mode = options.get_all_options()["direct_running_mode"]
    return beam.Pipeline(runner=FnApiRunner(), options=options), f"FnApiRunner({mode})"


def release(runner: str) -> None:
    """Close what a finished pipeline's runner left open: Beam's DaskRunner leaves its Dask client connected
    (it would try to reconnect to the scheduler for the rest of the process)."""
    if runner == "DaskRunner":
        from distributed import default_client

        with contextlib.suppress(ValueError):  # no client: nothing to close
            default_client().close()
