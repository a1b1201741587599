"""The local copies of remote files: a killed worker's scratch directory does not stay behind."""
import os
import subprocess
import sys
import tempfile

import pytest

from memforge.storage import local_cache

pytestmark = pytest.mark.unit


def test_scratch_directories_of_dead_processes_are_removed(tmp_path, monkeypatch):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, live = int(finished.stdout), os.getppid()
    for pid in (dead, live):
        copy = tmp_path / f"{local_cache.SCRATCH_PREFIX}{pid}-abc123" / "key" / "model"
        copy.mkdir(parents=True)
        (copy / "config.json").write_text("{}")
    (tmp_path / f"{local_cache.SCRATCH_PREFIX}notapid").mkdir()  # not ours to judge: kept
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(local_cache, "_scratch", [])
    monkeypatch.setattr(local_cache.atexit, "register", lambda *args: None)
    mine = local_cache.scratch_dir()
    assert os.path.basename(mine).startswith(f"{local_cache.SCRATCH_PREFIX}{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        os.path.basename(mine), f"{local_cache.SCRATCH_PREFIX}{live}-abc123", f"{local_cache.SCRATCH_PREFIX}notapid"])
    assert local_cache.scratch_dir() == mine
