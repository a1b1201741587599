"""Bad input found inside a Beam worker is written down, not raised, and reported by the driver; so is a
write the operating system refused (file too large, no permission or space, read-only filesystem).

Raising would make runners retry a deterministic failure and bury the message in a remote
traceback; a report names the shard and the fault, and the shard stays unmarked.
"""
from __future__ import annotations

from memforge.storage import fs
from memforge.storage.errors import MemforgeError
from memforge.storage.shards import Shard

ERRORS_DIR = "_errors"


def report(root: str, shard: Shard, error: Exception) -> None:
    """Write down ``error`` of ``shard``; an OSError keeps its errno and file name, so the driver raises it
    as the same OSError. Raises the OSError of this write when the report itself cannot be written."""
    record = {"error": str(error)}
    if isinstance(error, OSError):
        record.update(errno=error.errno, strerror=error.strerror, filename=error.filename)
    fs.write_json_atomic(fs.join(root, ERRORS_DIR, f"{shard.name}.json"), record)


def clear(root: str) -> None:
    """Forget reports of an earlier run (call before the pipeline starts)."""
    fs.remove_tree(fs.join(root, ERRORS_DIR))


def raise_reported(root: str, error_class: type[MemforgeError] = MemforgeError) -> None:
    """Raise the first reported error of this run (a reported OSError as that OSError), counting the other
    failed shards."""
    reports = fs.list_files(fs.join(root, ERRORS_DIR))
    if reports:
        first = fs.read_json(fs.join(root, ERRORS_DIR, reports[0]))
        if first.get("errno") is not None:
            raise OSError(first["errno"], first["strerror"], first["filename"])
        more = f" (and {len(reports) - 1} more shards failed)" if len(reports) > 1 else ""
        raise error_class(first["error"] + more)
