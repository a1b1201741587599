"""The one executor of every stage: open inputs, begin or resume each output, plan, run the shards as one
Beam pipeline (or the stage's single unit of work), report progress and worker errors, publish.

A stage only declares (``pipelines.stage``); this module is the only one that builds Beam pipelines,
begins ``ArtifactBuild``s and drives progress.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import apache_beam as beam

from memforge.pipelines import worker_errors
from memforge.pipelines.contracts import check_contracts
from memforge.pipelines.progress import ShardProgress
from memforge.pipelines.runner import pipeline, release
from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.storage import fs, paths
from memforge.storage.artifact import ArtifactBuild, open_artifact
from memforge.storage.errors import (
    WRITE_ERRNOS,
    DiskFullError,
    MemforgeError,
    StoreUnreachableError,
    WriteError,
    is_disk_full,
    is_out_of_memory,
    last_line,
    store_unreachable,
    write_fault,
)
from memforge.storage.intact import check_intact
from memforge.storage.lease import clear_abandoned
from memforge.storage.params import Params
from memforge.storage.params_view import ParamsView
from memforge.storage.provenance import SourceFile
from memforge.storage.shards import Shard, ShardMarkers, ShardPlan

log = logging.getLogger("memforge")
WORKERS_KEY = "runtime.num_workers"  # Beam workers of the local runner; declared by every sharded stage
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # the process that wrote a shard, in its marker (provenance)


def context(stage: Stage, params: Params, reads: set[str] | None = None) -> Context:
    """The stage's context: a params view of its declared keys and its input artifacts, opened."""
    ctx = Context(stage, ParamsView(params, stage.declared_keys(), stage.name, reads), params.artifacts_dir, {})
    for role in stage.input_roles(ctx):
        try:
            ctx.inputs[role] = check_intact(open_artifact(ctx.uri(role), paths.kind_of(role)), params.check_inputs)
        except MemforgeError as exc:
            raise type(exc)(f"{stage.name} reads {role}: {exc}") from None
    check_contracts(stage.name, ctx.inputs, params.artifacts_dir)
    return ctx


def run_stage(stage: Stage, params: Params, *, rebuild: bool | str = False, beam_args: Iterable[str] = (),
              reads: set[str] | None = None) -> str:
    """Run ``stage``: build what is missing or outdated, resume what was interrupted, skip what is up to
    date. Returns the location of its output (their parent when it writes several). ``reads`` collects
    the params keys the stage read."""
    beam_args = list(beam_args)
    if stage.launch is not None:
        from memforge.training import world

        if world.inside_launcher():
            return _run_as_rank(stage, params, rebuild, reads)
        plan = world.Launch.of(getattr(params, stage.launch))
        if plan.distributed:
            return _launch_ranks(stage, params, plan, rebuild, reads)
    ctx = context(stage, params, reads)
    stage.check(ctx)
    execution = {**ctx.params.values(stage.execution), **({"beam_args": beam_args} if beam_args else {})}
    builds = {}
    try:
        for role in stage.outputs:
            build = _begin(stage, ctx, role, rebuild, execution)
            if not build.up_to_date:
                builds[role] = build
        if stage.sharded and builds:
            _run_shards(stage, ctx, builds, beam_args)
        else:
            for role, build in builds.items():
                _publish(build, stage.run(ctx, role, build), None)
    except MemforgeError:
        raise
    except Exception as exc:
        if is_disk_full(exc) and builds:
            raise _disk_full(stage, builds, exc) from None
        if (fault := write_fault(exc)) is not None and builds:
            raise _write_refused(stage, builds, fault) from None
        if (cause := store_unreachable(exc)) is not None:
            where = ", ".join(build.uri for build in builds.values()) or fs.normalize(params.artifacts_dir)
            raise StoreUnreachableError(f"{where}: the object store stopped answering while {stage.name} ran "
                                        f"({cause}); nothing was published and finished shards are kept: rerun "
                                        "when it answers") from None
        if is_out_of_memory(exc):
            raise _out_of_memory(stage, exc) from None
        raise
    finally:
        for build in builds.values():  # a build that stopped gives up its lease; a rerun resumes it
            build.release()
    roles = stage.outputs
    return ctx.uri(roles[0]) if len(roles) == 1 else fs.join(params.artifacts_dir, roles[0].split("/")[0])


