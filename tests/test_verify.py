"""``verify`` and ``memforge verify`` on real artifacts: sound ones pass, each kind of damage is named."""
from __future__ import annotations

import json
import os
from pathlib import Path
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memforge.flows.cli import main
from memforge.pipelines import datastore_rows
from memforge.storage import fs
from memforge.storage.artifact import ArtifactBuild, open_artifact
from memforge.storage.errors import ArtifactError
from memforge.storage.intact import check_intact
from memforge.storage.shards import ShardPlan, load_plan
from memforge.storage.stores import DistributionStore, KeyStore, NeighbourStore, TokenStore
from memforge.storage.verify import verify

from chain import reseal, write_object_npy

pytestmark = pytest.mark.unit

VOCAB = 500
N = 48          # rows of every store; 16-row storage units -> 3 shards
WIDTH = 5       # distribution entries per row
K = 4           # neighbours per row


def build_keys(uri: str) -> str:
    """A sound, published float16 key store (3 shards) at ``uri``."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((N, 8), dtype=np.float32)
    vals = rng.integers(0, VOCAB, N, dtype=np.int32)
    build = ArtifactBuild.begin(uri, "keys", {"which": "keys"})
    store = KeyStore.create(build.uri, N, 8, chunk_rows=8, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    for shard in build.pending(plan):
        build.markers.mark_done(shard, store.write_shard(shard, keys[shard.start:shard.stop],
                                                         vals[shard.start:shard.stop]))
    build.publish(counts={"rows": N, "vocab_size": VOCAB}, arrays=store.rows.describe())
    return uri


def build_targets(uri: str, short_row: int | None = None, self_row: int | None = None) -> str:
    """A published distributions + neighbours artifact at ``uri`` (self-query, datastore = the rows themselves).

    ``short_row``: that row's probabilities sum to 0.7 with truncated 0. ``self_row``: that row lists
    itself among its neighbours. Both are written through the normal writers, so checksums are valid.
    """
    rng = np.random.default_rng(1)
    tokens = np.stack([rng.permutation(VOCAB)[:WIDTH] for _ in range(N)]).astype(np.int32)
    truncated = rng.uniform(0.05, 0.25, N)
    weights = -np.sort(-rng.random((N, WIDTH)), axis=1)
    probs = weights / weights.sum(axis=1, keepdims=True) * (1 - truncated)[:, None]
    if short_row is not None:
        probs[short_row] = weights[short_row] / weights[short_row].sum() * 0.7
        truncated[short_row] = 0.0
    probs, truncated = probs.astype(np.float32), truncated.astype(np.float32)

    ids = np.stack([rng.permutation(np.delete(np.arange(N), i))[:K] for i in range(N)]).astype(np.int64)
    if self_row is not None:
        ids[self_row, 2] = self_row
    dists = np.sort(rng.random((N, K), dtype=np.float32), axis=1)

    build = ArtifactBuild.begin(uri, "targets", {"k": K, "width": WIDTH})
    dist = DistributionStore.create(build.uri, N, WIDTH, chunk_rows=8, shard_chunks=2)
    neigh = NeighbourStore.create(build.uri, N, K, chunk_rows=8, shard_chunks=2)
    plan = build.plan(dist.rows.plan())
    assert plan == neigh.rows.plan()
    for s in build.pending(plan):
        files = dist.write_shard(s, tokens[s.start:s.stop], probs[s.start:s.stop], truncated[s.start:s.stop])
        files.update(neigh.write_shard(s, ids[s.start:s.stop], dists[s.start:s.stop]))
        build.markers.mark_done(s, files)
    build.publish(counts={"rows": N, "vocab_size": VOCAB, "datastore_rows": N},
                  arrays={**dist.rows.describe(), **neigh.rows.describe()}, stats={"self_query": True})
    return uri


def build_tokens(uri: str) -> str:
    """A sound, published token store of 3 Parquet parts at ``uri``."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, N, dtype=np.int32)
    docs = np.repeat(np.arange(4, dtype=np.int64), N // 4)
    build = ArtifactBuild.begin(uri, "tokens", {"which": "tokens"})
    store = TokenStore(build.uri)
    plan = build.plan(ShardPlan.even(N, 20))
    for s in build.pending(plan):
        build.markers.mark_done(s, store.write_shard(s, tokens[s.start:s.stop], docs[s.start:s.stop]))
    build.publish(counts={"rows": N, "vocab_size": VOCAB})
    return uri


def build_index(uri: str) -> str:
    """A published artifact holding the datastore rows an index holds (``values.npy``, ``keys.npy``), written by
    the index stage's own writer from a key store built beside it."""
    keys_uri = build_keys(uri + "-keys")
    build = ArtifactBuild.begin(uri, "index", {"which": "index"}, {"keys": open_artifact(keys_uri, "keys")})
    hashed = datastore_rows.write(KeyStore.open(keys_uri), load_plan(keys_uri), build.uri, exact_keys=True)
    build.publish(counts={"rows": N, "datastore_rows": N}, hashed=hashed)
    return uri


BUILDERS = {"index": build_index, "keys": build_keys, "targets": build_targets, "tokens": build_tokens}


def assert_cli_reports(uri: str, capsys, *expected: str) -> None:
    """``memforge verify uri`` exits 1 and prints each ``expected`` fragment on a PROBLEM line."""
    capsys.readouterr()
    assert main(["verify", uri]) == 1
    out = capsys.readouterr().out
    problem_lines = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    assert problem_lines
    for fragment in expected:
        assert any(fragment in line for line in problem_lines), (fragment, out)
    assert "problem(s)" in out


def edit_json(path: Path, edit) -> None:
    """Apply ``edit`` to the JSON document at ``path``."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def flip_byte(path: str) -> None:
    """Invert one byte in the middle of the file at ``path``."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(size // 2)
        byte = handle.read(1)
        handle.seek(size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))


