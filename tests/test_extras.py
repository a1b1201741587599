"""A missing optional dependency is named with the extra that installs it."""
from __future__ import annotations

import importlib
import sys

import pytest

import memforge

pytestmark = pytest.mark.unit


def _without(monkeypatch, *names):
    """Imports of ``names`` fail from here on, as when their distributions are not installed (None in
    ``sys.modules`` stops ``import`` and ``importlib`` alike), and fsspec forgets filesystem classes it loaded."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    loaded = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is its read-only view
    for protocol, implementation in list(loaded.items()):
        if implementation.__module__.split(".")[0] in names:
            monkeypatch.delitem(loaded, protocol)


def test_an_s3_url_without_s3fs_names_the_s3_extra(monkeypatch):
    _without(monkeypatch, "s3fs")
    expected = r"s3://bucket/art/keys\S*: no filesystem for s3:// URLs.*pip install 'memforge-mlp\[s3\]'"
    with pytest.raises(memforge.MemforgeError, match=expected):
        memforge.open_artifact("s3://bucket/art/keys")


def test_the_dask_runner_without_distributed_names_the_dask_extra(tmp_path, monkeypatch):
    _without(monkeypatch, "distributed")
    with pytest.raises(memforge.MemforgeError, match=r"--runner=dask needs 'distributed'.*memforge-mlp\[dask\]"):
        memforge.run_stage("prepare", overrides=[f"artifacts_dir={tmp_path}"], beam_args=["--runner=dask"])


def test_targets_to_hf_without_datasets_names_the_hf_extra(monkeypatch):
    from memforge.storage.extras import require

    _without(monkeypatch, "datasets")
    with pytest.raises(memforge.MemforgeError, match=r"Targets.to_hf needs 'datasets'.*memforge-mlp\[hf\]"):
        require("datasets", "hf", "Targets.to_hf")