def _begin(stage: Stage, ctx: Context, role: str, rebuild: bool | str, execution: dict) -> ArtifactBuild:
    """Begin (or resume, or find up to date) the build of output ``role``."""
    build = ArtifactBuild.begin(ctx.uri(role), stage.kind(role), stage.artifact_params(ctx, role),
                                stage.artifact_inputs(ctx, role), fmt=stage.format, rebuild=rebuild,
                                code_files=stage.code_files(), execution=execution, root=ctx.artifacts_dir)
    if build.up_to_date:
        log.info("%s: %s is up to date (fingerprint %s)", stage.name, build.uri, build.fingerprint[:12])
    return build


def _launch_ranks(stage: Stage, params: Params, plan, rebuild: bool | str, reads: set[str] | None) -> str:
    """Check the stage here (bad input is refused before any process starts), then run it as the ranks of a
    torch.distributed job on this node; rank 0 builds and publishes the output."""
    from memforge.training import world

    ctx = context(stage, params, reads)
    stage.check(ctx)
    ctx.scratch.clear()  # what check loaded (a decoder) is the ranks' to load; free it before they start
    log.info("%s: %d rank(s) on this node, %d node(s)", stage.name, plan.nproc_per_node, plan.nnodes)
    dump = params.model_dump(mode="json")
    declaration = f"{type(stage).__module__}:{type(stage).__qualname__}"
    try:
        world.launch(run_rank, (declaration, dump, rebuild), plan, stage.name, dump)
    finally:  # a rank 0 of this node killed with the lease leaves it behind
        clear_abandoned(ctx.uri(stage.outputs[0]))
    return ctx.uri(stage.outputs[0])


def run_rank(declaration: str, params: dict, rebuild: bool | str) -> None:
    """One rank of a stage's torch.distributed job (the launcher's entry point); ``declaration``: the stage's
    ``module:Class``. Its log lines name the rank; the other ranks' progress is rank 0's to report."""
    module, name = declaration.split(":")
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s",
                        force=True)
    log.setLevel(logging.INFO)
    run_stage(getattr(importlib.import_module(module), name)(), Params.model_validate(params), rebuild=rebuild)


BEGUN, UP_TO_DATE, NOT_BEGUN = 0, 1, 2  # what rank 0 tells the other ranks after beginning the build


def _run_as_rank(stage: Stage, params: Params, rebuild: bool | str, reads: set[str] | None) -> str:
    """This process is one rank of the stage's job: every rank checks and trains; rank 0 alone begins the build
    (the lease), writes checkpoints and publishes; the others learn from it whether there is work."""
    from memforge.training import world

    role = stage.outputs[0]
    ctx = context(stage, params, reads)
    stage.check(ctx)
    group = ctx.scratch["world"] = world.join(getattr(params, stage.launch).device, f"{stage.launch}.device")
    if not group.writer:  # progress is rank 0's to report
        log.setLevel(logging.WARNING)
    build = None
    try:
        status = NOT_BEGUN
        if group.writer:
            try:
                build = _begin(stage, ctx, role, rebuild, ctx.params.values(stage.execution))
                status = UP_TO_DATE if build.up_to_date else BEGUN
            finally:
                group.broadcast_int(status)
        elif (status := group.broadcast_int(status)) == NOT_BEGUN:
            raise world.RankFailedError(f"{stage.name}: rank 0 could not begin {ctx.uri(role)} (its error says why)")
        if status == UP_TO_DATE:
            return ctx.uri(role)
        try:
            published = stage.run(ctx, role, build or RankBuild(ctx.uri(role)))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise _out_of_memory(stage, exc) from None
            raise
        if build is not None:
            _publish(build, published, None)
    finally:
        if build is not None:
            build.release()
        world.leave(group)
    return ctx.uri(role)


