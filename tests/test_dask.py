"""Beam's DaskRunner on a real Dask cluster (scheduler and two worker processes on 127.0.0.1): the Beam stages
give the default runner's artifacts, fingerprints and data files alike, and both workers do work."""
from __future__ import annotations

import json
from pathlib import Path

from flows.cli import main

BEAM_STAGES = ("prepare", "encode", "index", "targets")
BUILT = ("tokens", "keys/train", "keys/validation", "index", "targets/train", "targets/validation")


def manifest(path: Path) -> dict:
    return json.loads((path / "_manifest.json").read_text())


def shard_workers(path: Path) -> list[str]:
    return [json.loads(marker.read_text())["stats"]["worker"] for marker in sorted((path / "_shards").glob("*.json"))]


def test_the_beam_stages_on_dask_give_the_default_runners_artifacts(chain, dask_cluster, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "decoder").symlink_to(chain["art"] / "decoder")  # train-decoder is not a Beam stage
    args = [*chain["args"], "--set", f"artifacts_dir={art}"]
    for stage in BEAM_STAGES:
        assert main([stage, *args, "--", "--runner=dask", f"--dask_client_address={dask_cluster}"]) == 0, stage
    for role in BUILT:
        on_dask, default = manifest(art / role), manifest(chain["art"] / role)
        assert on_dask["fingerprint"] == default["fingerprint"], role
        assert on_dask["files"] == default["files"], role  # every data file, checksum for checksum
        assert on_dask["environment"]["beam_runner"] == "DaskRunner"
    for stage in ("keys", "targets"):  # one shard per Dask task: both workers took some of each stage's shards
        workers = [worker for split in ("train", "validation") for worker in shard_workers(art / stage / split)]
        assert len(set(workers)) == 2, (stage, workers)


def test_dask_has_a_short_name_and_one_shard_per_task_unless_sized():
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.dask.dask_runner import DaskOptions

    from pipelines.runner import DASK_RUNNER, pipeline

    short, name = pipeline(["--runner=dask", "--dask_client_address=tcp://127.0.0.1:8786"], num_workers=2)
    assert name == "DaskRunner" and short.options.view_as(StandardOptions).runner == DASK_RUNNER
    assert short.options.view_as(DaskOptions).partition_size == 1
    sized, _ = pipeline([f"--runner={DASK_RUNNER}", "--dask_npartitions=3"], num_workers=2)
    assert sized.options.view_as(DaskOptions).npartitions == 3
    assert sized.options.view_as(DaskOptions).partition_size is None  # the user's sizing stands
