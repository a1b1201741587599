"""Where an artifact came from: code version, software environment and run identity."""
from __future__ import annotations

import ast
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

DISTRIBUTION = "memforge-mlp"  # the name it installs under (memforge on the index is another project)
ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "tokenizers", "faiss-cpu", "apache-beam", "prefect",
    "zarr", "pyarrow", "numpy", "dvc",
)
_RUN_ID = os.environ.get("MEMFORGE_RUN_ID") or uuid.uuid4().hex


def _source_root() -> Path:
    """The folder holding memforge's subpackages: the checkout's root, or ``memforge/`` of an installed wheel."""
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


PACKAGE = "memforge"
# The API package itself (memforge/__init__.py) is how users call stages, never what a stage writes.
PROJECT_PACKAGES = ("storage", "pipelines", "training", "flows", "bench")
# Modules that say how a stage runs or how its artifacts are kept, never what they hold: the declaration
# and executor machinery, Beam options, progress, worker-error reports, the params schema (params values
# are hashed themselves), artifact locations, the write lease, manifests (a change to how fingerprints
# or content digests are computed changes the values themselves), shard plans/markers, the error classes
# (what a refusal says), the optional-dependency checks and the input checks. The import
# closure stops at them, so editing them leaves every artifact up to date.
EXECUTION_MODULES = frozenset(f"{PACKAGE}.{name}" for name in (
    "pipelines.stage", "pipelines.executor", "pipelines.runner", "pipelines.progress", "pipelines.worker_errors",
    "storage.params", "storage.params_view", "storage.paths", "storage.lease", "storage.artifact",
    "storage.shards", "storage.errors", "storage.extras", "storage.intact", "flows",
))


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (``memforge.<subpackage>...``; a package: its
    ``__init__.py``), or None."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != PACKAGE or parts[1] not in PROJECT_PACKAGES:
        return None
    base = _source_root().joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(file: Path) -> set[str]:
    """Project modules named by the import statements of ``file`` (anywhere in it, lazy ones included)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE:
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return {name for name in found if _module_file(name) is not None}


def _excluded(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in EXECUTION_MODULES)


@functools.lru_cache(maxsize=None)
def code_files(module_file: str) -> tuple[str, ...]:
    """The source files that determine what a stage writes: the stage's module file and the project
    modules it imports, transitively (execution-only modules excluded); paths relative to the source
    root, sorted."""
    root = _source_root()
    start = Path(module_file).resolve()
    files, todo, seen = {start}, [start], set()
    while todo:
        file = todo.pop()
        for name in sorted(_imported_modules(file)):
            if name in seen or _excluded(name):
                continue
            seen.add(name)
            found = _module_file(name)
            if found not in files:
                files.add(found)
                todo.append(found)
    return tuple(sorted(os.path.relpath(f, root) for f in files))


def source_digest(files: tuple[str, ...]) -> str:
    """sha256 over the given source files (path + content), so any code change there shows."""
    root = _source_root()
    digest = hashlib.sha256()
    for rel in files:
        digest.update(Path(rel).as_posix().encode() + b"\0")
        digest.update((root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _git_state() -> tuple[str | None, bool | None]:
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if sha is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return sha, dirty


def code_version(files: tuple[str, ...]) -> dict:
    """Package version, digest and list of the source files that determine an artifact, and the git
    commit with its dirty flag when in a checkout."""
    sha, dirty = _git_state()
    return {
        "package_version": _package_version(DISTRIBUTION),
        "source_digest": source_digest(files),
        "source_files": list(files),
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
