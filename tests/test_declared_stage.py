"""A stage declared as one class in this file runs through the CLI, Prefect and the generated dvc.yaml
(see test_dvc.py) with no other file edited: ``MEMFORGE_STAGES`` names it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.shards import Shard, ShardPlan
from memforge.storage.stores import PartOffsets, TokenStore
from memforge.storage.verify import verify

from crash import MEMFORGE
from user_package import CLOSURE, STAGE_ENTRY, edit_kernel, write_package

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent
ENTRY = "test_declared_stage:TokenCounts"


class CountShard(ShardWorker):
    """Token counts of one shard of the train stream, written as one JSON file."""

    def __init__(self, tokens_uri: str, parts: list, vocab_size: int):
        self.tokens_uri, self.parts, self.vocab_size = tokens_uri, parts, vocab_size

    def setup(self) -> None:
        self.reader, self.offsets = TokenStore(self.tokens_uri, "train"), PartOffsets.from_json(self.parts)

    def process(self, role: str, uri: str, shard: Shard):
        tokens = self.reader.read_rows(self.offsets, shard.start, shard.stop)
        counts = np.bincount(tokens, minlength=self.vocab_size).tolist()
        name = f"counts-{shard.name}.json"
        fs.write_json_atomic(fs.join(uri, name), counts)
        return {name: fs.file_checksum(fs.join(uri, name))}, {"distinct": int(np.count_nonzero(counts))}


class TokenCounts(Stage):
    """How often each token occurs in the train split, counted in parallel shards."""

    name = "token-counts"
    summary = "count the train split's tokens (a stage declared in a test file)"
    outputs = ("token-counts",)
    inputs = ("tokens",)
    content = ("decoder.vocab_size",)
    layout = ("encode.chunk_rows",)
    execution = ("runtime.num_workers",)
    sharded = True

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        return ShardPlan.even(ctx.inputs["tokens"].manifest["counts"]["train_tokens"], ctx.params.encode.chunk_rows)

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        tokens = ctx.inputs["tokens"]
        return CountShard(tokens.uri, tokens.manifest["stats"]["splits"]["train"]["parts"],
                          max(ctx.params.decoder.vocab_size, tokens.manifest["counts"]["vocab_size"]))

    def finalize(self, ctx: Context, role: str, build) -> Published:
        plan = ShardPlan.even(ctx.inputs["tokens"].manifest["counts"]["train_tokens"], ctx.params.encode.chunk_rows)
        total = np.sum([fs.read_json(fs.join(build.uri, f"counts-{s.name}.json")) for s in plan.shards], axis=0)
        return Published(counts={"rows": int(total.sum()), "distinct_tokens": int(np.count_nonzero(total))})


def _env(tmp_path) -> dict:
    return {**os.environ, "MEMFORGE_STAGES": ENTRY, "PREFECT_HOME": str(tmp_path / "prefect"),
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_a_stage_declared_in_a_test_file_runs_through_the_cli_and_prefect(chain, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "tokens").symlink_to(chain["art"] / "tokens")
    args = [*chain["args"], "--set", f"artifacts_dir={art}"]
    env = _env(tmp_path)

    listed = subprocess.run([MEMFORGE, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "token-counts" in listed.stdout
    done = subprocess.run([MEMFORGE, "token-counts", *args, "--", "--direct_running_mode=in_memory"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    artifact = open_artifact(str(art / "token-counts"), "token-counts")
    assert artifact.manifest["counts"]["rows"] == open_artifact(str(art / "tokens")).manifest["counts"]["train_tokens"]
    assert artifact.params == {"decoder.vocab_size": 320}
    assert artifact.manifest["execution"] == {"runtime.num_workers": 2,
                                              "beam_args": ["--direct_running_mode=in_memory"]}
    # its code: memforge's modules, this file and the modules beside it that it imports
    assert [name for name in artifact.manifest["code"]["source_files"] if "/" not in name] == [
        "crash.py", "test_declared_stage.py", "user_package.py"]
    assert verify(artifact.uri) == []

    # Prefect: the build flow runs it as a task of its own, then finds it cached.
    flow = [MEMFORGE, "run", "--from", "token-counts", "--until", "token-counts", *args, "--",
            "--direct_running_mode=in_memory"]
    for expected in ("Completed", "Cached"):
        run = subprocess.run(flow, capture_output=True, text=True, env=env, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"memforge run: token-counts: {expected}" in run.stdout, run.stdout
    assert json.loads((art / "token-counts" / "_manifest.json").read_text())["fingerprint"] == artifact.fingerprint


def test_a_stage_of_a_user_package_is_outdated_by_an_edit_of_its_kernel(tmp_path):
    package, art = write_package(tmp_path / "src"), tmp_path / "art"
    env = {**os.environ, "MEMFORGE_STAGES": STAGE_ENTRY,
           "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}

    def scale(*args: str) -> tuple[str, dict, list]:
        done = subprocess.run([MEMFORGE, "scale", "--set", f"artifacts_dir={art}", *args], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr, *(json.loads((art / "scaled" / name).read_text()) for name in ("_manifest.json",
                                                                                           "values.json"))

    _, manifest, values = scale()
    assert values == [2, 4, 6]
    assert [name for name in manifest["code"]["source_files"] if name in CLOSURE] == CLOSURE

    edit_kernel(package)
    refused = subprocess.run([MEMFORGE, "scale", "--set", f"artifacts_dir={art}"], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=120)
    assert refused.returncode == 1 and "a different scaled artifact is published here" in refused.stderr, \
        refused.stderr[-3000:]
    log, rebuilt, values = scale("--replace-outdated")
    assert "replacing the outdated scaled artifact" in log
    assert values == [3, 6, 9] and rebuilt["fingerprint"] != manifest["fingerprint"]
