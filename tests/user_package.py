"""A user's own package, outside memforge, written under a folder for the fingerprint tests: the stage
``mylab.stages.scale:Scale`` writes its kernel's output; it reaches the kernel by a relative import, the
kernel its weights by another, and a helper module beside the package through an absolute import."""
from __future__ import annotations

from pathlib import Path

STAGE = "mylab.stages.scale"
STAGE_ENTRY = f"{STAGE}:Scale"
KERNEL = "mylab/stages/kernel.py"

SOURCES = {
    "mylab/__init__.py": "",
    "mylab/stages/__init__.py": "",
    "mylab/stages/scale.py": '''
from memforge.pipelines.stage import Published, Stage
from memforge.storage import fs

from mylab import ops
from . import kernel


class Scale(Stage):
    """The kernel applied to a few numbers."""

    name = "scale"
    summary = "scale a few numbers (a stage of a user's package)"
    outputs = ("scaled",)

    def run(self, ctx, role, build):
        values = ops.clip(kernel.apply([1, 2, 3]))
        fs.write_json_atomic(fs.join(build.uri, "values.json"), values)
        return Published(counts={"rows": len(values)})
''',
    KERNEL: '''
from .weights import FACTOR


def apply(values):
    return [value * FACTOR for value in values]
''',
    "mylab/stages/weights.py": "FACTOR = 2\n",
    "mylab/ops.py": '''
import helpers


def clip(values):
    return [min(value, helpers.LIMIT) for value in values]
''',
    "mylab/unused.py": "import json\n",        # in the package, imported by nothing
    "helpers.py": "LIMIT = 100\n",             # beside the package, imported by mylab.ops
    "notes.py": "import mylab\n",              # beside the package, imported by nothing
}
# What the stage's fingerprint covers besides memforge's modules.
CLOSURE = ["helpers.py", "mylab/__init__.py", "mylab/ops.py", "mylab/stages/__init__.py", KERNEL,
           "mylab/stages/scale.py", "mylab/stages/weights.py"]


def write_package(root: Path) -> Path:
    """The package's sources under ``root`` (the folder to put on the Python path); returns ``root``."""
    for name, text in SOURCES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.lstrip())
    return root


def edit_kernel(root: Path) -> None:
    """Change what the kernel computes (its factor 2 becomes 3)."""
    (root / KERNEL).write_text((root / KERNEL).read_text().replace("value * FACTOR", "value * (FACTOR + 1)"))
