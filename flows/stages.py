"""The stage registry: the one list of stages that the CLI, DVC and Prefect all call."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from storage import provenance
from storage.errors import MemforgeError
from storage.params import Params


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: CLI name, what it does, its implementation, and what it reads and writes.

    ``outputs`` and ``inputs`` are artifact paths under ``artifacts_dir``; ``params`` are the dotted
    params keys the stage reads; ``code`` the source packages it runs. DVC's stage (dvc.yaml) and
    Prefect's cache key are both derived from these, so the three never disagree.
    """

    name: str
    summary: str
    outputs: tuple[str, ...]
    entry: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    code: tuple[str, ...]
    external: str | None = None  # function(params) -> description of inputs from outside the artifacts

    def function(self) -> Callable[..., Any]:
        return _load(self.entry)

    def external_inputs(self, params: Params) -> Any:
        """What this stage reads from outside the artifacts (prepare: the corpus files), or None."""
        return _load(self.external)(params) if self.external else None


def _load(entry: str) -> Callable[..., Any]:
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


# Code packages per stage: the same ones that determine its artifacts' fingerprints.
_PIPELINES, _TRAINING = provenance.PIPELINE_PACKAGES, provenance.CONTENT_PACKAGES
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "read and tokenize the corpus into the token store (Beam)", ("tokens",),
          "pipelines.prepare:prepare", (),
          ("artifacts_dir", "corpus", "decoder.init", "decoder.vocab_size", "encode.model",
           "encode.trust_remote_code", "encode.chunk_rows", "encode.shard_chunks", "encode.num_workers"), _PIPELINES,
          external="pipelines.prepare:corpus_sources"),
    Stage("train-decoder", "train the decoder LM from scratch or fine-tune a local HF model", ("decoder",),
          "training.decoder:train_decoder", ("tokens",), ("artifacts_dir", "decoder"), _TRAINING),
    Stage("encode", "hidden-state keys and next-token values for each split (Beam)",
          ("keys/train", "keys/validation"), "pipelines.encode:encode", ("tokens", "decoder"),
          ("artifacts_dir", "encode"), _PIPELINES),
    Stage("index", "train the FAISS index once, then add key shards in parallel (Beam)", ("index",),
          "pipelines.index:index", ("keys/train", "keys/validation"),
          ("artifacts_dir", "index", "encode.num_workers", "encode.threads_per_worker"), _PIPELINES),
    Stage("targets", "kNN neighbours and distillation distributions for each split (Beam)",
          ("targets/train", "targets/validation"), "pipelines.targets:targets",
          ("keys/train", "keys/validation", "index"),
          ("artifacts_dir", "targets", "index.nprobe", "encode.chunk_rows", "encode.num_workers",
           "encode.threads_per_worker"), _PIPELINES),
    Stage("train-memory", "train the MLP memory on the kNN targets", ("memory",), "training.memory:train_memory",
          ("decoder", "keys/train", "targets/train"),
          ("artifacts_dir", "memory", "encode.model", "encode.representation", "encode.batch_size",
           "encode.trust_remote_code"), _TRAINING),
    Stage("evaluate", "perplexity and tokens/s of decoder, kNN-LM and decoder+memory", ("eval",),
          "training.evaluate:evaluate", ("tokens", "decoder", "keys/validation", "index", "memory"),
          ("artifacts_dir", "evaluate", "index.threads", "encode.trust_remote_code"), _TRAINING),
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


def run_stage(name: str, params: Params, *, rebuild: bool | str = False, beam_args: tuple[str, ...] = ()) -> Any:
    """Run one stage with resolved params (the same call for CLI, DVC and Prefect)."""
    return stage(name).function()(params, rebuild=rebuild, beam_args=list(beam_args))