# -- sound artifacts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("where", ["local", "memory"])
def test_sound_artifact_verifies(kind, where, tmp_path, capsys):
    uri = str(tmp_path / kind) if where == "local" else f"memory://v-{uuid4().hex}/{kind}"
    try:
        BUILDERS[kind](uri)
        assert open_artifact(uri, kind).manifest["shards"]["count"] == (0 if kind == "index" else 3)
        assert verify(uri) == []
        capsys.readouterr()
        assert main(["verify", uri]) == 0
        assert capsys.readouterr().out.strip().endswith(": OK")
    finally:
        if where == "memory":
            fs.remove_tree(uri)
            fs.remove_tree(uri + "-keys")


# -- damaged files ----------------------------------------------------------------------------------------


def test_flipped_byte_in_zarr_shard_file(tmp_path, capsys):
    uri = build_keys(str(tmp_path / "keys"))
    flip_byte(os.path.join(uri, "datastore.zarr/keys/c/0/0"))
    problems = verify(uri)
    assert problems[0] == "datastore.zarr/keys/c/0/0: checksum mismatch (content changed since publish)"
    assert problems[-1] == "content checks skipped until the problems above are fixed"
    assert len(problems) == 2  # the other shard files are still fine
    assert_cli_reports(uri, capsys, "datastore.zarr/keys/c/0/0: checksum mismatch")


def test_flipped_byte_in_targets_artifact_names_only_that_file(tmp_path, capsys):
    uri = build_targets(str(tmp_path / "targets"))
    flip_byte(os.path.join(uri, "neighbours.zarr/dists/c/2/0"))
    problems = verify(uri)
    assert [p for p in problems if "checksum" in p] == [
        "neighbours.zarr/dists/c/2/0: checksum mismatch (content changed since publish)"]
    assert_cli_reports(uri, capsys, "neighbours.zarr/dists/c/2/0")


