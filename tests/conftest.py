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
    from flows.dask_cluster import local_dask_cluster

    with local_dask_cluster(workers=2, threads=1, logs=tmp_path_factory.mktemp("dask")) as address:
        yield address