@dataclass(frozen=True)
class RankBuild:
    """What a rank other than 0 knows of the build: where it is (rank 0 holds it)."""

    uri: str


def _disk_full(stage: Stage, builds: dict[str, ArtifactBuild], exc: Exception) -> DiskFullError:
    """The named form of a write that found no space: which outputs, how much is free, what to do."""
    where = ", ".join(build.uri for build in builds.values())
    free = fs.free_space(next(iter(builds.values())).uri)
    cause = last_line(exc)
    return DiskFullError(f"{where}: no space left on its filesystem{f' ({free})' if free else ''} while {stage.name} "
                         f"wrote it ({cause}); free space or move artifacts_dir, then rerun: finished shards and "
                         "checkpoints are kept and nothing was published")


def _write_refused(stage: Stage, builds: dict[str, ArtifactBuild], fault: OSError) -> WriteError:
    """The named form of a write the operating system refused: the file, its cause and what to do."""
    where = ", ".join(build.uri for build in builds.values())
    name = errno.errorcode.get(fault.errno, str(fault.errno))
    return WriteError(f"{fault.filename or where}: {fault.strerror} ({name}) while {stage.name} built {where}: "
                      f"{WRITE_ERRNOS[fault.errno]}, then rerun: finished shards are kept and nothing was published")


def _out_of_memory(stage: Stage, exc: Exception) -> MemforgeError:
    """The named form of an allocation failure: which params size the stage's batches, and of which kind."""
    batch = [f"{key} ({'execution' if key in stage.execution else 'content: another artifact'})"
             for key in stage.declared_keys() if "batch" in key]
    return MemforgeError(f"{stage.name} ran out of memory ({last_line(exc)[:200]}); lower "
                         f"{', '.join(batch) or 'its workers'}, then rerun: finished shards and checkpoints are kept")


def _label(stage: Stage, role: str) -> str:
    return role.rsplit("/", 1)[-1] if len(stage.outputs) > 1 else role


def _plan_output(stage: Stage, ctx: Context, role: str, build: ArtifactBuild) -> tuple[ShardPlan, list[Shard]]:
    """The output's plan, written once with its layout; an interrupted build of another layout restarts."""
    layout = ctx.params.values(stage.layout)
    stored = build.stored_layout()
    if stored is None:
        stage.before_plan(ctx, role, build)
    plan = stage.plan(ctx, role)
    if stored is not None and stored != (plan, layout):
        log.info("%s: %s: the interrupted build was planned for another layout (%s); restarting it with %s",
                 stage.name, build.uri, stored[1], layout)
        build.restart()
        stage.before_plan(ctx, role, build)
    stage.create(ctx, role, plan)
    build.plan(plan, layout)
    pending = build.pending(plan)
    log.info("%s: %s: %d rows in %d shards; %d shards already done (skipped), %d to run", stage.name,
             _label(stage, role), plan.total_rows, len(plan.shards), len(plan.shards) - len(pending), len(pending))
    worker_errors.clear(build.uri)
    return plan, pending


def _run_shards(stage: Stage, ctx: Context, builds: dict[str, ArtifactBuild], beam_args: list[str]) -> None:
    pending = {role: _plan_output(stage, ctx, role, build)[1] for role, build in builds.items()}
    elements = [{"role": role, "uri": builds[role].uri, "shard": asdict(shard)}
                for role, shards in pending.items() for shard in shards]
    beside = [work for work in (stage.beside_workers(ctx, role) for role in builds) if work is not None]
    runner = None
    with _in_threads(beside):
        if elements:
            worker = stage.worker(ctx, {role: build.uri for role, build in builds.items() if pending[role]})
            beam_pipeline, runner = pipeline(beam_args, ctx.params.value(WORKERS_KEY), stage.running_mode)
            started = time.perf_counter()
            with contextlib.ExitStack() as progress:
                for role, shards in pending.items():
                    progress.enter_context(ShardProgress(f"{stage.name} {_label(stage, role)}", builds[role].uri,
                                                         shards, unit=stage.progress_unit,
                                                         total=None if stage.progress_rows_known else 0))
                try:
                    with beam_pipeline as p:
                        (p | "shards" >> beam.Create(elements) | beam.Reshuffle()
                           | stage.name >> beam.ParDo(RunShard(worker)))
                finally:
                    release(runner)
            log.info("%s: %d shards in %.1f s on %s", stage.name, len(elements), time.perf_counter() - started,
                     runner)
    for build in builds.values():
        worker_errors.raise_reported(build.uri)
    for role, build in builds.items():
        _publish(build, stage.finalize(ctx, role, build), runner)


