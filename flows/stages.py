"""The stage registry: the one list of stages that the CLI, DVC and Prefect all call."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from storage.errors import MemforgeError
from storage.params import Params


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: CLI name, what it does, where its artifacts go, its implementation."""

    name: str
    summary: str
    outputs: tuple[str, ...]
    entry: str

    def function(self) -> Callable[..., Any]:
        module, _, attribute = self.entry.partition(":")
        return getattr(importlib.import_module(module), attribute)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "read and tokenize the corpus into the token store (Beam)", ("tokens",),
          "pipelines.prepare:prepare"),
    Stage("train-decoder", "train the decoder LM from scratch or fine-tune a local HF model", ("decoder",),
          "training.decoder:train_decoder"),
    Stage("encode", "hidden-state keys and next-token values for each split (Beam)",
          ("keys/train", "keys/validation"), "pipelines.encode:encode"),
    Stage("index", "train the FAISS index once, then add key shards in parallel (Beam)", ("index",),
          "pipelines.index:index"),
    Stage("targets", "kNN neighbours and distillation distributions for each split (Beam)",
          ("targets/train", "targets/validation"), "pipelines.targets:targets"),
    Stage("train-memory", "train the MLP memory on the kNN targets", ("memory",), "training.memory:train_memory"),
    Stage("evaluate", "perplexity and tokens/s of decoder, kNN-LM and decoder+memory", ("eval",),
          "training.evaluate:evaluate"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise MemforgeError(f"unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})") from None


def select(first: str | None = None, last: str | None = None) -> list[Stage]:
    """Stages from ``first`` to ``last`` inclusive, in pipeline order."""
    start = STAGE_NAMES.index(stage(first).name) if first else 0
    stop = STAGE_NAMES.index(stage(last).name) if last else len(STAGES) - 1
    if start > stop:
        raise MemforgeError(f"--from {first} comes after --until {last}")
    return list(STAGES[start:stop + 1])


def run_stage(name: str, params: Params, *, rebuild: bool = False, beam_args: tuple[str, ...] = ()) -> Any:
    """Run one stage with resolved params (the same call for CLI, DVC and Prefect)."""
    return stage(name).function()(params, rebuild=rebuild, beam_args=list(beam_args))
