"""Make helper modules in tests/ (e.g. toy_stage) importable from the test files; shared fixtures."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Prefect state (database, persisted task results) of this test session only, never the user's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="memforge-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The tiny demo chain up to a trained memory (built once for all training tests)."""
    from chain import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A Dask cluster of separate processes on 127.0.0.1: ``dask scheduler`` and ``dask worker --nworkers 2
    --nthreads 1`` (started once per test run, stopped at its end); yields the scheduler address."""
    import subprocess

    from distributed import Client

    from flows.server import free_port, stop_process_group

    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    logs = tmp_path_factory.mktemp("dask")
    processes = []
    try:
        for name, args in (("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                          "--no-dashboard"]),
                           ("workers", ["worker", address, "--nworkers", "2", "--nthreads", "1", "--host",
                                        "127.0.0.1", "--no-dashboard", "--memory-limit", "0"])):
            with open(logs / f"{name}.log", "wb") as log:
                processes.append(subprocess.Popen([dask, *args], stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process)
