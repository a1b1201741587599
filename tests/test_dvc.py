"""`dvc repro` of the project in a temporary git clone with tiny params: the whole chain, then only
what a changed param reaches; `dvc push`/`dvc pull` through an S3 remote (the loopback S3 server), as the
README describes; lineage reads dvc.lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memforge.flows.dvc_yaml import render
from memforge.flows.stages import all_stages

from chain import write_project
from working_tree import copy_working_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = all_stages()


def _import_root(checkout: Path) -> Path:
    """A folder beside ``checkout`` holding ``memforge/`` as a wheel lays it out, made of links to the
    checkout's folders: with it on PYTHONPATH, ``memforge`` runs the checkout's code, edits included."""
    root = checkout.parent / f"{checkout.name}-import"
    if not root.exists():
        package = root / "memforge"
        package.mkdir(parents=True)
        for entry in (checkout / "memforge").iterdir():
            (package / entry.name).symlink_to(entry)
        for name in ("storage", "pipelines", "training", "flows", "bench"):
            (package / name).symlink_to(checkout / name)
    return root


def _run(cwd: Path, *command: str, **extra_env: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra_env}
    if (cwd / "memforge").is_dir() and "PYTHONPATH" not in extra_env:
        env["PYTHONPATH"] = str(_import_root(cwd))
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


def _git(cwd: Path, *args: str) -> str:
    return _run(cwd, "git", "-c", "user.email=ci@memforge", "-c", "user.name=ci", *args)


def test_dvc_yaml_is_generated_from_the_stage_declarations():
    assert (REPO / "dvc.yaml").read_text() == render(all_stages(), REPO), "run `memforge dvc-yaml` and commit dvc.yaml"
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [item.name for item in STAGES]
    for item in STAGES:
        stage = dvc[item.name]
        assert stage["cmd"] == f"memforge {item.name} --replace-outdated"
        assert stage["params"] == ["artifacts_dir", *item.content]
        assert not set(stage["params"]) & set(item.execution + item.layout)
        top_dirs = list(dict.fromkeys("${artifacts_dir}/" + role.split("/")[0] for role in item.inputs))
        code = [file.name for file in item.code_files()]
        assert stage["deps"] == code + top_dirs
        assert all((REPO / dep).is_file() for dep in code)
        outs = [next(iter(out)) for out in stage["outs"]]
        if item.name == "evaluate":
            assert all(out.startswith("${artifacts_dir}/eval/") for out in outs)
        else:
            assert outs == list(dict.fromkeys("${artifacts_dir}/" + p.split("/")[0] for p in item.outputs))
        assert all(next(iter(out.values()))["persist"] for out in stage["outs"])


def _copy_working_tree(target: Path) -> None:
    """The working tree as a new git repository."""
    copy_working_tree(target)
    _git(target, "init", "-q")
    _git(target, "add", "-A")
    _git(target, "commit", "-q", "-m", "working tree")


def _changed_stages(status: str) -> set[str]:
    return {item.name for item in STAGES if f"{item.name}:" in status.split()}


def test_dvc_repro_reruns_what_a_param_reaches_and_push_pull_restores(tmp_path, s3_server):
    import s3fs

    clone, copy = tmp_path / "clone", tmp_path / "copy"
    s3fs.S3FileSystem(use_listings_cache=False).mkdir("memforge-dvc")
    _copy_working_tree(clone)
    params_file = write_project(clone)

    first = _run(clone, "dvc", "repro")
    for item in STAGES:
        assert f"Running stage '{item.name}'" in first
    assert "train-memory" in _run(clone, "dvc", "dag")
    assert "Data and pipelines are up to date" in _run(clone, "dvc", "status")

    # Execution params (workers, threads, batch sizes) and layout params (chunk sizes) change no artifact.
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["encode"].update(batch_size=4, chunk_rows=32)
    params.setdefault("runtime", {}).update(num_workers=1, threads_per_worker=2)
    params["index"]["threads"] = 2
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Data and pipelines are up to date" in _run(clone, "dvc", "status")
    params_file.write_text(original)

    # Code: each edit reaches the stages whose import closure holds the module (the rest follow through
    # their inputs' content, below).
    for module, reached in (("pipelines/corpus.py", {"prepare"}), ("pipelines/knn_rows.py", {"targets"}),
                            ("pipelines/executor.py", set())):
        source = (clone / module).read_text()
        (clone / module).write_text(source + "\n# an edit\n")
        assert _changed_stages(_run(clone, "dvc", "status")) == reached, module
        (clone / module).write_text(source)

    # A changed param outdates the stage that declares it and, through their inputs, those after it.
    params = yaml.safe_load(original)
    params["targets"]["temperature"] = 2.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert _changed_stages(_run(clone, "dvc", "status")) == {"targets"}
    params_file.write_text(original)

    def published() -> dict[str, str]:
        return {name: json.loads((clone / "artifacts" / name / "_manifest.json").read_text())["fingerprint"]
                for name in ("tokens", "decoder", "keys/train", "index", "targets/train", "memory", "eval", "export")}

    # A change to the targets kernel (here: distributions at twice the temperature) rebuilds targets; then
    # train-memory is out of date, its input holding other data (DVC reruns it, and after it evaluate and
    # export: not repeated here); the stages before it stay as they were.
    before = published()
    kernel = clone / "pipelines" / "knn_rows.py"
    original_kernel = kernel.read_text()
    line = "scale = np.float32(-temperature)"
    assert line in original_kernel
    kernel.write_text(original_kernel.replace(line, "scale = np.float32(-2 * temperature)"))
    changed = _run(clone, "dvc", "repro", "targets")
    assert [item.name for item in STAGES if f"Running stage '{item.name}'" in changed] == ["targets"]
    assert _changed_stages(_run(clone, "dvc", "status")) == {"train-memory"}
    after = published()
    assert {name for name in before if before[name] != after[name]} == {"targets/train"}
    lineage = _run(clone, "memforge", "lineage", "artifacts/targets/train")
    assert "dvc: stage targets (artifacts/targets): outputs match dvc.lock" in lineage

    _run(clone, "dvc", "remote", "add", "-d", "store", "s3://memforge-dvc/store")
    _run(clone, "dvc", "remote", "modify", "store", "endpointurl", s3_server)
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

    # A stage declared as one class in a test file joins the generated dvc.yaml and runs there.
    toy = {"MEMFORGE_STAGES": "test_declared_stage:TokenCounts",
           "PYTHONPATH": f"{_import_root(clone)}{os.pathsep}{clone / 'tests'}"}
    _run(clone, "memforge", "dvc-yaml", **toy)
    assert "token-counts" in yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    third = _run(clone, "dvc", "repro", "token-counts", **toy)
    assert "Running stage 'token-counts'" in third
    assert [item.name for item in STAGES if f"Running stage '{item.name}'" in third] == []
    assert "OK" in _run(clone, "memforge", "verify", "artifacts/token-counts", **toy)
