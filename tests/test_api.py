"""The public API, used only through ``import memforge``, on the artifacts of the tiny demo chain."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import memforge

from chain import overrides

pytestmark = pytest.mark.stage


@pytest.fixture(scope="module")
def targets(chain):
    return memforge.read_targets(str(chain["art"] / "targets" / "train"))


def test_open_artifact_reads_manifest_lineage_and_verify(chain, tmp_path):
    art = memforge.open_artifact(str(chain["art"] / "targets" / "train"), kind="targets")
    assert art.kind == "targets" and len(art.fingerprint) == 64
    assert art.params["k"] == 8 and art.manifest["counts"]["rows"] > 0
    assert art.inputs["queries"] == str(chain["art"] / "keys" / "train")
    tree = art.lineage()
    kinds = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        assert "error" not in node and "stale_input" not in node, node.get("uri")
        kinds.add(node["kind"])
        todo.extend(node["inputs"])
    assert kinds == {"targets", "keys", "index", "tokens", "decoder"}
    assert art.verify() == [] and memforge.verify(art.uri) == []

    copy = tmp_path / "train"
    shutil.copytree(art.uri, copy)
    part = next(p for p in sorted((copy / "distributions.zarr" / "probs").rglob("*")) if p.is_file()
                and p.stat().st_size > 16)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    problems = memforge.open_artifact(str(copy)).verify()
    assert problems and any(part.name in problem for problem in problems)


def test_bad_paths_and_kinds_are_named(chain, tmp_path):
    with pytest.raises(memforge.MemforgeError, match="no artifact here"):
        memforge.open_artifact(str(tmp_path / "nothing"))
    with pytest.raises(memforge.MemforgeError, match="'keys' artifact, expected 'targets'"):
        memforge.read_targets(str(chain["art"] / "keys" / "train"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "_build.json").write_text("{}")
    with pytest.raises(memforge.MemforgeError, match="not published"):
        memforge.read_keys(str(tmp_path / "half"))


def test_keys_as_numpy_and_arrow(chain):
    keys = memforge.read_keys(str(chain["art"] / "keys" / "train"))
    rows = keys.artifact.manifest["counts"]["rows"]
    assert len(keys) == rows and keys.dim == 48
    table = keys.to_arrow(10, 30)
    assert table.column_names == ["row", "key", "value"] and table.num_rows == 20
    assert table["row"].to_pylist() == list(range(10, 30))
    stored = np.stack(table["key"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(stored, keys.keys(10, 30))
    np.testing.assert_array_equal(table["value"].to_numpy(), keys.values(10, 30))
    picked_keys, picked_values = keys.take([29, 10, 10])
    np.testing.assert_array_equal(picked_keys, keys.keys(10, 30)[[19, 0, 0]].astype(np.float32))
    np.testing.assert_array_equal(picked_values, keys.values(10, 30)[[19, 0, 0]])


def test_targets_as_numpy_and_arrow(targets):
    arrays = targets.to_numpy()
    assert arrays["tokens"].shape == (len(targets), targets.width) == arrays["probs"].shape
    # each row's stored probabilities and the remainder make one distribution over the next token
    np.testing.assert_allclose(arrays["probs"].sum(axis=1) + arrays["remainder"], 1.0, atol=1e-5)
    assert ((arrays["tokens"] >= 0) == (arrays["probs"] > 0)).all()
    np.testing.assert_array_equal(arrays["next_token"], targets.queries.values())

    table = targets.to_arrow(5, 105)
    assert table.column_names == ["row", "tokens", "probs", "remainder", "key", "next_token"]
    for i, (tokens, probs) in enumerate(zip(table["tokens"].to_pylist(), table["probs"].to_pylist())):
        stored = arrays["tokens"][5 + i]
        assert tokens == stored[stored >= 0].tolist()
        np.testing.assert_allclose(probs, arrays["probs"][5 + i][: len(tokens)])
    assert targets.to_arrow(with_queries=False).column_names == ["row", "tokens", "probs", "remainder"]


def test_targets_as_hugging_face_dataset(targets):
    hf = targets.to_hf(0, 50)
    assert hf.num_rows == 50 and hf[7]["row"] == 7
    assert hf[7]["tokens"] == targets.to_arrow(7, 8)["tokens"].to_pylist()[0]


def test_targets_as_torch_datasets(targets):
    arrays = targets.to_numpy()
    dataset = targets.dataset()
    assert len(dataset) == len(targets)
    sample = dataset[17]
    assert sample["row"].item() == 17 and sample["tokens"].dtype == torch.int64
    np.testing.assert_array_equal(sample["tokens"].numpy(), arrays["tokens"][17])
    np.testing.assert_allclose(sample["key"].numpy(), arrays["key"][17].astype(np.float32))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True,
                                                  generator=torch.Generator().manual_seed(0))))
    assert batch["tokens"].shape == (32, targets.width) and batch["key"].shape == (32, 48)
    np.testing.assert_array_equal(batch["next_token"].numpy(), arrays["next_token"][batch["row"].numpy()])
    with pytest.raises(IndexError, match="rows must lie in"):
        dataset[len(targets)]

    # Two DataLoader workers over the shuffled iterable: every row exactly once, whole rows intact.
    iterable = targets.iterable(shuffle=True, seed=3)
    seen = []
    # spawned workers: a fresh interpreter each, whatever the test process has started (servers, clusters)
    for batch in torch.utils.data.DataLoader(iterable, batch_size=100, num_workers=2, multiprocessing_context="spawn"):
        rows = batch["row"].numpy()
        np.testing.assert_allclose(batch["probs"].numpy(), arrays["probs"][rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(targets))) and seen != sorted(seen)


def test_run_stage_with_overrides_is_the_cli_call(chain):
    """The chain's index is up to date: run_stage with the chain's params says so and returns what is there;
    a content override it does not declare changes nothing, one it declares is refused without rebuild."""
    params = memforge.load_params(chain["root"] / "params.yaml",
                                  overrides(chain["args"]))
    before = memforge.open_artifact(str(chain["art"] / "index")).fingerprint
    memforge.run_stage("index", params, overrides=["runtime.num_workers=1"],
                       beam_args=["--direct_running_mode=in_memory"])
    assert memforge.open_artifact(str(chain["art"] / "index")).fingerprint == before
    with pytest.raises(memforge.MemforgeError, match="rebuild"):
        memforge.run_stage("index", params, overrides=["index.seed=5"], beam_args=["--direct_running_mode=in_memory"])
    with pytest.raises(memforge.MemforgeError, match="index.nosuchkey"):
        memforge.run_stage("index", params, overrides=["index.nosuchkey=1"])



def test_run_is_the_build_flow(chain):
    """memforge.run runs the Prefect build flow over the selected stages; the chain's index is up to date."""
    before = memforge.open_artifact(str(chain["art"] / "index")).fingerprint
    result = memforge.run(chain["root"] / "params.yaml", overrides=overrides(chain["args"]), first="index",
                          last="index", beam_args=["--direct_running_mode=in_memory"])
    assert list(result["stages"]) == ["index"] and result["artifacts_dir"] == str(chain["art"])
    assert memforge.open_artifact(str(chain["art"] / "index")).fingerprint == before
