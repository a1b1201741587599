"""Stages as declarations: each reads exactly the params it declares; execution and layout params never
outdate an artifact; an artifact's code is its stage's import closure, not whole packages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memforge.flows.cli import main
from memforge.flows.stages import all_stages, run_stage, stage
from memforge.storage.params import load_params
from memforge.storage.params_view import UndeclaredParamError

from chain import overrides, stage_args

pytestmark = pytest.mark.stage

REPO = Path(__file__).resolve().parent.parent
EXECUTION_CHANGE = {"runtime.num_workers": 1, "runtime.threads_per_worker": 2, "index.threads": 2,
                    "encode.batch_size": 4, "memory.checkpoint_every": 7, "decoder.checkpoint_every": 9,
                    "evaluate.batch_size": 2}


def linked(chain, art: Path, names=("tokens", "decoder", "keys", "index", "targets", "memory")) -> Path:
    art.mkdir()
    for name in names:
        (art / name).symlink_to(chain["art"] / name)
    return art


def test_every_stage_reads_exactly_the_params_it_declares(chain, tmp_path):
    """The chain fixture ran every stage up to train-memory through a recording params view; evaluate, export
    and online train-memory (which reads the decoder's batch size) run here the same way."""
    reads = {name: set(keys) for name, keys in chain["reads"].items()}
    params = load_params(chain["root"] / "params.yaml", overrides(chain["args"]))
    art = linked(chain, tmp_path / "art")
    for name in ("evaluate", "export"):
        reads[name] = set()
        run_stage(name, params.model_copy(update={"artifacts_dir": str(art)}), reads=reads[name])
    online = load_params(chain["root"] / "params.yaml",
                         overrides(stage_args(chain["root"], tmp_path / "online", **{
                             "memory.mode": "online", "memory.max_steps": 3})))
    linked(chain, tmp_path / "online", names=("tokens", "decoder", "keys", "targets"))
    run_stage("train-memory", online, reads=reads["train-memory"])
    for item in all_stages():
        declared = set(item.declared_keys())
        assert reads[item.name] <= declared, (item.name, reads[item.name] - declared)
        assert declared <= reads[item.name], f"{item.name} declares keys it never reads: {declared - reads[item.name]}"
        assert len(declared) == len(item.declared_keys()), f"{item.name} declares a key twice"


def test_reading_an_undeclared_key_fails_at_once(chain, tmp_path, monkeypatch):
    art = linked(chain, tmp_path / "art", names=("keys",))
    params = load_params(chain["root"] / "params.yaml", overrides(chain["args"]))
    index = stage("index")
    monkeypatch.setattr(type(index), "execution", ("index.device", "runtime.num_workers", "runtime.threads_per_worker"))
    with pytest.raises(UndeclaredParamError, match="stage index read params key 'index.threads'"):
        run_stage("index", params.model_copy(update={"artifacts_dir": str(art)}))


def fingerprints(art: Path) -> dict[str, str]:
    return {str(m.parent.relative_to(art)): json.loads(m.read_text())["fingerprint"]
            for m in sorted(art.glob("**/_manifest.json"))}


def test_execution_and_layout_params_leave_every_artifact_up_to_date(chain, tmp_path, caplog):
    art = chain["art"]
    before = fingerprints(art)
    changed = [*chain["args"], *[arg for key, value in EXECUTION_CHANGE.items() for arg in ("--set", f"{key}={value}")],
               "--set", "encode.chunk_rows=32", "--set", "encode.shard_chunks=4", "--set", "targets.shard_chunks=2",
               "--set", "corpus.shard_bytes=1000"]
    with caplog.at_level("INFO", logger="memforge"):
        for name in ("prepare", "train-decoder", "encode", "index", "targets", "train-memory"):
            caplog.clear()
            assert main([name, *changed]) == 0, name
            assert "is up to date" in caplog.text, name
            assert "published" not in caplog.text, name
    assert fingerprints(art) == before


# In one process: each stage's code digest, then again after each edit in turn (appending a comment to the
# module) -- the edits change no imports, so the stages' import closures stay as first resolved.
_DIGESTS_AFTER_EDITS = """
import json, sys
from pathlib import Path
from memforge.flows.stages import all_stages
from memforge.storage.provenance import source_digest

def digests():
    return {s.name: source_digest(s.code_files()) for s in all_stages()}

found = [digests()]
for module in sys.argv[1:]:
    path = Path(module)
    path.write_text(path.read_text() + "\\n# an edit\\n")
    found.append(digests())
print(json.dumps(found))
"""


def _digests(root: Path, *edits: str) -> list[dict[str, str]]:
    """Each stage's code digest as computed from the sources under ``root`` (the folder that holds the
    subpackages, imported as ``memforge``): first as they are, then after each of ``edits`` (module paths
    under ``root``, edited in that order)."""
    done = subprocess.run([sys.executable, "-c", _DIGESTS_AFTER_EDITS, *edits], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_code_digest_covers_the_stage_import_closure(tmp_path):
    """On a scratch copy of the sources: each edit reaches exactly the stages that import the module
    (train-memory and evaluate follow a targets change through their inputs' content, see test_dvc)."""
    scratch = tmp_path / "memforge"  # laid out as an installed wheel is
    for package in ("memforge", "storage", "pipelines", "training", "flows"):
        shutil.copytree(REPO / package, scratch if package == "memforge" else scratch / package,
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    reaches = {"pipelines/corpus.py": {"prepare"},                 # only prepare imports it
               "pipelines/knn.py": {"targets"},                     # the targets kernel
               "pipelines/neighbour_lists.py": {"index", "targets", "evaluate"},
               "storage/zarr_rows.py": {item.name for item in all_stages()},
               "pipelines/executor.py": set(),                      # how stages run, never what
               "storage/params.py": set()}                          # they write
    found = _digests(scratch, *reaches)
    assert found[0] == _digests(REPO)[0]
    for (module, reached), before, after in zip(reaches.items(), found, found[1:]):
        assert {name for name in before if before[name] != after[name]} == reached, module


def test_listing_the_stages_imports_no_torch():
    """The CLI, lineage, verify and dvc-yaml load every declaration: none may pull in torch or transformers."""
    script = ("import sys; from memforge.flows.stages import all_stages; from memforge.flows.cli import build_parser; "
              "all_stages(); build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_each_param_has_one_kind_and_params_yaml_marks_it():
    kinds: dict[str, set[str]] = {}
    for item in all_stages():
        for kind in ("content", "layout", "execution"):
            for key in getattr(item, kind):
                kinds.setdefault(key, set()).add(kind)
    assert {key: found for key, found in kinds.items() if len(found) > 1} == {}
    marked, section = {}, None
    for line in (REPO / "params.yaml").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        elif line.startswith("  ") and not line.lstrip().startswith("#"):
            key = f"{section}.{line.split(':')[0].strip()}"
            comment = line.split("#", 1)[1] if "#" in line else ""
            marked[key] = next((kind for kind in ("layout", "execution") if f"[{kind}]" in comment), "content")
    for key, found in kinds.items():
        assert marked[key] == next(iter(found)), key