def test_truncated_parquet_part(tmp_path, capsys):
    uri = build_tokens(str(tmp_path / "tokens"))
    part = os.path.join(uri, "parts/part-00000.parquet")
    size = os.path.getsize(part)
    with open(part, "r+b") as handle:
        handle.truncate(size // 2)
    problems = verify(uri)
    assert "parts/part-00000.parquet: checksum mismatch (content changed since publish)" in problems
    assert not any("part-00001" in p or "part-00002" in p for p in problems)
    assert_cli_reports(uri, capsys, "parts/part-00000.parquet")
    # Read directly, the damaged part names itself rather than failing inside pyarrow.
    with pytest.raises(ArtifactError, match=r"part-00000\.parquet: unreadable Parquet part"):
        TokenStore(open_artifact(uri, "tokens").uri).read_shard(load_plan(uri).shards[0])


def test_missing_part_file(tmp_path, capsys):
    uri = build_tokens(str(tmp_path / "tokens"))
    os.remove(os.path.join(uri, "parts/part-00002.parquet"))
    assert "parts/part-00002.parquet: missing (recorded in manifest)" in verify(uri)
    assert_cli_reports(uri, capsys, "parts/part-00002.parquet: missing")


def test_unexpected_file(tmp_path, capsys):
    uri = build_keys(str(tmp_path / "keys"))
    with open(os.path.join(uri, "datastore.zarr/stray.bin"), "wb") as handle:
        handle.write(b"x")
    assert "datastore.zarr/stray.bin: unexpected file (not in manifest)" in verify(uri)
    assert_cli_reports(uri, capsys, "datastore.zarr/stray.bin")


def test_missing_shard_marker(tmp_path, capsys):
    uri = build_keys(str(tmp_path / "keys"))
    os.remove(os.path.join(uri, "_shards/00001.json"))
    problems = verify(uri)
    assert problems[0] == "_shards/00001.json: missing completion marker for shard 00001 (rows 16..32)"
    assert not any("checksum" in p for p in problems)
    assert_cli_reports(uri, capsys, "_shards/00001.json", "shard 00001")


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["params"].update(seed=99), "does not match its params, inputs and code"),
    (lambda m: m["files"].update({"datastore.zarr/zarr.json": "0" * 64}), "content_digest does not match"),
])
def test_hand_edited_manifest(tmp_path, capsys, edit, problem):
    """A manifest whose params (or file list) were edited by hand no longer matches its own fingerprint."""
    uri = build_keys(str(tmp_path / "keys"))
    manifest = json.loads(Path(uri, "_manifest.json").read_text())
    edit(manifest)
    Path(uri, "_manifest.json").write_text(json.dumps(manifest))
    assert any(problem in p for p in verify(uri)), verify(uri)
    assert_cli_reports(uri, capsys, "_manifest.json")


# -- typed files: each header against the manifest, object dtypes refused (checksums re-sealed) ------------


def test_manifest_records_every_typed_files_header(tmp_path):
    index = open_artifact(build_index(str(tmp_path / "index"))).manifest
    assert index["headers"] == {"keys.npy": {"dtype": "float16", "shape": [N, 8], "fortran_order": False},
                                "values.npy": {"dtype": "int32", "shape": [N], "fortran_order": False}}
    tokens = open_artifact(build_tokens(str(tmp_path / "tokens"))).manifest
    assert tokens["headers"]["parts/part-00002.parquet"] == {"schema": ["token: int32", "doc: int64"],
                                                             "rows": 8}
    assert sorted(tokens["headers"]) == [rel for rel in tokens["files"] if rel.endswith(".parquet")]


