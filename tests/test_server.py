"""The temporary Prefect server of a `memforge run` without PREFECT_API_URL (flows/server.py): it dies with a
SIGKILLed run; runs starting together on a fresh PREFECT_HOME each get a server; a server that cannot start
is reported with its cause. Ctrl-C: test_flows.py::test_ctrl_c_stops_the_run_then_its_server_and_the_rerun_resumes."""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memforge.flows.server import STARTUP_LOCK, answers, prefect_api, startup_turn
from memforge.storage.errors import MemforgeError

# What `memforge run` does around its flow: enter prefect_api(), here holding the server until stdin closes.
RUN = """
import sys
from memforge.flows.server import prefect_api
with prefect_api() as url:
    print(url, flush=True)
    sys.stdin.read()
"""


def start_run(log: Path, home: Path | None = None) -> subprocess.Popen:
    """A process that enters ``prefect_api()`` with no PREFECT_API_URL (on PREFECT_HOME ``home``, else the test
    session's), prints the API's URL and holds it until its stdin closes; in a session of its own, as a job
    started at a terminal."""
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    if home:
        env["PREFECT_HOME"] = str(home)
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-c", RUN], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)


def api_of(run: subprocess.Popen, log: Path) -> str:
    """The URL the run printed once its server answered."""
    url = run.stdout.readline().strip()
    assert url.startswith("http://"), f"no server (exit {run.poll()}):\n{log.read_text()[-3000:]}"
    return url


def running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (a zombie no one reaped yet has stopped)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_a_sigkilled_run_takes_its_temporary_server_with_it(tmp_path):
    log = tmp_path / "run.log"
    run = start_run(log)
    url = api_of(run, log)
    server = psutil.Process(run.pid).children(recursive=True)
    assert server and answers(url)

    os.killpg(run.pid, signal.SIGKILL)  # the run's whole process group; the server is in a session of its own
    run.wait()
    deadline = time.monotonic() + 15
    while (answers(url) or any(map(running, server))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(url), f"the server at {url} outlived its SIGKILLed run"
    assert not any(map(running, server)), [process.cmdline() for process in server if running(process)]


@pytest.mark.integration
def test_two_runs_starting_together_on_a_fresh_prefect_home_both_get_a_server(tmp_path):
    home = tmp_path / "prefect"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    runs = [start_run(log, home) for log in logs]  # both servers would create and migrate one new database
    urls = [api_of(run, log) for run, log in zip(runs, logs)]
    assert urls[0] != urls[1] and all(map(answers, urls))

    for run in runs:
        run.stdin.close()
        assert run.wait(timeout=60) == 0
    assert not any(map(answers, urls))


@pytest.mark.integration
def test_a_server_that_cannot_start_is_reported_with_its_cause(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/prefect.db")
    with pytest.raises(MemforgeError, match=r"exited with code \d+ while starting: .*unable to open database file"):
        with prefect_api():
            pass


@pytest.mark.unit
def test_server_starts_on_one_prefect_home_take_turns(tmp_path):
    with open(tmp_path / STARTUP_LOCK, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another run is starting its server
        held = re.escape(str(tmp_path / STARTUP_LOCK)) + ".*past the start-up timeout"
        with pytest.raises(MemforgeError, match=held):
            with startup_turn(tmp_path, deadline=time.monotonic() + 0.5):
                pass
    with startup_turn(tmp_path, deadline=time.monotonic()):  # free again: taken at once
        with open(tmp_path / STARTUP_LOCK, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
