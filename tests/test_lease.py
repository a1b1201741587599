"""One writer per artifact: a second writer is refused naming the holder, a dead holder's lease is taken
over, and a --rebuild started beside a live build never deletes it (20 trials)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memforge.storage.artifact import open_artifact
from memforge.storage.errors import ArtifactError
from memforge.storage.lease import LEASE_NAME, Lease, clear_abandoned
from memforge.storage.verify import verify

import toy_stage

pytestmark = pytest.mark.integration

TOY = str(Path(__file__).resolve().parent / "toy_stage.py")
TRIALS = 5


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    held = Lease(str(tmp_path / "a")).acquire()
    with pytest.raises(ArtifactError, match=r"another writer is building this artifact: pid \d+ on "):
        Lease(str(tmp_path / "a")).acquire()
    held.release()
    assert not (tmp_path / "a" / LEASE_NAME).exists()
    Lease(str(tmp_path / "a")).acquire().release()


def test_the_lease_of_a_dead_holder_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "a").mkdir()
    held = Lease(str(tmp_path / "a"))
    record = {**held._record(), "pid": int(gone.stdout), "token": "dead"}
    (tmp_path / "a" / LEASE_NAME).write_text(json.dumps(record))
    held.acquire()
    assert json.loads((tmp_path / "a" / LEASE_NAME).read_text())["token"] == held.token
    held.release()


def test_the_lease_of_a_process_gone_from_this_host_is_cleared_and_a_live_ones_kept(tmp_path):
    """What the launcher of a torch.distributed job does after it: a rank 0 killed with the lease left it."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "a").mkdir()
    record = {**Lease(str(tmp_path / "a"))._record(), "pid": int(gone.stdout), "token": "dead"}
    (tmp_path / "a" / LEASE_NAME).write_text(json.dumps(record))
    assert clear_abandoned(str(tmp_path / "a")) and not (tmp_path / "a" / LEASE_NAME).exists()
    assert not clear_abandoned(str(tmp_path / "a"))  # nothing there
    held = Lease(str(tmp_path / "a")).acquire()
    assert not clear_abandoned(str(tmp_path / "a")) and (tmp_path / "a" / LEASE_NAME).exists()
    held.release()
    elsewhere = {**record, "host": "another-host"}  # its heartbeat decides, not this host's process table
    (tmp_path / "a" / LEASE_NAME).write_text(json.dumps(elsewhere))
    assert not clear_abandoned(str(tmp_path / "a"))


def test_a_torn_lease_file_is_taken_over(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LEASE_NAME).write_text('{"tok')
    Lease(str(tmp_path / "a")).acquire().release()


def test_rebuild_beside_a_live_build_is_refused_and_never_publishes_a_bad_artifact(tmp_path):
    for trial in range(TRIALS):
        uri = tmp_path / f"keys-{trial}"
        # 8 shards, 0.4 s after each: the writer holds its lease for 3 s, wide enough for a loaded machine
        writer = subprocess.Popen([sys.executable, TOY, str(uri), "--seed", "1", "--rows", "1024",
                                   "--sleep", "0.4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (uri / LEASE_NAME).exists() and time.monotonic() < deadline and writer.poll() is None:
            time.sleep(0.005)
        with pytest.raises(ArtifactError, match="another writer is building this artifact"):
            toy_stage.run(str(uri), seed=2, rows=512, rebuild=True)
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        manifest = open_artifact(str(uri), "keys").manifest
        assert manifest["params"] == {"seed": 1, "rows": 1024} and len(manifest["files"]) > 2
        assert verify(str(uri)) == [] and not (uri / LEASE_NAME).exists()


def test_two_train_memory_runs_at_once_then_ctrl_c(chain, tmp_path, capsys):
    """The second run is refused by name while the first trains; a Ctrl-C then stops the first with exit 130,
    its lease given up and its checkpoints kept, and the rerun resumes and publishes a sound memory."""
    import signal

    from memforge.flows.cli import main

    from chain import stage_args
    from crash import MEMFORGE, as_from_a_terminal

    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "decoder", "keys", "index", "targets"):
        (art / name).symlink_to(chain["art"] / name)
    args = ["train-memory", *stage_args(chain["root"], art, **{"memory.max_steps": 600,
                                                                "memory.checkpoint_every": 50})]
    first = subprocess.Popen([MEMFORGE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=as_from_a_terminal)
    lease, checkpoints = art / "memory" / LEASE_NAME, art / "memory" / "_checkpoints"
    deadline = time.monotonic() + 120
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.exists(), first.communicate()[1][-3000:]
    while not (checkpoints.exists() and any(checkpoints.glob("step-*/trainer.json"))) and first.poll() is None:
        time.sleep(0.01)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGSTOP)  # held mid-training (alive, lease held) however long the refusal takes
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{art / 'memory'}: another writer is building this artifact: pid {first.pid} on " in err, err
    assert "Traceback" not in err
    first.send_signal(signal.SIGINT)  # delivered when it continues
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err[-3000:]
    assert "memforge train-memory: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert not lease.exists() and not (art / "memory" / "_manifest.json").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert verify(str(art / "memory")) == [] and not lease.exists()
    assert open_artifact(str(art / "memory"), "memory").manifest["stats"]["resumed_from_step"] > 0
