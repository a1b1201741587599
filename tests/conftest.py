"""Make helper modules in tests/ (e.g. toy_stage) importable from the test files; shared fixtures."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Prefect state (database, persisted task results) of this test session only, never the user's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="memforge-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # after the servers have stopped
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


TIERS = ("unit", "stage", "integration")


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier marker (see pyproject's markers). Modules run heaviest tier first
    (integration, stage, unit; each module's tests stay together, in file order), so that pytest-xdist's
    workers start on the long tests and the short ones fill the end evenly."""
    tiers = {item.nodeid: [m.name for m in item.iter_markers() if m.name in TIERS] for item in items}
    wrong = [f"{nodeid}: {found or 'no tier'}" for nodeid, found in tiers.items() if len(found) != 1]
    if wrong:
        raise pytest.UsageError("tests must carry exactly one of the markers " + ", ".join(TIERS) + ":\n  "
                                + "\n  ".join(wrong))
    heaviest: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        heaviest[module] = min(heaviest.get(module, len(TIERS)), TIERS[::-1].index(tiers[item.nodeid][0]))
    items.sort(key=lambda item: heaviest[item.nodeid.split("::")[0]])


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The tiny demo chain up to a trained memory (built once for all training tests)."""
    from chain import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A Dask cluster of separate processes on 127.0.0.1: ``dask scheduler`` and ``dask worker --nworkers 2
    --nthreads 1`` (started once per test run, stopped at its end); yields the scheduler address."""
    from memforge.flows.dask_cluster import local_dask_cluster

    with local_dask_cluster(workers=2, threads=1, logs=tmp_path_factory.mktemp("dask")) as address:
        yield address


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 (moto's standalone server, which s3fs's own tests use), with the
    environment s3fs reads set for this process and the worker processes it starts; yields the endpoint."""
    from moto_server import CREDENTIALS, moto_server

    with moto_server(tmp_path_factory.mktemp("s3") / "moto.log") as (_server, endpoint):
        settings = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            yield endpoint
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
