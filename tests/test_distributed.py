"""train-memory as torch.distributed ranks (gloo on CPU, started by torch's elastic launcher) against one
process: the same global batches give the same step, the same loss curve and, across a kill and a resume on
another number of ranks, the same weights; a killed rank stops the job with a named error; Ctrl-C stops
every rank; two launchers on 127.0.0.1 act as two nodes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from memforge.flows.cli import main
from memforge.flows.server import free_port

from chain import stage_args
from crash import MEMFORGE, as_from_a_terminal, kill_when, rerun

pytestmark = pytest.mark.stage

# the published weights are the moving average of the steps (memory.ema_decay): a resumed run ends with the
# uninterrupted run's weights only if the checkpoint carried the average, the optimizer and the data position
STEPS = {"memory.max_steps": 50, "memory.checkpoint_every": 5}


def linked(chain, where: Path) -> Path:
    art = where / "art"
    art.mkdir(parents=True)
    for name in ("tokens", "decoder", "keys", "index", "targets"):
        (art / name).symlink_to(chain["art"] / name)
    return art


def args(chain, art: Path, ranks: int, **settings) -> list[str]:
    return ["train-memory", *stage_args(chain["root"], art, **{**STEPS, "memory.nproc_per_node": ranks, **settings})]


def trained(chain, where: Path, ranks: int, **settings) -> Path:
    """Train a memory on ``ranks`` ranks into ``where``; returns its artifact directory."""
    art = linked(chain, where)
    result = rerun(args(chain, art, ranks, **settings))
    assert result.returncode == 0, result.stderr[-3000:]
    return art / "memory"


def manifest(memory: Path) -> dict:
    return json.loads((memory / "_manifest.json").read_text())


def weights(memory: Path) -> dict[str, np.ndarray]:
    return load_file(str(memory / "model" / "model.safetensors"))


def relative_difference(a: dict, b: dict) -> float:
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-12)) for k in a)


def losses(memory: Path) -> np.ndarray:
    return np.array([row["loss"] for row in json.loads((memory / "loss.json").read_text())])


def checkpoint_steps(memory: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (memory / "_checkpoints").glob("step-*/trainer.json"))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(pid: int) -> list[int]:
    """The rank processes the launcher below ``pid`` started, in the order it started them (local rank order)."""
    ranks = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                ranks.append(child)
        except OSError:
            continue
    return sorted(ranks)


@pytest.fixture(scope="module")
def one_rank(chain, tmp_path_factory) -> Path:
    """The uninterrupted one-process run that the others are compared with."""
    return trained(chain, tmp_path_factory.mktemp("one-rank"), 1)


def test_one_step_on_two_ranks_equals_one_step_on_one(chain, tmp_path):
    """The two ranks here are an outside ``torchrun``'s: each runs the same ``memforge`` command."""
    one = linked(chain, tmp_path / "one") / "memory"
    assert main(args(chain, one.parent, 1, **{"memory.max_steps": 1})) == 0
    art = linked(chain, tmp_path / "two")
    torchrun = [str(Path(MEMFORGE).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", MEMFORGE]
    result = subprocess.run([*torchrun, *args(chain, art, 1, **{"memory.max_steps": 1})], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = art / "memory"
    difference = relative_difference(weights(one), weights(two))
    print(f"one step, 2 ranks vs 1: relative weight difference {difference:.2e}")
    assert difference < 1e-5
    stats = manifest(two)["stats"]
    assert (stats["world_size"], stats["backend"], stats["devices"]) == (2, "gloo", "2 x cpu")
    assert manifest(one)["stats"]["world_size"] == 1
    assert manifest(one)["fingerprint"] == manifest(two)["fingerprint"]  # how many ranks is not content


def test_a_killed_writer_rank_stops_the_job_and_one_rank_resumes_it(chain, tmp_path, one_rank):
    art = linked(chain, tmp_path)
    memory = art / "memory"
    with tempfile.TemporaryFile() as log:
        job = subprocess.Popen([MEMFORGE, *args(chain, art, 2)], start_new_session=True, stdout=log,
                               stderr=subprocess.STDOUT, preexec_fn=as_from_a_terminal)
        deadline = time.monotonic() + 120
        while not checkpoint_steps(memory) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        ranks = rank_pids(job.pid)
        assert len(ranks) == 2 and job.poll() is None, "the job ended before a rank could be killed"
        victim = ranks[0]  # the writer, holding the lease
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = job.wait(timeout=60)
        stopped_after = time.monotonic() - killed
        log.seek(0)
        output = log.read().decode(errors="replace")
    print(f"stopped {stopped_after:.1f} s after the kill:", output[-600:])
    assert code != 0 and stopped_after < 20
    assert f"rank 0 (local rank 0, pid {victim}) on {os.uname().nodename} failed: killed by SIGKILL" in output
    assert not descendants(job.pid) and not (memory / "_manifest.json").exists()
    assert not (memory / "_lease.json").exists()  # the launcher cleared what its killed rank 0 held
    done = checkpoint_steps(memory)
    assert done and done[-1] < 50

    result = rerun(args(chain, art, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint of step {done[-1]}" in result.stderr
    resumed = manifest(memory)
    assert resumed["stats"]["resumed_from_step"] == done[-1] and resumed["stats"]["world_size"] == 1
    assert resumed["stats"]["coverage"] == manifest(one_rank)["stats"]["coverage"]  # no row repeated or skipped
    assert np.abs(losses(memory) - losses(one_rank)).max() < 1e-4
    assert relative_difference(weights(one_rank), weights(memory)) < 1e-5


def test_one_rank_killed_resumes_on_two_and_ctrl_c_stops_every_rank(chain, tmp_path, one_rank):
    art = linked(chain, tmp_path)
    memory = art / "memory"
    kill_when(args(chain, art, 1), lambda: bool(checkpoint_steps(memory)))
    first = checkpoint_steps(memory)[-1]

    # resumed on two ranks, then interrupted at the terminal (SIGINT to the whole job) after a checkpoint
    code, output = kill_when(args(chain, art, 2), lambda: checkpoint_steps(memory)[-1] > first, sig=signal.SIGINT,
                             exit_within=30)
    assert code == 130, output[-2000:]
    assert f"resuming from the checkpoint of step {first}" in output
    assert not (memory / "_lease.json").exists() and not (memory / "_manifest.json").exists()
    second = checkpoint_steps(memory)[-1]
    assert first < second < 50

    result = rerun(args(chain, art, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint of step {second}" in result.stderr
    assert manifest(memory)["stats"]["coverage"] == manifest(one_rank)["stats"]["coverage"]
    assert np.abs(losses(memory) - losses(one_rank)).max() < 1e-4
    assert relative_difference(weights(one_rank), weights(memory)) < 1e-5


def test_two_launchers_on_one_host_act_as_two_nodes(chain, tmp_path, one_rank):
    """Two `memforge train-memory` on 127.0.0.1, one rank each, meet at a c10d rendezvous: one job of two
    ranks, whose rank 0 publishes (the other launcher leaves it be). Its 50 steps follow the one-process run's
    loss curve: the global batches are the same."""
    art = linked(chain, tmp_path)
    nodes = args(chain, art, 1, **{"memory.nnodes": 2, "memory.rdzv_endpoint": f"127.0.0.1:{free_port()}"})
    launchers = [subprocess.Popen([MEMFORGE, *nodes], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    two = art / "memory"
    gap = np.abs(losses(two) - losses(one_rank))
    print(f"50 steps, 2 ranks vs 1: largest loss difference {gap.max():.2e}, "
          f"weights {relative_difference(weights(one_rank), weights(two)):.2e}")
    assert len(gap) == 50 and gap.max() < 1e-4
    assert relative_difference(weights(one_rank), weights(two)) < 1e-5
    assert manifest(two)["stats"]["world_size"] == 2 and manifest(two)["execution"]["memory.nnodes"] == 2
    assert manifest(two)["fingerprint"] == manifest(one_rank)["fingerprint"]
    # 50 steps of 64 rows over 1434 rows: two whole passes, each row served once in each (checked by count and
    # checksum), and the rows of the third pass counted alike
    assert manifest(two)["stats"]["coverage"] == manifest(one_rank)["stats"]["coverage"]
    assert manifest(two)["stats"]["coverage"]["passes_checked"] == 50 * 64 // manifest(two)["counts"]["rows"]
