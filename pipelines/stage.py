"""A stage as one declaration: what it reads and writes, which params define its content, and its work.

A subclass of ``Stage`` names the stage, its input and output artifact roles, and three lists of
params keys:

- ``content``: what defines the data (they enter the fingerprint);
- ``layout``: chunk and shard sizes (they shape the plan; a finished artifact with another layout
  stays up to date, an interrupted one restarts its plan);
- ``execution``: how it runs (workers, threads, batch sizes; provenance only).

Its work is a few methods, each reading only declared params through ``ctx.params``. Sharded stages
(``sharded = True``) implement ``plan``/``create``/``worker``/``finalize`` and the executor runs the
shards as one Beam pipeline; the others implement ``run``. Everything else (begin, up-to-date check,
resume, Beam, progress, worker errors, publish) is the executor's (``pipelines.executor``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from memforge.storage import paths, provenance
from memforge.storage.artifact import Artifact, ArtifactBuild
from memforge.storage.params_view import ParamsView
from memforge.storage.shards import Shard, ShardPlan


@dataclass
class Context:
    """What a stage's methods get: its params view, its opened inputs by role, where artifacts live."""

    stage: "Stage"
    params: ParamsView
    artifacts_dir: str
    inputs: dict[str, Artifact]
    scratch: dict[str, Any] = field(default_factory=dict)  # what check() resolved, for the later steps

    def uri(self, role: str) -> str:
        """Location of the artifact playing ``role``."""
        return paths.artifact_uri(self.artifacts_dir, role)


@dataclass(frozen=True)
class Published:
    """What an output's manifest records besides lineage: counts, array descriptions, figures."""

    counts: dict[str, Any]
    arrays: dict[str, dict] | None = None
    stats: dict[str, Any] | None = None
    hashed: dict[str, str] | None = None  # checksums of files written outside shards, taken as they were written


class ShardWorker:
    """The per-worker half of a sharded stage (sent to Beam workers): ``setup`` once per worker, then
    ``process`` each shard: read, compute, write; return (files with checksums, stats)."""

    def setup(self) -> None:
        """Open models, indexes and stores (once per worker)."""

    def process(self, role: str, uri: str, shard: Shard) -> tuple[dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what ``setup`` opened."""


class Stage:
    """Base of every stage declaration (see module doc)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]
    format: ClassVar[str] = "directory"
    inputs: ClassVar[tuple[str, ...]] = ()
    content: ClassVar[tuple[str, ...]] = ()
    layout: ClassVar[tuple[str, ...]] = ()
    execution: ClassVar[tuple[str, ...]] = ()
    sharded: ClassVar[bool] = False
    # the params section whose nproc_per_node / nnodes / rdzv_endpoint / device run it as torch.distributed ranks
    launch: ClassVar[str | None] = None
    running_mode: ClassVar[str] = "multi_processing"  # local Beam runner: processes, or threads for GIL-free work
    progress_unit: ClassVar[str] = "rows"
    progress_rows_known: ClassVar[bool] = True  # False: a shard's size is not counted in progress_unit
    # dvc.yaml outputs file by file, by section (outs, metrics, plots): file name or (name, options);
    # empty: each output directory is one DVC out
    dvc_files: ClassVar[dict[str, tuple]] = {}

    # -- declaration ---------------------------------------------------------------------------
    @classmethod
    def declared_keys(cls) -> tuple[str, ...]:
        return (*cls.content, *cls.layout, *cls.execution)

    @classmethod
    def code_files(cls) -> tuple[provenance.SourceFile, ...]:
        """The source files that determine this stage's artifacts (its module's import closure)."""
        return provenance.code_files(cls.__module__, sys.modules[cls.__module__].__file__)

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        """The input roles of this run (a stage may read an input only under some params)."""
        return self.inputs

    def external(self, ctx: Context) -> Any:
        """What this stage reads from outside the artifacts (the corpus files' content hash, a model
        directory's fingerprint); it enters the fingerprint and the Prefect cache key."""
        return None

    def kind(self, role: str) -> str:
        return paths.kind_of(role) or role.split("/")[0]

    # -- before any work -----------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        """Refuse inputs and params that cannot work, before anything is written."""

    def artifact_params(self, ctx: Context, role: str) -> dict:
        """The content params of output ``role`` (what its fingerprint hashes with inputs and code)."""
        return ctx.params.values(self.content)

    def artifact_inputs(self, ctx: Context, role: str) -> dict[str, Artifact]:
        """The inputs recorded in output ``role``'s manifest, by the names its consumers look up."""
        return {name: ctx.inputs[name] for name in self.input_roles(ctx)}

    # -- sharded work --------------------------------------------------------------------------
    def before_plan(self, ctx: Context, role: str, build: ArtifactBuild) -> None:
        """Work that must be complete before the plan is written (runs once; not again on resume)."""

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        raise NotImplementedError

    def create(self, ctx: Context, role: str, plan: ShardPlan) -> None:
        """Create the output's stores with their final shape (once; a resume opens and checks them)."""

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        """The worker for the pending outputs (``roles``: role -> uri)."""
        raise NotImplementedError

    def beside_workers(self, ctx: Context, role: str):
        """A callable the executor runs in a driver thread while the workers run, or None."""
        return None

    def finalize(self, ctx: Context, role: str, build: ArtifactBuild) -> Published:
        raise NotImplementedError

    # -- one unit of work ----------------------------------------------------------------------
    def run(self, ctx: Context, role: str, build: ArtifactBuild) -> Published:
        """Do the whole work of a stage that is not sharded (a step loop with its own checkpoints)."""
        raise NotImplementedError
