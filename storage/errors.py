"""Exceptions raised by the artifact layer, and how faults of the operating system or an object store are
recognised (also as text: Beam re-raises a worker's error as a new exception carrying only its message);
the CLI turns them into one-line errors."""
from __future__ import annotations

import errno
import re
import sys


class MemforgeError(Exception):
    """Base class for errors a user can act on (bad input, refused artifact)."""


class ParamsError(MemforgeError):
    """A params file or override is invalid; the message names the dotted key."""


class ArtifactError(MemforgeError):
    """An artifact is missing, unpublished, of unknown schema, or refused for resume."""


class DamagedFileError(ArtifactError, ValueError):
    """A bookkeeping file (manifest, plan, marker, build record) is not valid JSON; the message names it."""


class DiskFullError(MemforgeError):
    """A write found no space (or quota) left; the message names the artifact and the free space."""


class WriteError(MemforgeError):
    """The operating system refused a write (file too large, no permission, read-only filesystem, a path
    component that is a file); the message names the file and the cause."""


class TransientError(MemforgeError):
    """A failure that may pass when retried (an object store that cannot be reached); flows retry it."""


class StoreUnreachableError(TransientError):
    """An object store stopped answering (connection refused, reset, timed out); the message names the
    artifact or URL and the cause."""


_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or its cause is ENOSPC/EDQUOT, also as text (Beam re-raises a worker's error as a
    new exception carrying the original's message, without its errno)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_OUT_OF_MEMORY_TEXT = ("out of memory", "can't allocate memory", "std::bad_alloc", "Cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError, torch's OutOfMemoryError and allocation failures reported as text (FAISS, Beam)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        any(text in str(exc) for text in _OUT_OF_MEMORY_TEXT)


# Faults of the operating system a rerun meets again until the user acts (named, never retried), mostly
# refused writes, and what to do about each.
WRITE_ERRNOS = {
    errno.EFBIG: "the file outgrew the size this process may write (ulimit -f); raise that limit",
    errno.EACCES: "no permission there; fix the permissions of that path or move artifacts_dir",
    errno.EPERM: "the operation is not permitted there; fix the permissions of that path or move artifacts_dir",
    errno.EROFS: "the filesystem is mounted read-only; remount it or move artifacts_dir",
    errno.ENOSPC: "no space left; free space or move artifacts_dir",
    errno.EDQUOT: "the disk quota is used up; free space or move artifacts_dir",
    errno.ENOTDIR: "a component of that path is a file, not a directory; move it away",
    errno.EISDIR: "that path is a directory; move it away",
    errno.ENAMETOOLONG: "the path is too long for the filesystem; choose a shorter artifacts_dir",
}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\n\[\]]+)(?:: '([^'\n]+)')?")


def _chain(exc: BaseException):
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def write_fault(exc: BaseException) -> OSError | None:
    """The OSError of a refused write (one of ``WRITE_ERRNOS``) behind ``exc``, rebuilt from its text when
    Beam passed on only the message; None for anything else."""
    for seen in _chain(exc):
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return seen
    for seen in _chain(exc):
        for match in _ERRNO_TEXT.finditer(str(seen)):
            if int(match[1]) in WRITE_ERRNOS:
                return OSError(int(match[1]), match[2].strip(), match[3])
    return None


_CONNECTION_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                      errno.EHOSTUNREACH, errno.ENETUNREACH)
_UNREACHABLE_TEXT = ("Could not connect to the endpoint URL", "Cannot connect to host", "Connection was closed",
                     "Connect timeout on endpoint URL", "Read timeout on endpoint URL", "Connection refused")


def _client_errors() -> tuple[type, ...]:
    """The connection-error classes of the object-store clients this process has loaded (botocore for
    s3fs, aiohttp for s3fs/gcsfs/http): an exception of a class never imported cannot be at hand."""
    classes = []
    if "botocore.exceptions" in sys.modules:
        botocore = sys.modules["botocore.exceptions"]
        classes += [botocore.HTTPClientError, botocore.ConnectionError]
    if "aiohttp" in sys.modules:
        classes.append(sys.modules["aiohttp"].ClientConnectionError)
    return tuple(classes)


def store_unreachable(exc: BaseException) -> str | None:
    """The cause, in one line, when ``exc`` (or what it wraps) is a connection to an object store that failed:
    botocore, aiohttp or socket errors, also as the text of a worker's error; None for anything else."""
    clients = _client_errors()
    for seen in _chain(exc):
        if isinstance(seen, clients) or (isinstance(seen, OSError) and seen.errno in _CONNECTION_ERRNOS):
            return last_line(seen)
        text = str(seen)
        for marker in _UNREACHABLE_TEXT:
            if marker in text:
                line = next(line for line in reversed(text.splitlines()) if marker in line)
                return line[line.index(marker):].strip()
    return None


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message (the cause, under any traceback text it carries), or its type."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
