"""lm-evaluation-harness in ``evaluate``: the tasks that ``evaluate.lm_eval_tasks`` names, scored with lm-eval's
``simple_evaluate`` in this process, ``HFLM`` wrapping each model instance (no remote code, nothing reloaded).

lm-eval is the optional ``eval`` extra: this module imports it only when tasks are named.
"""
from __future__ import annotations

import difflib
import hashlib
from importlib import metadata
from pathlib import Path

from memforge.storage.errors import MemforgeError
from memforge.storage.extras import require

TASKS_KEY, INCLUDE_KEY = "evaluate.lm_eval_tasks", "evaluate.lm_eval_include_path"
MIXED_PRECISION = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # evaluate.precision -> HFLM's autocast


def include_digest(path: str) -> str:
    """sha256 over the files under the local task directory ``path`` (relative name + content, in name order):
    its task YAMLs and documents define metrics as much as the task names do."""
    root = _include_dir(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index (its own tasks, and those under ``include_path``) after checking that it knows every
    name in ``tasks``; lm-eval not installed and an unknown name are errors naming the params key."""
    require("lm_eval", "eval", TASKS_KEY)
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        _include_dir(include_path)  # lm-eval would skip a missing one without a word
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):  # indexing lm-eval's ~15 k own tasks takes seconds: only if needed
            return local
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = difflib.get_close_matches(task, known, n=3)
            where = f"lm-eval {metadata.version('lm_eval')}'s tasks" + (f" or {include_path}" if include_path else "")
            raise MemforgeError(f"{TASKS_KEY}: no task {task!r} in {where}"
                                + (f"; did you mean {', '.join(near)}?" if near else "")
                                + " (`lm-eval ls tasks` lists them)")
    return manager


def score(model, tokenizer, manager, tasks: list[str], limit: int | None, batch_size: int,
          precision: str) -> dict:
    """``simple_evaluate`` of ``model`` (a causal LM instance on its device) on ``tasks``: ``{"metrics": {task:
    {metric: value}}, "samples": {task: documents scored}}`` (groups have metrics, no samples; a metric under a
    filter other than none is named ``metric,filter``). No bootstrap: standard errors are left out."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              mixed_precision_dtype=MIXED_PRECISION[precision])
    results = simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=False)
    return {"metrics": {name: _metrics(entry) for name, entry in results["results"].items()},
            "samples": {name: counts["effective"] for name, counts in results.get("n-samples", {}).items()}}


def side_by_side(scores: dict[str, dict]) -> dict:
    """``{"version": lm-eval's, "tasks": {task: {"samples": n, model: {metric: value}, ...}}}`` from each named
    model's ``score`` (the same tasks and documents)."""
    first = next(iter(scores.values()))
    tasks = {task: {**({"samples": first["samples"][task]} if task in first["samples"] else {}),
                    **{model: scored["metrics"][task] for model, scored in scores.items()}}
             for task in first["metrics"]}
    return {"version": metadata.version("lm_eval"), "tasks": tasks}


def _include_dir(path: str) -> Path:
    if not Path(path).is_dir():
        raise MemforgeError(f"{INCLUDE_KEY}: {path} is not a directory (lm-eval reads local task YAMLs from one)")
    return Path(path)


def _metrics(entry: dict) -> dict:
    """The metric values of one lm-eval result entry: ``"acc,none": 0.5`` -> ``"acc": 0.5``."""
    out = {}
    for key, value in entry.items():
        metric, comma, filter_name = key.partition(",")
        if comma and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            out[metric if filter_name == "none" else key] = value
    return out
