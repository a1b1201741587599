"""The Prefect server of one `memforge run` when the user has none (no ``PREFECT_API_URL``).

Prefect's own temporary server shares the terminal's process group, so a Ctrl-C killed it at once while
the flow went on against a dead API. This one runs in its own session: Ctrl-C reaches only memforge,
which stops the running stage, reports the flow run, and only then stops the server. It runs under
``server_guard``, which stops it when memforge is gone, SIGKILLed included.

Servers started on one ``PREFECT_HOME`` share its database, which each migrates as it starts: starts are
taken in turn under a lock file there, so concurrent runs never migrate it at the same time.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Iterator

from memforge.storage.errors import MemforgeError

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_LOCK = "memforge-server-start.lock"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): .+$", re.MULTILINE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """True when the Prefect server at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues while the server is up (its own test harness does the
    same); otherwise its exit handlers wait on a server that is gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL what is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def configured_api_url() -> str | None:
    """The Prefect API the user configured (environment or Prefect profile), or None."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def startup_turn(home: Path, deadline: float) -> Iterator[None]:
    """Hold the lock file of ``home`` (PREFECT_HOME) while a server starts: one start at a time migrates the
    database there. Waits for another run's start until ``deadline`` (time.monotonic)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / STARTUP_LOCK
    with open(path, "a") as handle:  # closing it releases the lock, as a killed holder's exit does
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MemforgeError(f"another process held {path} (it was starting a Prefect server on the "
                                        f"same PREFECT_HOME) past the start-up timeout ({STARTUP_TIMEOUT_ENV})")
                time.sleep(0.2)
        yield


def startup_failure(url: str, process: subprocess.Popen, log: IO[bytes], timeout: float) -> MemforgeError:
    """The error of a server that exited before it answered (quoting the exception its log ends with, e.g.
    a migration error) or did not answer within ``timeout``; the log's tail attached."""
    log.seek(0)
    text = log.read().decode(errors="replace")
    if process.poll() is None:
        what = f"did not answer within {timeout:g} s ({STARTUP_TIMEOUT_ENV})"
    else:
        causes = EXCEPTION_LINE.findall(text)
        what = f"exited with code {process.returncode} while starting: " + (causes[-1] if causes else "no error logged")
    return MemforgeError(f"the temporary Prefect server at {url} {what}; its log ends:\n" + text[-2000:])


def start_server(url: str, log: IO[bytes], timeout: float) -> subprocess.Popen:
    """Start ``prefect server start`` for ``url`` (in its own session, under ``server_guard``) and wait until
    it answers, taking this PREFECT_HOME's start-up turn."""
    from prefect.settings import PREFECT_HOME

    with startup_turn(Path(PREFECT_HOME.value()), time.monotonic() + timeout):
        deadline = time.monotonic() + timeout
        process = subprocess.Popen(
            [sys.executable, "-m", "memforge.flows.server_guard", str(os.getpid()), "server", "start", "--host",
             "127.0.0.1", "--port", url.rsplit(":", 1)[1].split("/")[0], "--no-ui", "--no-services",
             "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while not answers(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise startup_failure(url, process, log, timeout)
                time.sleep(0.2)
        except BaseException:
            stop_process_group(process)
            raise
    return process


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API the flow reports to: the user's (``PREFECT_API_URL``), or a server started
    here in its own session and stopped when the block exits, after the flow has stopped (or by its guard
    when this process dies)."""
    configured = configured_api_url()
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{free_port()}/api"
    timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV, "120"))
    with tempfile.TemporaryFile() as log:
        process = start_server(url, log, timeout)
        try:
            print(f"memforge: temporary Prefect server at {url} (stopped when this run ends)", file=sys.stderr)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain_prefect_workers()
        finally:
            stop_process_group(process)
