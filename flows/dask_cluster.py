"""A Dask cluster of separate processes on 127.0.0.1 (``dask scheduler`` + ``dask worker``), for the bench and
the tests: what a user starts by hand on a cluster, on one machine without the network."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from memforge.flows.server import free_port, stop_process_group


@contextlib.contextmanager
def local_dask_cluster(workers: int, threads: int, logs: Path) -> Iterator[str]:
    """Start a scheduler and ``workers`` worker processes of ``threads`` threads each (logs under ``logs``),
    wait until every worker has joined, yield the scheduler address, stop them all at the end."""
    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    commands = {"scheduler": ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                              "--no-dashboard"],
                "workers": ["worker", address, "--nworkers", str(workers), "--nthreads", str(threads), "--host",
                            "127.0.0.1", "--no-dashboard", "--memory-limit", "0"]}
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for name, args in commands.items():
            with open(logs / f"{name}.log", "wb") as log:
                processes.append(subprocess.Popen([dask, *args], stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process)
