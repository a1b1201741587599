"""Faults of the operating system and of object stores are recognised wherever they surface: as the OSError
itself, as a worker's report read back by the driver, and as the text Beam passes on from a worker process."""
from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest

from memforge.flows.server import free_port
from memforge.pipelines import worker_errors
from memforge.storage import fs
from memforge.storage.errors import store_unreachable, write_fault
from memforge.storage.shards import Shard

pytestmark = pytest.mark.unit


def beam_text(exc: BaseException) -> RuntimeError:
    """What the driver gets from FnApiRunner when a worker process raised ``exc``: its text, no errno."""
    return RuntimeError(f"Traceback (most recent call last):\n  ...\n{type(exc).__name__}: {exc} "
                        "[while running 'prepare']")


def test_a_file_where_a_directory_goes_is_a_write_fault_in_every_form(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    target = str(tmp_path / "file" / "sub" / "part.parquet")
    with pytest.raises(OSError) as raised:
        fs.write_bytes_atomic(target, b"rows")
    assert raised.value.errno == errno.ENOTDIR and write_fault(raised.value) is raised.value
    rebuilt = write_fault(beam_text(raised.value))
    assert (rebuilt.errno, rebuilt.strerror, rebuilt.filename) == (errno.ENOTDIR, raised.value.strerror,
                                                                   raised.value.filename)
    worker_errors.report(str(tmp_path / "art"), Shard(3, 0, 10), raised.value)
    with pytest.raises(OSError) as reported:
        worker_errors.raise_reported(str(tmp_path / "art"))
    assert (reported.value.errno, reported.value.filename) == (errno.ENOTDIR, raised.value.filename)
    assert write_fault(ValueError("[Errno 2] No such file or directory: 'x'")) is None  # not a refused write


def test_a_write_beyond_the_file_size_limit_names_its_file_and_leaves_no_temp_file(tmp_path):
    """RLIMIT_FSIZE in a child process: write() fails with EFBIG (Python ignores SIGXFSZ)."""
    target = tmp_path / "big.bin"
    child = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
             "from memforge.storage import fs\n"
             "try:\n    fs.write_bytes_atomic(sys.argv[1], b'x' * 100_000)\n"
             "except OSError as exc:\n    print(exc.errno, exc.filename)")
    run = subprocess.run([sys.executable, "-c", child, str(target)], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == [str(errno.EFBIG), str(target)], run.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_is_an_unreachable_store_in_every_form():
    with pytest.raises(ConnectionRefusedError) as raised:
        socket.create_connection(("127.0.0.1", free_port()), timeout=5).close()
    assert store_unreachable(raised.value) and write_fault(raised.value) is None
    url = 'Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/art/_lease.json"'
    assert store_unreachable(RuntimeError(f"botocore.exceptions.EndpointConnectionError: {url}")).startswith(url)
    assert store_unreachable(ValueError("bad input")) is None


def test_flows_retry_an_unreachable_store_but_not_bad_input():
    from prefect.states import Failed

    from memforge.flows.build import _transient
    from memforge.storage.errors import MemforgeError, StoreUnreachableError, WriteError

    assert _transient(None, None, Failed(data=StoreUnreachableError("s3://b/art/tokens: the store stopped")))
    assert _transient(None, None, Failed(data=RuntimeError("a worker process died")))
    assert not _transient(None, None, Failed(data=MemforgeError("corpus.train: no file matches")))
    assert not _transient(None, None, Failed(data=WriteError("/art/x: File too large (EFBIG)")))
