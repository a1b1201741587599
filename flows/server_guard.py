"""Run ``prefect server start`` in this process and stop it when the process that started it is gone.

``python -m memforge.flows.server_guard PARENT_PID server start ...``: the temporary server of a
``memforge run`` lives in its own session (a Ctrl-C reaches only memforge, which stops the server after the
flow), so a SIGKILL of the run's process group never reaches it. A watcher thread here notices that the
parent died (this process is handed to another parent) and stops the server's process group: SIGTERM, then
SIGKILL after a grace period, as ``memforge.flows.server.stop_process_group`` does.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 10.0


def stop_when_orphaned(parent: int) -> None:
    """Wait until this process's parent is no longer ``parent``, then stop this process group."""
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    """Watch ``argv[0]`` (the parent's pid) and run ``python -m prefect`` with the rest of ``argv``."""
    if os.getpgrp() != os.getpid():
        raise SystemExit("server_guard stops its whole process group: start it in a session of its own")
    threading.Thread(target=stop_when_orphaned, args=(int(argv[0]),), name="parent-watch", daemon=True).start()
    sys.argv = ["prefect", *argv[1:]]
    runpy.run_module("prefect", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