@contextlib.contextmanager
def _in_threads(work: list[Callable[[], None]]):
    """Run ``work`` in driver threads for the duration of the block; re-raise their first error."""
    errors: list[BaseException] = []

    def guarded(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,), daemon=True) for job in work]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _publish(build: ArtifactBuild, published: Published, runner: str | None) -> None:
    build.publish(counts=published.counts, arrays=published.arrays, stats=published.stats, beam_runner=runner,
                  hashed=published.hashed)
    log.info("%s: published %s", build.kind, build.uri)


class RunShard(beam.DoFn):
    """One Beam element = one shard of one output: skip it when already done, else let the stage's worker
    write it, then mark it done. Bad input and refused writes are reported (named, not retried), never raised."""

    def __init__(self, worker: ShardWorker):
        self.worker = worker

    def setup(self) -> None:
        with _short_store_errors():
            self.worker.setup()
        self.markers: dict[str, ShardMarkers] = {}

    def teardown(self) -> None:
        self.worker.teardown()

    def process(self, element: dict):
        with _short_store_errors():
            uri, shard = element["uri"], Shard(**element["shard"])
            markers = self.markers.setdefault(uri, ShardMarkers(uri))
            if markers.is_done(shard):  # a retried bundle: the shard is already durable
                return
            started = time.perf_counter()
            try:
                files, stats = self.worker.process(element["role"], uri, shard)
            except MemforgeError as exc:
                worker_errors.report(uri, shard, exc)
                return
            except OSError as exc:  # a refused write is reported like bad input; other errors are Beam's to handle
                if (fault := write_fault(exc)) is None:
                    raise
                try:
                    worker_errors.report(uri, shard, fault)
                except OSError:  # the report cannot be written either: Beam passes the fault's text to the driver
                    raise fault from None
                return
            markers.mark_done(shard, files, {"rows": shard.rows, **stats, "seconds": time.perf_counter() - started,
                                             "worker": WORKER})
            yield f"{element['role']}/{shard.name}"


@contextlib.contextmanager
def _short_store_errors():
    """An object store that stops answering in a worker is raised as one short ConnectionError with the
    client's message (no report can be written there): Beam passes its text on and the driver names it."""
    try:
        yield
    except MemforgeError:
        raise
    except Exception as exc:
        if (cause := store_unreachable(exc)) is None:
            raise
        raise ConnectionError(cause) from None


def derive(uri: str, kind: str, params: dict, inputs: dict, fmt: str, rebuild: bool | str,
           code_files: tuple[SourceFile, ...], plan: ShardPlan, layout: dict, create: Callable[[], None],
           write: Callable[[Shard], dict[str, str]], finalize: Callable[[], Published],
           root: str | None = None) -> bool:
    """Build an artifact derived in this process from another one, shard by shard with markers (resumable),
    in the given plan and layout; False when an identical one is already published."""
    build = ArtifactBuild.begin(uri, kind, params, inputs, fmt=fmt, rebuild=rebuild, code_files=code_files,
                                root=root)
    if build.up_to_date:
        return False
    try:
        create()
        for shard in build.pending(build.plan(plan, layout)):
            build.markers.mark_done(shard, write(shard), {"rows": shard.rows})
        _publish(build, finalize(), None)
    finally:
        build.release()
    return True
