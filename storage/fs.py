"""Storage roots as local paths or fsspec URLs: joining, atomic writes, checksums."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from typing import Any, BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from memforge.storage.errors import DamagedFileError
from memforge.storage.extras import missing_filesystem
from memforge.storage.finite import nulled

CHECKSUM_ALGORITHM = "sha256"
_READ_BLOCK = 1 << 22
TEMP_INFIX = ".tmp-"
_log = logging.getLogger("memforge")


def normalize(uri: str | os.PathLike) -> str:
    """Return ``uri`` as an absolute local path, or unchanged when it is a non-local URL."""
    uri = os.fspath(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(uri)


def is_local(uri: str) -> bool:
    """True when ``uri`` names a path on this machine's filesystem."""
    return "://" not in normalize(uri)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``uri``. Object stores without fsspec's listings cache:
    other processes (workers) write markers and shards all the time, so a cached listing is soon wrong."""
    uri = normalize(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **({} if is_local(uri) else {"use_listings_cache": False}))
    except ImportError as exc:
        raise missing_filesystem(uri, exc) from None
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    base = normalize(uri)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])


def _split_url(uri: str) -> tuple[str, str]:
    """(scheme://bucket or '' for local paths, the path below it)."""
    uri = normalize(uri)
    if "://" not in uri:
        return "", uri
    scheme, rest = uri.split("://", 1)
    bucket, _, path = rest.partition("/")
    return f"{scheme}://{bucket}", "/" + path


def inside(uri: str, root: str) -> bool:
    """True when ``uri`` is ``root`` or lies below it (same filesystem)."""
    (home, path), (root_home, root_path) = _split_url(uri), _split_url(root)
    return home == root_home and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


def relative(uri: str, start: str) -> str:
    """``uri`` as a '/'-separated path relative to ``start`` (``../tokens``); both on one filesystem."""
    (home, path), (start_home, start_path) = _split_url(uri), _split_url(start)
    if home != start_home:
        raise ValueError(f"{uri} and {start} are on different filesystems")
    return posixpath.relpath(path, start_path)


def resolve(start: str, ref: str) -> str:
    """A recorded location: an absolute path or URL as it is, a relative one taken from ``start``."""
    if "://" in ref or ref.startswith("/"):
        return normalize(ref)
    home, path = _split_url(start)
    return home + posixpath.normpath(posixpath.join(path, ref)) if home else os.path.normpath(os.path.join(path, ref))


def free_space(uri: str) -> str:
    """'N GiB free of M GiB' on the local filesystem holding ``uri`` (its nearest existing parent); '' for URLs."""
    if not is_local(uri):
        return ""
    path = normalize(uri)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    usage = shutil.disk_usage(path)
    return f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


class HashingWriter:
    """A binary file handle that hashes the bytes written through it: ``checksum()`` is what
    ``file_checksum`` would read back, for writers that stream more than fits in memory. A write the
    operating system refuses names ``path``, the file being written."""

    def __init__(self, handle: BinaryIO, path: str):
        self._handle, self._digest, self.path = handle, hashlib.new(CHECKSUM_ALGORITHM), path

    def write(self, data) -> int:
        self._digest.update(data)
        with named(self.path):
            return self._handle.write(data)

    def checksum(self) -> str:
        return self._digest.hexdigest()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@contextlib.contextmanager
def named(path: str, temporary: str | None = None) -> Iterator[None]:
    """Let an OSError raised in the block name ``path`` when it names no file (write, flush, fsync: EFBIG,
    ENOSPC) or only ``temporary``, the file staged for it."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, temporary):
            raise type(exc)(exc.errno, exc.strerror, path) from exc
        raise


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[HashingWriter]:
    """A binary file handle whose content appears at ``uri`` only when the block exits cleanly; it hashes what
    is written (``checksum()``).

    Locally: temp file in the same directory, fsync, rename, fsync the directory; the temp file is removed
    when the block or the write fails. Object stores: the file is staged locally and uploaded with one PUT,
    which they publish atomically.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        with tempfile.NamedTemporaryFile("w+b") as handle:
            yield HashingWriter(handle, uri)
            handle.flush()
            fs.put_file(handle.name, path)
        return
    tmp = f"{path}{TEMP_INFIX}{uuid.uuid4().hex}"
    try:
        with named(path, tmp), open(tmp, "wb") as handle:
            yield HashingWriter(handle, path)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checksum_of(data) -> str:
    """sha256 of bytes (or any buffer) in memory: what ``file_checksum`` gives for a file holding them."""
    return hashlib.new(CHECKSUM_ALGORITHM, data).hexdigest()


def write_bytes_atomic(uri: str, data) -> str:
    """Write ``data`` (bytes or any buffer) to ``uri`` so readers see either nothing or the whole file,
    durable (fsynced) on local disks; return its checksum, hashed on the way out (nothing is read back)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with atomic_writer(uri) as handle:
            handle.write(data)
        return handle.checksum()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, bytes(data))
    return checksum_of(data)


def write_json_atomic(uri: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted, strict JSON: a NaN or infinite number (a diverged
    loss, a perplexity that overflowed, a mean over nothing) is written as null and logged with its key."""
    obj, replaced = nulled(obj)
    if replaced:
        _log.warning("%s: %s not a finite number; written as null", uri,
                     ", ".join(replaced) + (" is" if len(replaced) == 1 else " are"))
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(uri: str) -> Any:
    """The JSON document at ``uri``; a damaged one is a ``DamagedFileError`` naming the file."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        data = handle.read()
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{uri}: damaged, not valid JSON ({exc}); remove the artifact directory or "
                               "pass --rebuild") from None


def file_checksum(uri: str) -> str:
    """sha256 of one file, streamed in 4 MiB blocks."""
    fs, path = filesystem(uri)
    digest = hashlib.new(CHECKSUM_ALGORITHM)
    with fs.open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sizes(uri: str, rels: list[str]) -> list[int]:
    """Sizes in bytes of the files ``rels`` below ``uri``."""
    files, root = filesystem(uri)
    return files.sizes([f"{root.rstrip('/')}/{rel}" for rel in rels]) if rels else []


def list_files(uri: str) -> list[str]:
    """All files below ``uri``, as '/'-separated paths relative to it, sorted."""
    fs, root = filesystem(uri)
    if not fs.exists(root):
        return []
    root = root.rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p != root)


# Zarr's own LocalStore writes each chunk to ``<chunk>.<uuid4 hex>.partial`` and then renames it (ours writes
# through ``atomic_writer``; debris of either kind is never part of an artifact).
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def is_temporary(rel: str) -> bool:
    """True for the temp files of our atomic writers and of Zarr's (debris of a writer killed mid-write)."""
    name = rel.rsplit("/", 1)[-1]
    return TEMP_INFIX in name or _ZARR_PARTIAL.search(name) is not None


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_contents(uri: str, keep: tuple[str, ...] = ()) -> None:
    """Remove everything inside the directory ``uri`` except the top-level entries named in ``keep``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(entry, recursive=True)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory's files to ``uri`` (local path or URL), each file written atomically."""
    for path in sorted(os.listdir(local_dir)):
        full = os.path.join(local_dir, path)
        if os.path.isfile(full):
            with open(full, "rb") as handle:
                write_bytes_atomic(join(uri, path), handle.read())


def local_dir(uri: str, scratch: str) -> str:
    """A local directory with the files of ``uri``: the path itself when local, else a copy in ``scratch``."""
    if is_local(uri):
        return normalize(uri)
    remote, path = filesystem(uri)
    remote.get(path.rstrip("/") + "/", scratch.rstrip("/") + "/", recursive=True)
    return scratch
