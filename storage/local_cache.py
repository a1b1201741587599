"""Local copies of artifact files and model directories that live on an object store, fetched once per process.

Workers read everything from URLs. What a library opens only from a local path (a model directory for
transformers, an index file or ``.npy`` to memory-map) is copied into this process's scratch directory
the first time it is asked for, under a key that identifies its content (an artifact's fingerprint, a
model's fingerprint), and reused after that: a worker that serves many shards, bundles or builds fetches
each file once. Local URLs are used in place. The scratch directory goes when the process exits, or, when
the process was killed, when the next process on the machine makes its own.
``fetches`` counts the copies made per URL (tests and benchmarks read it).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
from collections import Counter

from memforge.storage import fs

fetches: Counter[str] = Counter()
_copies: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_scratch: list[str] = []


SCRATCH_PREFIX = "memforge-fetched-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(parent: str) -> list[str]:
    """Remove the scratch directories under ``parent`` left by processes that are gone: a worker process that is
    killed, or ends without running its exit handlers, leaves its copies behind. Returns their names."""
    removed = []
    for name in os.listdir(parent):
        if not name.startswith(SCRATCH_PREFIX):
            continue
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def scratch_dir() -> str:
    """This process's scratch directory (named after its pid), made on first use; the orphans of dead
    processes go then, and this one goes at exit."""
    if not _scratch:
        remove_orphans(tempfile.gettempdir())
        _scratch.append(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return _scratch[0]


def listing_key(uri: str) -> str:
    """A content key for what lies at ``uri`` when nothing else identifies it (e.g. a model directory named
    by a param): the names, sizes and ETags (or modification times) of its files, from one listing."""
    if fs.is_local(uri):
        return ""
    remote, path = fs.filesystem(uri)
    found = remote.find(path, detail=True) or {path: remote.info(path)}
    listing = sorted((name, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
                     for name, info in found.items())
    return hashlib.sha256(repr(listing).encode()).hexdigest()


def local_path(uri: str, content_key: str) -> str:
    """A local path holding the file or directory at ``uri``: the path itself when it is local, else a copy
    made once per process for ``content_key`` (what identifies the content; a new key fetches anew)."""
    if fs.is_local(uri):
        return fs.normalize(uri)
    with _lock:
        key = (uri, content_key)
        if key not in _copies:
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            target = os.path.join(scratch_dir(), hashlib.sha256(repr(key).encode()).hexdigest()[:20], name)
            remote, path = fs.filesystem(uri)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if remote.isdir(path):
                remote.get(path.rstrip("/") + "/", target + "/", recursive=True)
            else:
                remote.get_file(path, target)
            fetches[uri] += 1
            _copies[key] = target
        return _copies[key]
