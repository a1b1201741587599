"""A copied or moved artifacts directory works on its own: manifests name their inputs relative to
themselves, so nothing in the copy reads the original's files."""
from __future__ import annotations

import json
import shutil

import pytest

from memforge.flows.cli import main
from memforge.flows.stages import run_stage
from memforge.storage.artifact import open_artifact
from memforge.storage.params import load_params
from memforge.storage.verify import verify

from chain import overrides, stage_args

pytestmark = pytest.mark.stage

STAGES = ("tokens", "decoder", "keys/train", "keys/validation", "index", "targets/train", "targets/validation",
          "memory")


def test_a_copied_artifacts_dir_reads_only_its_own_files(chain, tmp_path, capsys):
    original, copy = chain["art"], tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    hidden = original.with_name("art.hidden")
    original.rename(hidden)  # the copy must not reach back into the original
    try:
        for role in STAGES:
            assert verify(str(copy / role)) == [], role
            for record in open_artifact(str(copy / role)).manifest["inputs"]:
                assert not record["uri"].startswith("/"), (role, record)
        capsys.readouterr()
        assert main(["lineage", str(copy / "memory"), "--json"]) == 0
        tree = json.loads(capsys.readouterr().out)
        nodes, uris = [tree], []
        while nodes:
            node = nodes.pop()
            assert "error" not in node and "stale_input" not in node, node
            uris.append(node["uri"])
            nodes += node["inputs"]
        assert all(uri.startswith(str(copy)) for uri in uris) and len(uris) >= 5
        assert main(["explain", str(copy / "targets" / "validation"), "--row", "3"]) == 0
        assert "query context" in capsys.readouterr().out
        out = copy / "targets" / "validation-T2"
        assert main(["retemper", str(copy / "targets" / "validation"), "--temperature", "2", "--out", str(out)]) == 0
        assert verify(str(out)) == [] and main(["lineage", str(out)]) == 0
        # Every stage of the copy is up to date there: fingerprints depend on content, not location.
        params = load_params(chain["root"] / "params.yaml",
                             overrides(stage_args(chain["root"], copy)))
        published = {role: open_artifact(str(copy / role)).manifest["run"] for role in STAGES}
        for stage in ("prepare", "encode", "index", "targets", "train-memory"):
            run_stage(stage, params, beam_args=("--direct_running_mode=in_memory",))
        assert {role: open_artifact(str(copy / role)).manifest["run"] for role in STAGES} == published
    finally:
        hidden.rename(original)
