"""Prefect flows: ``memforge-build`` (the whole chain) and one flow per stage.

Each stage is one Prefect task that calls the same stage function as the CLI and DVC
(``flows.stages.run_stage``) and returns the paths and fingerprints of what it published,
never arrays. Its cache key (``stage_cache_key``) hashes what determines its output, as its
declaration says: its content params (never execution or layout params: more workers or another
runner finish as ``Cached``), the content digests of its input artifacts, its external inputs
(prepare: a hash of the corpus files' names and content) and the digest of its code files; results
persist as JSON. So a rerun on unchanged inputs, scheduled or after a failure, finishes every stage
as ``Cached``, a changed param reruns that stage and what reads its output, and a stage interrupted
mid-way resumes from its shard markers. Transient errors are retried with exponential backoff (``flow`` params);
bad input (``MemforgeError``) never is, unless it may pass (``TransientError``: an object store that stopped
answering).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# Prefect's logger also carries memforge's own log lines (stage progress, Beam worker threads) to the
# flow run's log; it must be set before prefect configures logging on import.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "memforge")
# Machines running memforge are often offline; the temporary server would log a telemetry error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server gets 20 s to start by default; a busy machine (builds, another server) needs more.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, runtime, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from memforge.flows import stages  # noqa: E402
from memforge.flows.result_guard import trusted_cache_key  # noqa: E402
from memforge.pipelines.stage import Context, Stage  # noqa: E402
from memforge.storage import fs, paths, provenance  # noqa: E402
from memforge.storage.artifact import REBUILD_OUTDATED, read_manifest  # noqa: E402
from memforge.storage.errors import ArtifactError, MemforgeError, TransientError  # noqa: E402
from memforge.storage.lineage import scalar_pairs  # noqa: E402
from memforge.storage.params import Params, load_params  # noqa: E402
from memforge.storage.params_view import ParamsView  # noqa: E402

BUILD_FLOW = "memforge-build"


def published(params: Params, roles: tuple[str, ...], field: str = "fingerprint") -> dict[str, str | None]:
    """``field`` (fingerprint, content_digest) of the artifact of each role; None where nothing is published."""
    found: dict[str, str | None] = {}
    for role in roles:
        try:
            found[role] = read_manifest(paths.artifact_uri(params.artifacts_dir, role))[field]
        except ArtifactError:
            found[role] = None
    return found


def _declaration_context(item: Stage, params: Params) -> Context:
    """A context for the stage's declaration-level questions (input roles, external inputs); no input opened."""
    return Context(item, ParamsView(params, item.declared_keys(), item.name), params.artifacts_dir, {})


