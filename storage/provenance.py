"""Where an artifact came from: code version, software environment and run identity."""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import socket
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

PACKAGE_NAME = "memforge"
ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "tokenizers", "faiss-cpu", "apache-beam", "prefect",
    "zarr", "pyarrow", "numpy", "dvc",
)
_RUN_ID = os.environ.get("MEMFORGE_RUN_ID") or uuid.uuid4().hex


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=_source_root(), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# The packages whose code determines an artifact's content, by artifact kind. Orchestration (flows/)
# never does, so editing a flow or the CLI leaves every artifact up to date; dvc.yaml's code deps match.
PIPELINE_PACKAGES = ("storage", "pipelines")
CONTENT_PACKAGES = ("storage", "pipelines", "training")
_PACKAGES_BY_KIND = {"tokens": PIPELINE_PACKAGES, "keys": PIPELINE_PACKAGES, "index": PIPELINE_PACKAGES,
                     "targets": PIPELINE_PACKAGES}


def code_packages(kind: str) -> tuple[str, ...]:
    """The source packages that determine an artifact of ``kind`` (training kinds: all content packages)."""
    return _PACKAGES_BY_KIND.get(kind, CONTENT_PACKAGES)


@functools.lru_cache(maxsize=None)
def source_digest(packages: tuple[str, ...]) -> str:
    """sha256 over the Python sources (path + content) of ``packages``, so any code change there shows."""
    root = _source_root()
    digest = hashlib.sha256()
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version(kind: str) -> dict:
    """Package version, digest of the sources that determine an artifact of ``kind``, and the git
    commit with its dirty flag when in a checkout."""
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if sha is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    packages = code_packages(kind)
    return {
        "package_version": _package_version(PACKAGE_NAME),
        "source_digest": source_digest(packages),
        "source_packages": list(packages),
        "git_sha": sha,
        "git_dirty": dirty,
    }


def environment(beam_runner: str | None = None) -> dict:
    """Python and library versions (read from package metadata, nothing imported)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in ENVIRONMENT_PACKAGES},
    }
    if beam_runner is not None:
        env["beam_runner"] = beam_runner
    return env


def flow_run_id() -> str | None:
    """The Prefect flow-run id when running inside a Prefect flow (prefect is never imported here)."""
    prefect_runtime = sys.modules.get("prefect.runtime")
    if prefect_runtime is not None:
        try:
            found = prefect_runtime.flow_run.id
        except Exception:  # noqa: BLE001 - prefect raises various errors outside a run
            found = None
        if found:
            return str(found)
    return os.environ.get("PREFECT__FLOW_RUN_ID")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_identity() -> dict:
    """This process's run id (``MEMFORGE_RUN_ID`` or random), Prefect flow-run id, host."""
    return {"run_id": _RUN_ID, "flow_run_id": flow_run_id(), "host": socket.gethostname()}
