"""The stage registry, derived from the stage declarations: the CLI subcommands, the Prefect tasks and
their cache keys, and dvc.yaml are all generated from it.

The built-in stages come in pipeline order; ``MEMFORGE_STAGES`` (comma-separated ``module:Class``)
appends stages declared elsewhere, e.g. a project's own stage written as one class.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from memforge.pipelines.stage import Stage
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params

BUILTIN = ("memforge.pipelines.prepare:Prepare", "memforge.training.decoder_stage:TrainDecoder",
           "memforge.pipelines.encode:Encode", "memforge.pipelines.index:Index", "memforge.pipelines.targets:Targets",
           "memforge.training.memory_stage:TrainMemory", "memforge.training.evaluate_stage:Evaluate",
           "memforge.training.export_stage:Export")
EXTRA_STAGES_ENV = "MEMFORGE_STAGES"
_LOADED: dict[str, Stage] = {}


def _load(entry: str) -> Stage:
    if entry not in _LOADED:
        module, _, name = entry.partition(":")
        try:
            declared = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise MemforgeError(f"{EXTRA_STAGES_ENV}: cannot load stage {entry!r}: {exc}") from None
        if not (isinstance(declared, type) and issubclass(declared, Stage)):
            raise MemforgeError(f"{EXTRA_STAGES_ENV}: {entry!r} is not a Stage class")
        _LOADED[entry] = declared()
    return _LOADED[entry]


def all_stages() -> tuple[Stage, ...]:
    """Every stage in pipeline order: the built-in ones, then those ``MEMFORGE_STAGES`` names."""
    extra = [e.strip() for e in os.environ.get(EXTRA_STAGES_ENV, "").split(",") if e.strip()]
    found = tuple(_load(entry) for entry in (*BUILTIN, *extra))
    names = [item.name for item in found]
    if len(set(names)) != len(names):
        raise MemforgeError(f"{EXTRA_STAGES_ENV}: stage names must be unique, got {names}")
    return found


def stage_names() -> tuple[str, ...]:
    return tuple(item.name for item in all_stages())


def stage(name: str) -> Stage:
    for item in all_stages():
        if item.name == name:
            return item
    raise MemforgeError(f"unknown stage {name!r} (stages: {', '.join(stage_names())})")


def select(first: str | None = None, last: str | None = None) -> list[Stage]:
    """Stages from ``first`` to ``last`` inclusive, in pipeline order."""
    names = stage_names()
    start = names.index(stage(first).name) if first else 0
    stop = names.index(stage(last).name) if last else len(names) - 1
    if start > stop:
        raise MemforgeError(f"--from {first} comes after --until {last}")
    return list(all_stages()[start:stop + 1])


def run_stage(name: str, params: Params, *, rebuild: bool | str = False, beam_args: tuple[str, ...] = (),
              reads: set[str] | None = None) -> Any:
    """Run one stage with resolved params (the same call for CLI, DVC and Prefect)."""
    from memforge.pipelines import executor

    return executor.run_stage(stage(name), params, rebuild=rebuild, beam_args=beam_args, reads=reads)
