"""Beam pipeline options: offline-safe local default, any user options passed through."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

DEFAULT_RUNNER = "FnApiRunner(multi_processing)"


def pipeline(beam_args: list[str], num_workers: int) -> tuple[beam.Pipeline, str]:
    """A Beam pipeline and the name of its runner.

    Without ``--runner`` in ``beam_args`` it runs on ``FnApiRunner`` with
    ``direct_running_mode=multi_processing`` and ``num_workers`` processes (DirectRunner would
    first try to download the Prism binary), unless ``beam_args`` set those options themselves
    (``--direct_running_mode=in_memory`` runs in this process). Every option is passed to Beam,
    e.g. ``--runner=FlinkRunner --flink_master=host:8081`` or ``--runner=PortableRunner
    --job_endpoint=localhost:8099 --environment_type=LOOPBACK``.
    """
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner is not None:
        return beam.Pipeline(options=options), runner
    defaults = {"direct_running_mode": "multi_processing", "direct_num_workers": num_workers,
                "default_sdk_harness_log_level": "WARNING"}
    given = {arg.split("=", 1)[0].lstrip("-") for arg in beam_args}
    options = PipelineOptions(beam_args, **{k: v for k, v in defaults.items() if k not in given})
    return beam.Pipeline(runner=FnApiRunner(), options=options), DEFAULT_RUNNER
