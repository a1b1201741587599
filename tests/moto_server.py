"""An S3-compatible server on 127.0.0.1 for tests: moto's standalone server (which s3fs's own tests use)."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from memforge.flows.server import free_port, stop_process_group

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server(log: Path):
    """Start ``moto_server`` in its own process group (output to ``log``), wait until it answers; yields the
    process and its endpoint URL, and stops it at the end (if it still runs)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                   endpoint.rsplit(":", 1)[1]], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        yield server, endpoint
    finally:
        stop_process_group(server)
