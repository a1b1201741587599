"""Exceptions raised by the artifact layer; the CLI turns them into one-line errors."""


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
