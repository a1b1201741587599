"""The Prefect server of one `memforge run` when the user has none (no ``PREFECT_API_URL``).

Prefect's own temporary server shares the terminal's process group, so a Ctrl-C killed it at once while
the flow went on against a dead API. This one runs in its own session: Ctrl-C reaches only memforge,
which stops the running stage, reports the flow run, and only then stops the server.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

from memforge.storage.errors import MemforgeError

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
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
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API the flow reports to: the user's (``PREFECT_API_URL``), or a server started
    here in its own session and stopped when the block exits, after the flow has stopped."""
    configured = configured_api_url()
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{free_port()}/api"
    timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV, "120"))
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
             url.rsplit(":", 1)[1].split("/")[0], "--no-ui", "--no-services", "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise MemforgeError(f"the temporary Prefect server at {url} did not start within {timeout:g} s "
                                        f"({STARTUP_TIMEOUT_ENV}); its log ends:\n"
                                        + log.read().decode(errors="replace")[-2000:])
                time.sleep(0.2)
            print(f"memforge: temporary Prefect server at {url} (stopped when this run ends)", file=sys.stderr)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain_prefect_workers()
        finally:
            stop_process_group(process)
