"""`dvc repro` of the project in a temporary git clone with tiny params: the whole chain, then only
what a changed param reaches; `dvc push`/`dvc pull` through a local remote; lineage reads dvc.lock."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from chain import write_project
from flows.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(cwd: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


def _git(cwd: Path, *args: str) -> str:
    return _run(cwd, "git", "-c", "user.email=ci@memforge", "-c", "user.name=ci", *args)


def test_dvc_yaml_mirrors_the_stage_registry():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [item.name for item in STAGES]
    for item in STAGES:
        stage = dvc[item.name]
        assert stage["cmd"] == f"memforge {item.name} --replace-outdated"
        assert stage["params"] == list(item.params)
        top_dirs = list(dict.fromkeys("${artifacts_dir}/" + path.split("/")[0] for path in item.inputs))
        assert stage["deps"] == list(item.code) + top_dirs
        outs = [next(iter(out)) for out in stage["outs"]]
        if item.name == "evaluate":
            assert all(out.startswith("${artifacts_dir}/eval/") for out in outs)
        else:
            assert outs == list(dict.fromkeys("${artifacts_dir}/" + p.split("/")[0] for p in item.outputs))
        assert all(next(iter(out.values()))["persist"] for out in stage["outs"])


def test_dvc_repro_reruns_what_a_param_reaches_and_push_pull_restores(tmp_path):
    clone, copy, remote = tmp_path / "clone", tmp_path / "copy", tmp_path / "remote"
    _git(tmp_path, "clone", "-q", str(REPO), str(clone))
    params_file = write_project(clone)

    first = _run(clone, "dvc", "repro")
    for item in STAGES:
        assert f"Running stage '{item.name}'" in first
    assert "train-memory" in _run(clone, "dvc", "dag")
    assert "Data and pipelines are up to date" in _run(clone, "dvc", "status")

    params = yaml.safe_load(params_file.read_text())
    params["targets"]["temperature"] = 2.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(clone, "dvc", "status")
    assert "targets:" in status and "prepare:" not in status and "index:" not in status
    second = _run(clone, "dvc", "repro")
    rerun = [item.name for item in STAGES if f"Running stage '{item.name}'" in second]
    assert rerun == ["targets", "train-memory", "evaluate"]
    for name in ("prepare", "train-decoder", "encode", "index"):
        assert f"Stage '{name}' didn't change, skipping" in second

    lineage = _run(clone, "memforge", "lineage", "artifacts/targets/train")
    assert "dvc: stage targets (artifacts/targets): outputs match dvc.lock" in lineage
    assert "temperature=2.0" in lineage

    _run(clone, "dvc", "remote", "add", "-d", "store", str(remote))
    _run(clone, "dvc", "push")
    _git(clone, "add", "dvc.lock", "params.yaml", ".dvc/config")
    _git(clone, "commit", "-q", "-m", "tiny demo")
    _git(tmp_path, "clone", "-q", str(clone), str(copy))
    _run(copy, "dvc", "pull")
    originals = sorted(p.relative_to(clone) for p in (clone / "artifacts").rglob("*") if p.is_file())
    assert len(originals) > 50
    for rel in originals:
        assert (copy / rel).read_bytes() == (clone / rel).read_bytes(), rel
    assert "OK" in _run(copy, "memforge", "verify", "artifacts/targets/train")