def stage_cache_key(_context, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: its content params, input manifests' fingerprints, external
    inputs, code digest and where the artifacts live (see module doc)."""
    item = stages.stage(parameters["stage"])
    params = Params.model_validate(parameters["params"])
    ctx = _declaration_context(item, params)
    payload = {
        "stage": item.name,
        "artifacts": fs.normalize(params.artifacts_dir),
        "params": {key: params.value(key) for key in item.content},
        "inputs": published(params, item.input_roles(ctx), "content_digest"),
        "external": item.external(ctx),
        "code": provenance.source_digest(item.code_files()),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return trusted_cache_key(f"memforge-{item.name}-{digest[:40]}")


def _transient(_task, _task_run, state) -> bool:
    """Retry unless the stage refused bad input (params, artifacts, data): those fail the same way again; an
    object store that stopped answering may be back."""
    return not isinstance(state.data, MemforgeError) or isinstance(state.data, TransientError)


def _markdown(item: Stage, params: Params) -> str:
    """The Prefect artifact of one stage: each output's path, fingerprint, counts, figures, key params."""
    lines = [f"### memforge {item.name}", "",
             "| artifact | fingerprint | counts | figures |", "|---|---|---|---|"]
    for role in item.outputs:
        uri = paths.artifact_uri(params.artifacts_dir, role)
        manifest = read_manifest(uri)
        lines.append(f"| `{uri}` | `{manifest['fingerprint'][:16]}` | "
                     f"{scalar_pairs(manifest.get('counts', {})) or '-'} | "
                     f"{scalar_pairs(manifest.get('stats', {})) or '-'} |")
    lines += ["", "params: " + (scalar_pairs({key: params.value(key) for key in item.content}) or "-"),
              "execution: " + (scalar_pairs({key: params.value(key) for key in item.execution}) or "-")]
    return "\n".join(lines)


@task(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json",
      retry_condition_fn=_transient)
def stage_task(stage: str, params: dict, upstream: dict[str, str | None], rebuild: bool | str,
               beam_args: list[str]) -> dict:
    """Run one stage; returns its outputs' fingerprints. ``upstream``: its inputs' fingerprints."""
    item = stages.stage(stage)
    resolved = Params.model_validate(params)
    logger = get_run_logger()
    if rebuild is True and runtime.task_run.run_count > 1:
        rebuild = REBUILD_OUTDATED  # a retry resumes what the first attempt rebuilt
    logger.info("%s: inputs %s", stage, {k: (v or "-")[:12] for k, v in upstream.items()} or "-")
    try:
        stages.run_stage(stage, resolved, rebuild=rebuild, beam_args=tuple(beam_args))
    except MemforgeError as exc:
        raise MemforgeError(f"stage {stage}: {exc}") from exc
    outputs = published(resolved, item.outputs)
    create_markdown_artifact(markdown=_markdown(item, resolved), key=f"memforge-{stage}",
                             description=f"memforge {stage}: what it published")
    logger.info("%s: published %s", stage, {k: (v or "-")[:12] for k, v in outputs.items()})
    return {"stage": stage, "outputs": outputs}


def run_stage_task(item: Stage, params: Params, upstream: dict[str, str | None], rebuild: bool,
                   beam_args: list[str]) -> tuple[dict[str, str | None], str]:
    """Submit one stage task; refresh its cache when its outputs are missing or were replaced since.
    Returns its outputs' fingerprints and the task's final state name (Completed, Cached)."""
    options = {"name": item.name, "task_run_name": item.name, "retries": params.flow.retries,
               "retry_delay_seconds": exponential_backoff(params.flow.retry_delay_s)}
    current = published(params, item.outputs)
    refresh = rebuild or None in current.values()
    arguments = (item.name, params.model_dump(mode="json"),
                 {role: upstream.get(role) for role in item.input_roles(_declaration_context(item, params))},
                 True if rebuild else REBUILD_OUTDATED, list(beam_args))
    state = stage_task.with_options(**options, refresh_cache=refresh)(*arguments, return_state=True)
    result = state.result()
    if result["outputs"] != published(params, item.outputs):  # a cached record of artifacts replaced since
        state = stage_task.with_options(**options, refresh_cache=True)(*arguments, return_state=True)
        result = state.result()
    get_run_logger().info("stage %s: %s", item.name, state.name)
    return result["outputs"], state.name


def run_chain(params_file: str | None, overrides: list[str] | None, first: str | None, last: str | None,
              rebuild: bool, beam_args: list[str] | None) -> dict:
    """The body of the build flow and of the per-stage flows: the selected stages in order."""
    params = load_params(params_file, list(overrides or []))
    logger = get_run_logger()
    selected = stages.select(first, last)
    outputs: dict[str, str | None] = {}
    states: dict[str, str] = {}
    for item in selected:
        if item.name == "train-decoder" and params.encode.model and len(selected) > 1:
            logger.info("train-decoder: skipped, encode.model %s is the decoder", params.encode.model)
            states[item.name] = "Skipped"
            continue
        found, states[item.name] = run_stage_task(item, params, outputs, rebuild, list(beam_args or []))
        outputs.update(found)
    metrics = fs.join(paths.artifact_uri(params.artifacts_dir, "eval"), "metrics.json")
    return {"artifacts_dir": fs.normalize(params.artifacts_dir), "stages": states, "fingerprints": outputs,
            "metrics": metrics if fs.exists(metrics) else None}


@flow(name=BUILD_FLOW, description="memforge: prepare -> (train-decoder) -> encode -> index -> targets -> "
                                    "train-memory -> evaluate -> export")
def build(params_file: str | None = None, overrides: list[str] | None = None, first: str | None = None,
          last: str | None = None, rebuild: bool = False, beam_args: list[str] | None = None) -> dict:
    """The whole chain (or ``first``..``last``): prepare, train-decoder when the decoder encodes, encode,
    index, targets, then memory training, evaluation and the export of decoder + memory. Finished stages come
    from the cache."""
    return run_chain(params_file, overrides, first, last, rebuild, beam_args)


def _stage_flow(name: str):
    @flow(name=f"memforge-{name}", description=stages.stage(name).summary)
    def stage_flow(params_file: str | None = None, overrides: list[str] | None = None, rebuild: bool = False,
                   beam_args: list[str] | None = None) -> dict:
        return run_chain(params_file, overrides, name, name, rebuild, beam_args)
    return stage_flow


STAGE_FLOWS = {item.name: _stage_flow(item.name) for item in stages.all_stages()}
