"""Optional dependencies: a missing one is named with the extra that installs it."""
from __future__ import annotations

import importlib

from memforge.storage.errors import MemforgeError

DISTRIBUTION = "memforge-mlp"


def require(module: str, extra: str, needed_by: str):
    """Import ``module``, or fail naming what needs it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MemforgeError(f"{needed_by} needs {module!r}, which is not installed ({exc}): "
                            f"pip install '{DISTRIBUTION}[{extra}]'") from None