@pytest.mark.parametrize("manifest_says", ["int32", "object", "nothing"])
def test_object_dtype_values_npy_with_resealed_manifest(tmp_path, capsys, manifest_says):
    """#35 fault 3: values.npy rewritten as an object (pickle) array and every checksum re-sealed; the manifest
    still says int32, was re-sealed to say object, or records no headers (as an older memforge wrote it)."""
    uri = build_index(str(tmp_path / "index"))
    write_object_npy(tmp_path / "index" / "values.npy", N)

    def edit(manifest):
        if manifest_says == "object":
            manifest["headers"]["values.npy"]["dtype"] = "object"
        elif manifest_says == "nothing":
            del manifest["headers"]
    reseal(tmp_path / "index", edit)
    refusal = "values.npy: dtype object holds Python objects, which only pickle reads: refused (memforge never " \
              "unpickles)"
    assert verify(uri)[0] == refusal, verify(uri)
    assert_cli_reports(uri, capsys, refusal)
    index = open_artifact(uri, "index")
    with pytest.raises(ArtifactError, match=r"index: values\.npy: dtype object holds Python objects"):
        check_intact(index, "off")  # what every stage runs on its inputs, whatever check_inputs says
    with pytest.raises(ArtifactError, match=r"index/values\.npy: dtype object holds Python objects"):
        datastore_rows.DatastoreRows(uri, index.fingerprint)  # what the targets workers read


