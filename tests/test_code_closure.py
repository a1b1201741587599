"""A stage declared in a user's own package is fingerprinted by its whole import closure there as well as in
memforge, with paths relative to each package's folder (read from the sources, nothing imported)."""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from memforge.flows.dvc_yaml import render
from memforge.storage.provenance import code_files, source_digest

from user_package import CLOSURE, STAGE, edit_kernel, write_package

pytestmark = pytest.mark.unit


def _closure(root: Path):
    return code_files(STAGE, str(root / "mylab" / "stages" / "scale.py"))


def test_a_user_stage_covers_its_package_and_the_modules_beside_it_that_it_imports(tmp_path):
    root = write_package(tmp_path)
    files = _closure(root)
    assert [file.name for file in files if file.root == root] == CLOSURE
    memforge = {file.name for file in files if file.root != root}
    assert "storage/fs.py" in memforge and "pipelines/stage.py" not in memforge  # how a stage runs: not in it
    assert all(file.path.is_file() for file in files)


def test_editing_the_kernel_changes_the_digest_and_moving_the_package_does_not(tmp_path):
    first = write_package(tmp_path / "first")
    moved = tmp_path / "elsewhere" / "lib"
    shutil.copytree(first, moved)
    assert [file.name for file in _closure(moved)] == [file.name for file in _closure(first)]
    assert source_digest(_closure(moved)) == source_digest(_closure(first))

    (moved / "notes.py").write_text("import mylab  # edited\n")  # beside the package, imported by nothing
    (moved / "mylab" / "unused.py").write_text("import os\n")
    assert source_digest(_closure(moved)) == source_digest(_closure(first))
    edit_kernel(moved)
    assert source_digest(_closure(moved)) != source_digest(_closure(first))


def test_a_package_in_site_packages_covers_only_itself():
    """Beside an installed package lie other distributions: its closure stays inside its own package."""
    import s3fs.core  # imports fsspec, aiobotocore, botocore, installed beside it

    site = Path(s3fs.__file__).resolve().parents[1]
    files = code_files("s3fs.core", s3fs.core.__file__)
    assert "s3fs/core.py" in [file.name for file in files]
    assert all(file.root == site and file.name.startswith("s3fs/") for file in files), files


@pytest.fixture
def user_stage(tmp_path, monkeypatch):
    """The user's stage class, imported from its package under ``tmp_path/project/src``."""
    monkeypatch.syspath_prepend(str(write_package(tmp_path / "project" / "src")))
    yield importlib.import_module(STAGE).Scale
    for name in [name for name in sys.modules if name.split(".")[0] in ("mylab", "helpers")]:
        del sys.modules[name]


def test_dvc_yaml_lists_a_user_stage_files_relative_to_the_project(user_stage, tmp_path):
    project = tmp_path / "project"
    deps = yaml.safe_load(render([user_stage()], project))["stages"]["scale"]["deps"]
    assert [dep for dep in deps if not Path(dep).is_absolute()] == [f"src/{name}" for name in CLOSURE]
    assert all((project / dep).is_file() for dep in deps)  # memforge's, outside the project: absolute

    outside = yaml.safe_load(render([user_stage()], tmp_path / "other"))["stages"]["scale"]["deps"]
    assert all(Path(dep).is_absolute() and Path(dep).is_file() for dep in outside)
