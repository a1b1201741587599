"""Crash a real `memforge` stage mid-run: SIGKILL its whole process group (Beam workers included)
as soon as its first shard marker is durable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

MEMFORGE = str(Path(sys.executable).parent / "memforge")


def as_from_a_terminal() -> None:
    """``preexec_fn`` of a memforge process that a test interrupts: the signal state of a job started at a
    terminal (no signal blocked, SIGINT at its default), whatever the test process inherited or set."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 120, env: dict | None = None,
              sig: int = signal.SIGKILL, exit_within: float = 60) -> tuple[int, str]:
    """Run ``memforge ARGS`` and send ``sig`` to its process group (SIGINT: a Ctrl-C at the terminal) as soon
    as ``ready()`` is true; returns its exit code and log. A run that ends before that, or does not exit
    within ``exit_within`` seconds of the signal, fails the test with the end of its log."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([MEMFORGE, *args], start_new_session=True, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=as_from_a_terminal)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready() and process.poll() is None:
            time.sleep(0.002)
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"memforge {' '.join(args)} ended (exit {process.returncode}) before the kill point:\n"
                                 + log.read().decode(errors="replace")[-3000:])
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=exit_within)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.seek(0)
            raise AssertionError(f"memforge {' '.join(args)} still ran {exit_within} s after signal {sig}:\n"
                                 + log.read().decode(errors="replace")[-3000:]) from None
        log.seek(0)
        return process.returncode, log.read().decode(errors="replace")


def kill_after_first_shard(args: list[str], markers: Path, timeout: float = 120) -> int:
    """Run ``memforge ARGS``, kill it once ``markers`` holds a finished marker; return how many it finished."""
    kill_when(args, lambda: markers.exists() and any(markers.glob("*.json")), timeout)
    return len(list(markers.glob("*.json")))  # a marker being written when killed is only a temp file


def rerun(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``memforge ARGS`` to completion, capturing its log."""
    return subprocess.run([MEMFORGE, *args], capture_output=True, text=True, timeout=300)
