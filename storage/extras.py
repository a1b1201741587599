"""Optional dependencies: a missing one is named with the extra that installs it."""
from __future__ import annotations

import importlib

from memforge.storage.errors import MemforgeError
from memforge.storage.provenance import DISTRIBUTION

FILESYSTEM_EXTRAS = {"s3": "s3", "s3a": "s3"}  # URL scheme -> the extra that installs its fsspec filesystem


def missing_filesystem(uri: str, exc: ImportError) -> MemforgeError:
    """The error for a URL whose fsspec filesystem is not installed: the extra that has it, else fsspec's word."""
    scheme = uri.split("://", 1)[0]
    hint = (f"pip install '{DISTRIBUTION}[{FILESYSTEM_EXTRAS[scheme]}]'" if scheme in FILESYSTEM_EXTRAS
            else "install the fsspec filesystem for it")
    return MemforgeError(f"{uri}: no filesystem for {scheme}:// URLs is installed ({exc}): {hint}")


def require(module: str, extra: str, needed_by: str):
    """Import ``module``, or fail naming what needs it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MemforgeError(f"{needed_by} needs {module!r}, which is not installed ({exc}): "
                            f"pip install '{DISTRIBUTION}[{extra}]'") from None
