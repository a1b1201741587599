"""One writer per artifact: a lease file in the artifact directory naming its holder, kept fresh by a
heartbeat while the build runs.

A second writer (another ``memforge`` on the same artifact, a ``--rebuild`` started beside a running
build) is refused with a message naming the holder. A lease whose holder is gone is taken over: on
the same host when its process no longer exists, elsewhere when its heartbeat is older than
``STALE_AFTER_S``. Locally the lease file is created with ``O_EXCL``, so of two writers starting at
once exactly one wins; on object stores the lease is written and read back (best effort: they have
no create-if-absent that fsspec exposes everywhere).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from memforge.storage import fs, provenance
from memforge.storage.errors import ArtifactError

LEASE_NAME = "_lease.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
log = logging.getLogger("memforge")


def _alive(record: dict) -> bool:
    """Whether the holder of ``record`` may still be writing."""
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True
    return time.time() - float(record.get("heartbeat", 0)) < STALE_AFTER_S


def describe(record: dict) -> str:
    age = time.time() - float(record.get("heartbeat", 0))
    return (f"pid {record.get('pid')} on {record.get('host')} (run {record.get('run_id')}, started "
            f"{record.get('started_at')}, heartbeat {age:.0f} s ago)")


class Lease:
    """The write lease of the artifact at ``uri``; ``acquire`` or be refused, ``release`` when done."""

    def __init__(self, uri: str):
        self.uri = fs.normalize(uri)
        self.path = fs.join(self.uri, LEASE_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "run_id": provenance.run_identity()["run_id"], "started_at": provenance.now(), "heartbeat": time.time()}

    def _read(self) -> dict | None:
        try:
            return fs.read_json(self.path)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # a lease torn by a crash mid-write: nobody holds it

    def _create(self, record: dict) -> bool:
        """Write the lease if no lease file exists; True when this writer now holds it."""
        data = json.dumps(record, sort_keys=True, allow_nan=False).encode()
        if fs.is_local(self.path):
            os.makedirs(self.uri, exist_ok=True)
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            return True
        fs.write_bytes_atomic(self.path, data)
        time.sleep(0.2)  # let a concurrent writer's PUT land, then see who holds it
        return (self._read() or {}).get("token") == self.token

    def acquire(self) -> "Lease":
        """Take the lease, taking over one whose holder is gone; refuse while another writer is alive."""
        for _ in range(3):
            current = self._read()
            if current is not None:
                if current and _alive(current):
                    raise ArtifactError(f"{self.uri}: another writer is building this artifact: {describe(current)}; "
                                        f"wait for it to finish (if it is gone, remove {self.path})")
                fs.remove_tree(self.path)  # its holder is gone: take it over
            if self._create(self._record()):
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return self
        raise ArtifactError(f"{self.uri}: another writer took the lease at the same time; rerun when it is done")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self._read()
                if not current or current.get("token") != self.token:
                    return  # released or taken over: stop touching it
                fs.write_json_atomic(self.path, {**current, "heartbeat": time.time()})
            except Exception as exc:  # noqa: BLE001 - the build itself meets the fault and names it
                log.warning("%s: the lease's heartbeat was not written (%s); trying again in %.0f s", self.path,
                            _cause(exc), HEARTBEAT_S)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if this writer still holds it. Never raises: a build that
        failed propagates its own error, not the release's (a lease left behind is logged; a rerun takes it
        over once its holder is gone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = self._read()
            if current and current.get("token") == self.token:
                fs.remove_tree(self.path)
        except Exception as exc:  # noqa: BLE001 - any failure here is logged; the caller's outcome stands
            log.warning("%s: the lease was not released (%s); a rerun takes it over once this process is gone "
                        "(on another host: %.0f s after its last heartbeat)", self.path, _cause(exc), STALE_AFTER_S)


def clear_abandoned(uri: str) -> bool:
    """Remove the lease of the artifact at ``uri`` when its holder is known to be gone (a process of this host
    that no longer exists: a rank killed with the lease); True when one was removed."""
    lease = Lease(uri)
    current = lease._read()
    if current is None or (current and _alive(current)) or current.get("host") not in (None, socket.gethostname()):
        return False
    fs.remove_tree(lease.path)
    log.info("%s: removed the lease of %s, which is gone", uri, describe(current) if current else "a torn write")
    return True


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1]}" if text else type(exc).__name__
