"""Beam's DaskRunner on a real Dask cluster (scheduler and two worker processes on 127.0.0.1): the Beam stages
give the default runner's artifacts, fingerprints and data files alike, both workers do work, and a worker
killed mid-stage costs nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memforge.flows.cli import main

pytestmark = pytest.mark.integration

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

    from memforge.pipelines.runner import DASK_RUNNER, pipeline

    short, name = pipeline(["--runner=dask", "--dask_client_address=tcp://127.0.0.1:8786"], num_workers=2)
    assert name == "DaskRunner" and short.options.view_as(StandardOptions).runner == DASK_RUNNER
    assert short.options.view_as(DaskOptions).partition_size == 1
    sized, _ = pipeline([f"--runner={DASK_RUNNER}", "--dask_npartitions=3"], num_workers=2)
    assert sized.options.view_as(DaskOptions).npartitions == 3
    assert sized.options.view_as(DaskOptions).partition_size is None  # the user's sizing stands


@pytest.mark.parametrize("stage, output, inputs", [
    ("encode", "keys", ("tokens", "decoder")),
    ("targets", "targets", ("tokens", "decoder", "keys", "index")),
])
def test_a_dask_worker_killed_mid_stage_costs_nothing(chain, dask_cluster, tmp_path, stage, output, inputs):
    """SIGKILL of the Dask worker process that finished the stage's first shard, while others are still to do:
    Dask reschedules its tasks (its nanny starts a new worker), the stage completes (or a rerun does), verify
    is clean, and every data file equals the default runner's."""
    import os
    import signal
    import subprocess
    import time

    from distributed import Client

    from memforge.storage.shards import MARKERS_DIR, load_plan
    from memforge.storage.verify import verify

    from crash import MEMFORGE

    art = tmp_path / "art"
    art.mkdir()
    for name in inputs:
        (art / name).symlink_to(chain["art"] / name)
    slower = {"encode": ["--set", "encode.batch_size=1"], "targets": ["--set", "targets.query_block_rows=8"]}[stage]
    args = [stage, *chain["args"], "--set", f"artifacts_dir={art}", *slower,  # execution params: same artifacts
            "--", "--runner=dask", f"--dask_client_address={dask_cluster}"]
    markers = art / output / "train" / MARKERS_DIR
    with Client(dask_cluster) as client:
        with open(tmp_path / "stage.log", "wb") as log:
            process = subprocess.Popen([MEMFORGE, *args], stdout=log, stderr=subprocess.STDOUT)
            while not (markers.exists() and any(markers.glob("*.json"))):
                assert process.poll() is None, (tmp_path / "stage.log").read_text()[-3000:]
                time.sleep(0.002)
            first = next(markers.glob("*.json"))
            victim = int(json.loads(first.read_text())["stats"]["worker"].rsplit(":", 1)[1])
            os.kill(victim, signal.SIGKILL)
            done_at_kill = len(list(markers.glob("*.json")))
            code = process.wait(timeout=300)
        client.wait_for_workers(2, timeout=60)  # the nanny restarted it
        assert victim not in set(client.run(os.getpid).values())
    assert done_at_kill < len(load_plan(str(art / output / "train")).shards)  # killed mid-stage
    if code != 0:  # Dask gave up on a task: the rerun resumes from the shards that are done
        assert main(args) == 0
    for split in ("train", "validation"):
        assert manifest(art / output / split)["files"] == manifest(chain["art"] / output / split)["files"], split
        assert verify(str(art / output / split)) == [], split
