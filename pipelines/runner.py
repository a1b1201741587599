"""Beam pipeline options: offline-safe local default, any user options passed through."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner


def pipeline(beam_args: list[str], num_workers: int,
             running_mode: str = "multi_processing") -> tuple[beam.Pipeline, str]:
    """A Beam pipeline and the name of its runner.

    Without ``--runner`` in ``beam_args`` it runs on ``FnApiRunner`` (DirectRunner would first try
    to download the Prism binary) with ``num_workers`` workers in ``running_mode``:
    ``multi_processing`` for Python-heavy stages, ``multi_threading`` for stages whose work is in
    libraries that release the GIL (FAISS, numpy), which then skip starting worker processes.
    ``beam_args`` override both (``--direct_running_mode=in_memory`` runs in this thread). Every
    option is passed to Beam, e.g. ``--runner=FlinkRunner --flink_master=host:8081`` or
    ``--runner=PortableRunner --job_endpoint=localhost:8099 --environment_type=LOOPBACK``.
    """
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner is not None:
        return beam.Pipeline(options=options), runner
    defaults = {"direct_running_mode": running_mode, "direct_num_workers": num_workers,
                "default_sdk_harness_log_level": "WARNING"}
    given = {arg.split("=", 1)[0].lstrip("-") for arg in beam_args}
    options = PipelineOptions(beam_args, **{k: v for k, v in defaults.items() if k not in given})
    mode = options.get_all_options()["direct_running_mode"]
    return beam.Pipeline(runner=FnApiRunner(), options=options), f"FnApiRunner({mode})"
