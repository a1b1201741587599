"""The Prefect build flow: caching by input fingerprints, params and code; reruns downstream of a
changed param; retries only transient errors; a SIGKILLed `memforge run` resumes; `memforge serve`."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

import memforge.pipelines.targets
import memforge.training.evaluate
from memforge.flows.build import STAGE_FLOWS, build
from memforge.flows.server import free_port, stop_process_group
from memforge.flows.stages import stage_names
from memforge.storage.errors import MemforgeError

from chain import write_project
from crash import MEMFORGE, kill_when

pytestmark = pytest.mark.integration

BEAM = ["--direct_running_mode=in_memory"]
STAGE_NAMES = stage_names()
PREFECT = str(Path(sys.executable).parent / "prefect")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_build_flow_caches_finished_stages_and_reruns_what_a_param_change_reaches(harness, tmp_path, monkeypatch):
    params = str(write_project(tmp_path, tmp_path / "art"))

    first = build(params_file=params, beam_args=BEAM)
    assert first["stages"] == dict.fromkeys(STAGE_NAMES, "Completed")
    assert json.loads(Path(first["metrics"]).read_text())["perplexity"]["knnlm"] > 0

    # Unchanged inputs: no stage runs again.
    assert build(params_file=params, beam_args=BEAM)["stages"] == dict.fromkeys(STAGE_NAMES, "Cached")
    assert STAGE_FLOWS["index"](params_file=params, beam_args=BEAM)["stages"] == {"index": "Cached"}

    # How stages run (workers, threads, batch sizes) and how their data is chunked never outdate what they
    # wrote: every stage stays Cached.
    execution = ["runtime.num_workers=1", "runtime.threads_per_worker=2", "index.threads=2", "encode.batch_size=4",
                 "encode.chunk_rows=32", "targets.shard_chunks=1"]
    assert build(params_file=params, overrides=execution, beam_args=BEAM)["stages"] == dict.fromkeys(STAGE_NAMES,
                                                                                                      "Cached")

    # One param changed: that stage and what reads its output rerun, nothing upstream.
    third = build(params_file=params, overrides=["targets.temperature=2.0"], beam_args=BEAM)
    upstream = ("prepare", "train-decoder", "encode", "index")
    assert third["stages"] == {name: "Cached" if name in upstream else "Completed" for name in STAGE_NAMES}
    assert third["fingerprints"]["tokens"] == first["fingerprints"]["tokens"]
    assert third["fingerprints"]["targets/train"] != first["fingerprints"]["targets/train"]

    # Each stage published a Prefect artifact naming its artifact path and fingerprint.
    markdown = Artifact.get("memforge-targets").data
    assert f"`{third['fingerprints']['targets/train'][:16]}`" in markdown
    assert str(tmp_path / "art" / "targets" / "train") in markdown

    # A transient error is retried (and the retry succeeds); bad input is not retried.
    calls = {"evaluate": 0, "targets": 0}
    real_evaluate, real_check = memforge.training.evaluate.evaluate, memforge.pipelines.targets.Targets.check

    def flaky_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 1:
            raise OSError("object store timed out")
        return real_evaluate(*args, **kwargs)

    def counted_check(*args, **kwargs):
        calls["targets"] += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(memforge.training.evaluate, "evaluate", flaky_evaluate)
    monkeypatch.setattr(memforge.pipelines.targets.Targets, "check", counted_check)
    retried = build(params_file=params, overrides=["targets.temperature=2.0", "evaluate.split_seed=1"],
                    beam_args=BEAM)
    assert retried["stages"]["evaluate"] == "Completed" and calls["evaluate"] == 2
    with pytest.raises(MemforgeError, match="targets.k: 5000 must be smaller"):
        build(params_file=params, overrides=["targets.k=5000", "targets.width=8"], beam_args=BEAM)
    assert calls["targets"] == 1  # flow.retries is 2, but bad input fails the same way every time


def test_ctrl_c_stops_the_run_then_its_server_and_the_rerun_resumes(tmp_path, dask_cluster):
    """SIGINT to the run's process group, as a terminal's Ctrl-C sends it, in the middle of encode; the rerun
    goes on on a Dask cluster (`memforge run -- --runner=dask ...`) from the shards the local runner finished."""
    params = str(write_project(tmp_path, tmp_path / "art"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    markers = tmp_path / "art" / "keys" / "train" / "_shards"
    args = ["run", "--params", params, "--", *BEAM]
    code, log = kill_when(args, lambda: markers.exists() and any(markers.glob("*.json")), timeout=240, env=env,
                          sig=signal.SIGINT, exit_within=30)
    assert code == 130, log[-3000:]
    assert "memforge run: interrupted" in log
    server = re.search(r"temporary Prefect server at (\S+)", log)[1]
    with pytest.raises(OSError):  # stopped with the run, after the flow
        urllib.request.urlopen(f"{server}/health", timeout=2)
    done = len(list(markers.glob("*.json")))
    assert not (tmp_path / "art" / "keys" / "train" / "_manifest.json").exists(), "stopped after encode finished"
    assert not (tmp_path / "art" / "keys" / "train" / "_lease.json").exists(), "the stopped build keeps no lease"

    # up to targets: the stages after it run no Beam, so Dask has nothing more to show
    on_dask = ["run", "--params", params, "--until", "targets", "--", "--runner=dask",
               f"--dask_client_address={dask_cluster}"]
    rerun = subprocess.run([MEMFORGE, *on_dask], capture_output=True, text=True, timeout=400, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "memforge run: prepare: Cached" in rerun.stdout
    assert "memforge run: train-decoder: Cached" in rerun.stdout
    assert "memforge run: encode: Completed" in rerun.stdout
    skipped = int(re.search(r"encode: train: \d+ rows in \d+ shards; (\d+) shards already done", rerun.stderr)[1])
    assert skipped >= done > 0
    assert "memforge run: targets: Completed" in rerun.stdout
    for role in ("index", "targets/train"):  # built whole on Dask (encode may have had no shard left)
        assert json.loads((tmp_path / "art" / role / "_manifest.json").read_text())["environment"][
            "beam_runner"] == "DaskRunner", role


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server at {url} not healthy after {timeout} s")


def test_served_deployment_runs_when_triggered(tmp_path):
    """`memforge serve` against a real `prefect server start`; a triggered run reaches Completed."""
    params = str(write_project(tmp_path, tmp_path / "art"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              start_new_session=True, stdout=(logs / "server.out").open("w"), stderr=subprocess.STDOUT)
    served = None
    try:
        _wait_healthy(api, server)
        served = subprocess.Popen([MEMFORGE, "serve", "--params", params, "--until", "prepare", "--cron", "0 0 1 1 *",
                                   "--", *BEAM], env=env, start_new_session=True,
                                  stdout=(logs / "serve.out").open("w"), stderr=subprocess.STDOUT)
        deadline, triggered = time.monotonic() + 120, None
        while time.monotonic() < deadline:  # the deployment exists once serve has registered it
            assert served.poll() is None, (logs / "serve.out").read_text()[-3000:]
            triggered = subprocess.run([PREFECT, "deployment", "run", "memforge-build/memforge", "--watch",
                                        "--watch-timeout", "240"], env=env, capture_output=True, text=True,
                                       timeout=300)
            if "not found" not in triggered.stdout + triggered.stderr:
                break
            time.sleep(1)
        assert triggered is not None and triggered.returncode == 0, (
            triggered.stdout[-2000:], (logs / "serve.out").read_text()[-3000:])
        assert "Completed" in triggered.stdout
        assert (tmp_path / "art" / "tokens" / "_manifest.json").exists()

        # prefect.yaml describes the same flow for a work pool: it deploys to this server as written.
        project = tmp_path / "project"
        project.mkdir()
        for name in ("prefect.yaml", "params.yaml", "flows", "storage", "pipelines", "training"):
            copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
            copy(REPO / name, project / name)

        def prefect(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([PREFECT, *args], cwd=project, env=env, capture_output=True, text=True,
                                  timeout=120)

        assert prefect("work-pool", "create", "memforge", "--type", "process").returncode == 0
        deployed = prefect("--no-prompt", "deploy", "--name", "memforge-nightly")
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        inspected = prefect("deployment", "inspect", "memforge-build/memforge-nightly")
        assert inspected.returncode == 0 and "0 3 * * *" in inspected.stdout, inspected.stdout[-2000:]
    finally:
        if served is not None:
            stop_process_group(served)
        stop_process_group(server)
    assert server.poll() is not None


def test_a_cached_result_that_is_not_json_data_is_never_read(harness, tmp_path, caplog):
    """A stage's cached Prefect result rewritten as a pickle (as anyone who can write the result storage
    could): the next run refuses it, runs the stage instead, and the payload never runs."""
    import base64
    import pickle

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    params = str(write_project(tmp_path, tmp_path / "art"))
    started = time.time()
    assert build(params_file=params, first="prepare", last="prepare", beam_args=BEAM)["stages"] == \
        {"prepare": "Completed"}
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    record = next(p for p in storage.glob("memforge-prepare-*") if p.stat().st_mtime >= started)

    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "payload-ran"), "w")

    stored = json.loads(record.read_text())
    stored["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    stored["result"] = base64.b64encode(pickle.dumps(Payload())).decode()
    record.write_text(json.dumps(stored))

    with caplog.at_level("WARNING", logger="memforge"):
        again = build(params_file=params, first="prepare", last="prepare", beam_args=BEAM)
    assert again["stages"] == {"prepare": "Completed"}  # not Cached: the record was not read
    assert not (tmp_path / "payload-ran").exists()
    assert f"cached result {record.name} is refused (its serializer is 'pickle'" in caplog.text
    assert build(params_file=params, first="prepare", last="prepare", beam_args=BEAM)["stages"] == \
        {"prepare": "Cached"}  # the run cached a JSON result under the new key