def test_npy_with_the_right_dtype_but_another_shape(tmp_path, capsys):
    uri = build_index(str(tmp_path / "index"))
    np.save(tmp_path / "index" / "values.npy", np.arange(N // 2, dtype=np.int32))
    reseal(tmp_path / "index")
    assert verify(uri)[0] == f"values.npy: shape is [{N // 2}], manifest says [{N}]"
    assert_cli_reports(uri, capsys, "values.npy: shape is")
    with pytest.raises(ArtifactError, match=r"index: values\.npy: shape is"):
        check_intact(open_artifact(uri, "index"), "off")


@pytest.mark.parametrize("edit, problem, refused_on_read", [
    (lambda meta: meta.update(data_type="float32"), "datastore.zarr/vals: dtype is float32, manifest says int32",
     False),
    (lambda meta: meta.update(data_type="string"),
     "datastore.zarr/vals: data type 'string' is not a fixed-size number", True),
    (lambda meta: meta["codecs"][0]["configuration"]["codecs"].append({"name": "numcodecs.pickle"}),
     "datastore.zarr/vals: codec 'numcodecs.pickle' is not one memforge writes", True),
])
def test_zarr_array_whose_metadata_says_another_type(tmp_path, capsys, edit, problem, refused_on_read):
    """A ``zarr.json`` rewritten (checksums re-sealed) is compared with the manifest's ``arrays``; data types and
    codecs memforge never writes are refused also where the array is read, before any data."""
    uri = build_keys(str(tmp_path / "keys"))
    edit_json(Path(uri, "datastore.zarr/vals/zarr.json"), edit)
    reseal(tmp_path / "keys")
    assert verify(uri)[0].startswith(problem), verify(uri)
    assert_cli_reports(uri, capsys, problem)
    with pytest.raises(ArtifactError, match=problem):
        check_intact(open_artifact(uri, "keys"), "off")
    if refused_on_read:
        with pytest.raises(ArtifactError, match="datastore.zarr/vals"):
            KeyStore.open(uri).vals(0, N)


def test_zarr_array_the_manifest_does_not_describe(tmp_path, capsys):
    uri = build_keys(str(tmp_path / "keys"))
    reseal(tmp_path / "keys", lambda manifest: manifest["arrays"].pop("datastore.zarr/vals"))
    assert verify(uri) == ["datastore.zarr/vals: a Zarr array the manifest does not describe (arrays)",
                           "content checks skipped until the problems above are fixed"]


def test_parquet_part_with_another_schema(tmp_path, capsys):
    uri = build_tokens(str(tmp_path / "tokens"))
    part = tmp_path / "tokens" / "parts" / "part-00001.parquet"
    table = pq.read_table(part)
    pq.write_table(table.set_column(0, "token", table.column("token").cast(pa.int64())), part)
    reseal(tmp_path / "tokens")
    assert verify(uri)[0] == ("parts/part-00001.parquet: schema is ['token: int64', 'doc: int64'], "
                              "manifest says ['token: int32', 'doc: int64']")
    assert_cli_reports(uri, capsys, "parts/part-00001.parquet: schema is")


# -- content invariants (files intact, checksums valid) ---------------------------------------------------


def test_probabilities_not_summing_to_one(tmp_path, capsys):
    uri = build_targets(str(tmp_path / "targets"), short_row=21)
    problems = verify(uri)
    assert len(problems) == 1, problems
    assert problems[0].startswith("distributions.zarr/probs: row 21 sums to 0.700000 with its truncated mass, not 1")
    assert not any("checksum" in p for p in problems)
    assert_cli_reports(uri, capsys, "row 21 sums to 0.700000")


def test_row_listing_itself_as_neighbour(tmp_path, capsys):
    uri = build_targets(str(tmp_path / "targets"), self_row=37)
    problems = verify(uri)
    assert problems == ["neighbours.zarr/ids: row 37 lists itself as a neighbour"]
    assert_cli_reports(uri, capsys, "row 37 lists itself as a neighbour")


def test_self_neighbour_allowed_without_self_query(tmp_path):
    """The same ids are sound when queries are not datastore rows (no ``self_query`` stat)."""
    uri = build_targets(str(tmp_path / "targets"), self_row=37)
    manifest_path = os.path.join(uri, "_manifest.json")
    manifest = fs.read_json(manifest_path)
    manifest["stats"] = {}
    fs.write_json_atomic(manifest_path, manifest)
    assert verify(uri) == []


# -- not published ----------------------------------------------------------------------------------------


def test_deleted_manifest_is_not_an_artifact(tmp_path, capsys):
    uri = build_keys(str(tmp_path / "keys"))
    os.remove(os.path.join(uri, "_manifest.json"))
    problems = verify(uri)
    assert len(problems) == 1
    assert "not a memforge artifact (no _manifest.json)" in problems[0]
    assert_cli_reports(uri, capsys, "_manifest.json")


def test_interrupted_build_is_not_published(tmp_path, capsys):
    uri = str(tmp_path / "keys")
    build = ArtifactBuild.begin(uri, "keys", {"which": "keys"})
    store = KeyStore.create(build.uri, N, 8, chunk_rows=8, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    first = plan.shards[0]
    rng = np.random.default_rng(0)
    build.markers.mark_done(first, store.write_shard(
        first, rng.standard_normal((first.rows, 8)), rng.integers(0, VOCAB, first.rows)))
    problems = verify(uri)
    assert len(problems) == 1 and "artifact is not published (no _manifest.json)" in problems[0]
    assert_cli_reports(uri, capsys, "not published")


def test_missing_path(tmp_path, capsys):
    uri = str(tmp_path / "nothing")
    assert verify(uri) == [f"{uri}: no artifact here (path does not exist)"]
    assert_cli_reports(uri, capsys, "no artifact here")


def test_counts_are_checked_against_what_the_manifest_records(tmp_path):
    """The manifest a racing --rebuild once published (rows but no files, no arrays), sealed with a consistent
    fingerprint and content digest: verify still finds it empty; so is an array shorter than counts.rows."""
    from memforge.storage.artifact import content_digest, fingerprint

    uri = build_keys(str(tmp_path / "keys"))
    path = Path(uri, "_manifest.json")
    original = json.loads(path.read_text())
    for edit, problem in ((lambda m: m.update(files={}, arrays={}), "counts.rows is"),
                          (lambda m: m["counts"].update(rows=m["counts"]["rows"] + 1), "counts.rows says")):
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        manifest["content_digest"] = content_digest(manifest["kind"], manifest["files"])
        manifest["fingerprint"] = fingerprint(manifest["kind"], manifest["params"],
                                              {i["role"]: i["content_digest"] for i in manifest["inputs"]},
                                              manifest["code"])
        path.write_text(json.dumps(manifest))
        assert any(problem in p for p in verify(uri)), verify(uri)
