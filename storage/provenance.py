"""Where an artifact came from: code version, software environment and run identity."""
from __future__ import annotations

import ast
import datetime as _dt
import functools
import hashlib
import importlib.util
import os
import platform
import site
import socket
import subprocess
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

DISTRIBUTION = "memforge-mlp"  # the name it installs under (memforge on the index is another project)
ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "tokenizers", "faiss-cpu", "faiss-gpu", "faiss-gpu-cuvs", "apache-beam", "prefect",
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
# (what a refusal says), the optional-dependency checks and the input checks (file headers included). The import
# closure stops at them, so editing them leaves every artifact up to date.
EXECUTION_MODULES = frozenset(f"{PACKAGE}.{name}" for name in (
    "pipelines.stage", "pipelines.executor", "pipelines.runner", "pipelines.progress", "pipelines.worker_errors",
    "storage.params", "storage.params_view", "storage.paths", "storage.lease", "storage.artifact",
    "storage.shards", "storage.errors", "storage.extras", "storage.intact", "storage.headers", "flows",
    "pipelines.faiss_build",
))


class SourceFile(NamedTuple):
    """A source file that determines a stage's artifacts: its ``name`` as recorded, relative to ``root``, the
    folder that holds its top-level package (memforge's: its source root, so ``pipelines/encode.py``; a
    user's: the folder on the Python path, so ``mylab/stages/kernel.py``)."""

    name: str
    root: Path

    @property
    def path(self) -> Path:
        return self.root / self.name


def _find(root: Path, parts: list[str]) -> SourceFile | None:
    """The module ``parts`` under ``root`` (a package: its ``__init__.py``), or None."""
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return SourceFile(candidate.relative_to(root).as_posix(), root)
    return None


def _installation_folders() -> set[Path]:
    """Where installed packages and the standard library live (site-packages, dist-packages, stdlib)."""
    found = {*site.getsitepackages(), site.getusersitepackages(),
             *(sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib"))}
    return {Path(folder).resolve() for folder in found if folder}


@dataclass(frozen=True)
class _Packages:
    """The modules an import closure follows, found by path (nothing imported): memforge's subpackages, and
    those in ``root`` (the folder on the Python path that holds a user's stage) whose top-level name is in
    ``tops`` (None: any)."""

    root: Path | None = None
    tops: frozenset[str] | None = None

    @classmethod
    def of(cls, module: str, module_file: Path) -> "_Packages":
        """Where the modules beside stage module ``module`` (at ``module_file``) live: the folder holding its
        top-level package or module, and there every top-level module, or only its own top-level package
        when that folder is where packages are installed (the others there are other distributions)."""
        parts = module.split(".")
        if parts[0] == PACKAGE:
            return cls()
        root = module_file.parents[len(parts) - 1 + (module_file.name == "__init__.py")]
        return cls(root, frozenset(parts[:1]) if root.resolve() in _installation_folders() else None)

    def file(self, name: str) -> SourceFile | None:
        """The source file of module ``name`` when the closure follows it, else None."""
        parts = name.split(".")
        if parts[0] == PACKAGE:
            return _find(_source_root(), parts[1:]) if len(parts) > 1 and parts[1] in PROJECT_PACKAGES else None
        if self.root is None or (self.tops is not None and parts[0] not in self.tops):
            return None
        return _find(self.root, parts)


def _imported_modules(module: str, file: Path) -> set[str]:
    """Modules named by the import statements of module ``module`` at ``file`` (anywhere in it, lazy ones
    included; relative ones resolved), with the packages above them."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            except ImportError:  # a relative import above the top-level package: it fails when run
                continue
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def _excluded(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in EXECUTION_MODULES)


@functools.lru_cache(maxsize=None)
def code_files(module: str, module_file: str) -> tuple[SourceFile, ...]:
    """The source files that determine what a stage writes: the file of its module ``module`` and the
    modules it imports, transitively: memforge's (execution-only modules excluded) and, for a stage
    declared outside memforge, those in the folder that holds its top-level package or module (only its
    own package when that folder is site-packages). Sorted; names relative to each package's folder, so
    they do not depend on where memforge or the stage is installed."""
    file = Path(os.path.abspath(module_file))
    packages = _Packages.of(module, file)
    start = (packages.file(module) if packages.root is None
             else SourceFile(file.relative_to(packages.root).as_posix(), packages.root))
    files, todo, seen = {start: module}, [start], set()
    while todo:
        file = todo.pop()
        for name in sorted(_imported_modules(files[file], file.path)):
            if name in seen or _excluded(name):
                continue
            seen.add(name)
            found = packages.file(name)
            if found is not None and found not in files:
                files[found] = name
                todo.append(found)
    return tuple(sorted(files))


def source_digest(files: tuple[SourceFile, ...]) -> str:
    """sha256 over the given source files (recorded name + content), so any code change there shows."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        digest.update(file.path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _git_state() -> tuple[str | None, bool | None]:
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if sha is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return sha, dirty


def code_version(files: tuple[SourceFile, ...]) -> dict:
    """Package version, digest and list of the source files that determine an artifact, and the git
    commit with its dirty flag when in a checkout."""
    sha, dirty = _git_state()
    return {
        "package_version": _package_version(DISTRIBUTION),
        "source_digest": source_digest(files),
        "source_files": [file.name for file in files],
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
