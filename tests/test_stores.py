"""Typed stores on real Zarr v3 arrays and Parquet parts, driven the way a stage drives them."""
from __future__ import annotations

import multiprocessing
import os
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pytest
import torch

from memforge.storage import fs
from memforge.storage.artifact import ArtifactBuild, open_artifact
from memforge.storage.errors import ArtifactError
from memforge.storage.shards import Shard, ShardMarkers, ShardPlan
from memforge.storage.stores import TOKEN_SCHEMA, DistributionStore, KeyStore, NeighbourStore, PartOffsets, TokenStore
from memforge.storage.verify import verify

pytestmark = pytest.mark.unit

VOCAB = 1000


@pytest.fixture(params=["local", "memory"])
def artifact_uri(request, tmp_path):
    """A fresh artifact location: a local path, or a unique path on fsspec's process-global memory fs."""
    if request.param == "local":
        yield str(tmp_path / "art")
        return
    uri = f"memory://t-{uuid4().hex}/art"
    yield uri
    fs.remove_tree(uri)


def key_data(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic float32 keys ``[n, dim]`` and int32 values ``[n]`` for ``seed``."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, dim), dtype=np.float32) * 3
    vals = rng.integers(0, VOCAB, size=n, dtype=np.int32)
    return keys, vals


def write_all(build: ArtifactBuild, plan: ShardPlan, write) -> int:
    """Write every pending shard of ``plan`` with ``write(shard) -> files`` and mark it done; return how many."""
    pending = build.pending(plan)
    for shard in pending:
        build.markers.mark_done(shard, write(shard))
    return len(pending)


def zarr_files(uri: str) -> list[str]:
    """Storage files of all arrays under ``uri`` (the chunk/shard files, not metadata)."""
    return [p for p in fs.list_files(uri) if "/c/" in p]


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_key_store_round_trip(artifact_uri, dtype):
    n, dim = 100, 8
    keys, vals = key_data(7, n, dim)
    # Exact bfloat16 ties and near-ties: 1 + 2^-8 rounds to even (1.0), 1 + 3*2^-8 rounds up.
    keys[0, :4] = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 65504.0]

    build = ArtifactBuild.begin(artifact_uri, "keys", {"dtype": dtype, "dim": dim})
    store = KeyStore.create(build.uri, n, dim, dtype=dtype, chunk_rows=16, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert write_all(build, plan, lambda s: store.write_shard(s, keys[s.start:s.stop], vals[s.start:s.stop])) == 4
    build.publish(counts={"rows": n, "vocab_size": VOCAB}, arrays=store.rows.describe())

    artifact = open_artifact(artifact_uri, "keys")
    assert artifact.manifest["counts"] == {"rows": n, "vocab_size": VOCAB}
    assert artifact.manifest["shards"] == {"count": 4}
    # One Zarr shard file per plan shard and array, each recorded with its checksum.
    recorded = [f for f in artifact.manifest["files"] if "/c/" in f]
    assert sorted(recorded) == zarr_files(artifact.uri) and len(recorded) == 8

    back = KeyStore.open(artifact.uri)
    assert back.key_dtype == dtype and back.dim == dim
    got = back.keys()
    if dtype == "bfloat16":
        expected = torch.tensor(keys).to(torch.bfloat16).float().numpy()
        assert got.dtype == np.float32
        assert back.rows.array("keys").dtype == np.uint16
        assert got[0, :3].tolist() == [1.0, 1 + 2**-6, -1.0]
        assert not np.array_equal(got, keys)  # really rounded, not stored at full precision
    else:
        expected = keys.astype(dtype)
        assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(back.vals(), vals)
    np.testing.assert_array_equal(back.keys(30, 70), expected[30:70])  # range crossing shard files
    assert verify(artifact_uri) == []


def test_neighbour_store_round_trip(artifact_uri):
    n, k = 70, 5
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(n)[:k] for _ in range(n)]).astype(np.int64)
    ids[4, 3:] = -1  # fewer than k neighbours found
    dists = np.sort(rng.random((n, k), dtype=np.float32) * 10, axis=1)
    dists[4, 3:] = np.inf

    build = ArtifactBuild.begin(artifact_uri, "neighbours", {"k": k})
    store = NeighbourStore.create(build.uri, n, k, chunk_rows=8, shard_chunks=3)
    plan = build.plan(store.rows.plan())
    assert len(plan.shards) == 3 and plan.total_rows == n
    write_all(build, plan, lambda s: store.write_shard(s, ids[s.start:s.stop], dists[s.start:s.stop]))
    build.publish(counts={"rows": n, "datastore_rows": n}, arrays=store.rows.describe())

    back = NeighbourStore.open(open_artifact(artifact_uri, "neighbours").uri)
    assert back.k == k
    assert back.ids().dtype == np.int64 and back.dists().dtype == np.float32
    np.testing.assert_array_equal(back.ids(), ids)
    np.testing.assert_array_equal(back.dists(), dists)
    assert verify(artifact_uri) == []


def distribution_data(seed: int, n: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid sparse distributions: distinct tokens, probs sorted descending, probs + truncated == 1."""
    rng = np.random.default_rng(seed)
    tokens = np.stack([rng.permutation(VOCAB)[:width] for _ in range(n)]).astype(np.int32)
    truncated = rng.uniform(0.01, 0.3, size=n)
    weights = -np.sort(-rng.random((n, width)), axis=1)
    probs = weights / weights.sum(axis=1, keepdims=True) * (1 - truncated)[:, None]
    return tokens, probs.astype(np.float32), truncated.astype(np.float32)


@pytest.mark.parametrize("probs_dtype", ["float32", "float16"])
def test_distribution_store_round_trip(artifact_uri, probs_dtype):
    n, width = 50, 6
    tokens, probs, truncated = distribution_data(11, n, width)
    tokens[2, 4:], probs[2, 4:] = -1, 0  # padding; the two real entries keep the row's mass
    probs[2, :4] *= (1 - truncated[2]) / probs[2, :4].sum()

    build = ArtifactBuild.begin(artifact_uri, "targets", {"width": width, "probs": probs_dtype})
    store = DistributionStore.create(build.uri, n, width, probs_dtype=probs_dtype, chunk_rows=10, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    assert [s.rows for s in plan.shards] == [20, 20, 10]
    write_all(build, plan, lambda s: store.write_shard(
        s, tokens[s.start:s.stop], probs[s.start:s.stop], truncated[s.start:s.stop]))
    build.publish(counts={"rows": n, "vocab_size": VOCAB}, arrays=store.rows.describe())

    back = DistributionStore.open(open_artifact(artifact_uri, "targets").uri)
    assert back.width == width
    np.testing.assert_array_equal(back.tokens(), tokens)
    np.testing.assert_array_equal(back.probs(), probs.astype(probs_dtype))
    assert back.probs().dtype == np.dtype(probs_dtype)
    np.testing.assert_array_equal(back.truncated(), truncated)
    np.testing.assert_array_equal(back.probs(15, 25), probs.astype(probs_dtype)[15:25])
    assert verify(artifact_uri) == []


def test_token_store_round_trip(artifact_uri):
    n, shard_rows = 95, 40
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, VOCAB, n, dtype=np.int32)
    docs = np.repeat(np.arange(5, dtype=np.int64), 19)

    build = ArtifactBuild.begin(artifact_uri, "tokens", {"shard_rows": shard_rows})
    store = TokenStore(build.uri)
    plan = build.plan(ShardPlan.even(n, shard_rows))
    write_all(build, plan, lambda s: store.write_shard(
        s, tokens[s.start:s.stop], docs[s.start:s.stop]))
    build.publish(counts={"rows": n, "vocab_size": VOCAB})

    artifact = open_artifact(artifact_uri, "tokens")
    assert sorted(f for f in artifact.manifest["files"] if f.endswith(".parquet")) == [
        "parts/part-00000.parquet", "parts/part-00001.parquet", "parts/part-00002.parquet"]
    back = TokenStore(artifact.uri)
    tables = [back.read_shard(s) for s in plan.shards]
    assert [t.num_rows for t in tables] == [40, 40, 15]
    table = pa.concat_tables(tables)
    assert table.schema == TOKEN_SCHEMA
    np.testing.assert_array_equal(table.column("token").to_numpy(), tokens)
    np.testing.assert_array_equal(table.column("doc").to_numpy(), docs)
    assert verify(artifact_uri) == []


def test_token_store_refuses_ragged_columns(tmp_path):
    store = TokenStore(str(tmp_path))
    with pytest.raises(ArtifactError, match="part-00001.parquet: token and doc columns differ in length"):
        store.write_shard(Shard(1, 4, 8), np.zeros(3), np.zeros(4))
    assert fs.list_files(str(tmp_path)) == []


def test_token_store_reads_row_ranges_across_parts(tmp_path):
    """Parts hold any number of rows; PartOffsets maps global rows onto them (empty parts included)."""
    counts = [("00000", 7), ("00001", 0), ("00002", 5), ("00003", 9)]
    tokens = np.arange(21, dtype=np.int32)
    build = ArtifactBuild.begin(str(tmp_path / "art"), "tokens", {})
    store = TokenStore(build.uri)
    offsets = PartOffsets.from_counts(counts)
    plan = build.plan(ShardPlan.even(4, 1))
    for shard, (name, start, stop) in zip(plan.shards, offsets.parts):
        n = stop - start
        build.markers.mark_done(shard, store.write_shard(shard, tokens[start:stop], np.zeros(n)))
    build.publish(counts={"rows": 21}, stats={"parts": offsets.to_json()})
    reader = TokenStore.open(build.uri)
    back = PartOffsets.from_json(open_artifact(build.uri).manifest["stats"]["parts"])
    assert back == offsets and back.total_rows == 21
    for start, stop in [(0, 21), (3, 15), (7, 12), (12, 13), (20, 21), (5, 5)]:
        np.testing.assert_array_equal(reader.read_rows(back, start, stop), tokens[start:stop])


# -- concurrent writers -----------------------------------------------------------------------------------

CONCURRENT_SEED, CONCURRENT_ROWS, CONCURRENT_DIM = 1234, 96, 16


def write_shards_in_child(root: str, shards: list[tuple[int, int, int]]) -> None:
    """Child process: open the existing key store for writing, write ``shards`` and mark each done."""
    keys, vals = key_data(CONCURRENT_SEED, CONCURRENT_ROWS, CONCURRENT_DIM)
    store = KeyStore.open(root, writable=True)
    markers = ShardMarkers(root)
    for sid, start, stop in shards:
        shard = Shard(sid, start, stop)
        markers.mark_done(shard, store.write_shard(shard, keys[start:stop], vals[start:stop]))


def test_two_processes_write_disjoint_shards_of_the_same_arrays(tmp_path):
    uri = str(tmp_path / "art")
    build = ArtifactBuild.begin(uri, "keys", {"concurrent": True})
    store = KeyStore.create(build.uri, CONCURRENT_ROWS, CONCURRENT_DIM, dtype="float32", chunk_rows=4,
                            shard_chunks=2)
    plan = build.plan(store.rows.plan())
    assert len(plan.shards) == 12
    # Interleaved, so neighbouring Zarr shard files are written by different processes at the same time.
    halves = [[(s.id, s.start, s.stop) for s in plan.shards[i::2]] for i in (0, 1)]

    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=write_shards_in_child, args=(build.uri, half)) for half in halves]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]

    assert build.pending(plan) == []
    build.publish(counts={"rows": CONCURRENT_ROWS, "vocab_size": VOCAB}, arrays=store.rows.describe())
    keys, vals = key_data(CONCURRENT_SEED, CONCURRENT_ROWS, CONCURRENT_DIM)
    back = KeyStore.open(open_artifact(uri, "keys").uri)
    np.testing.assert_array_equal(back.keys(), keys)
    np.testing.assert_array_equal(back.vals(), vals)
    assert len(zarr_files(uri)) == 24
    assert verify(uri) == []


# -- refused writes ---------------------------------------------------------------------------------------


@pytest.fixture
def key_store(tmp_path):
    """A float16 key store of 64 rows x 4 with 16-row storage units (4 plan shards)."""
    return KeyStore.create(str(tmp_path), 64, 4, chunk_rows=8, shard_chunks=2)


@pytest.mark.parametrize("start, stop", [(8, 24), (0, 8), (16, 40), (56, 64)])
def test_misaligned_shard_is_refused(key_store, start, stop):
    assert key_store.rows.unit_rows() == 16
    keys, vals = key_data(0, stop - start, 4)
    with pytest.raises(ArtifactError, match=rf"rows \[{start}, {stop}\) are not aligned to the array's 16-row"):
        key_store.write_shard(Shard(1, start, stop), keys, vals)
    assert zarr_files(key_store.rows.root) == []


def test_aligned_multi_unit_and_short_last_shards_are_accepted(tmp_path):
    store = KeyStore.create(str(tmp_path), 60, 4, chunk_rows=8, shard_chunks=2)
    keys, vals = key_data(1, 60, 4)
    files = store.write_shard(Shard(0, 16, 48), keys[16:48], vals[16:48])  # two whole storage units
    assert sorted(files) == ["datastore.zarr/keys/c/1/0", "datastore.zarr/keys/c/2/0",
                             "datastore.zarr/vals/c/1", "datastore.zarr/vals/c/2"]
    files = store.write_shard(Shard(1, 48, 60), keys[48:60], vals[48:60])  # array end, not a unit boundary
    assert sorted(files) == ["datastore.zarr/keys/c/3/0", "datastore.zarr/vals/c/3"]
    for rel, checksum in files.items():
        assert fs.file_checksum(os.path.join(tmp_path, rel)) == checksum
    np.testing.assert_array_equal(store.keys(16, 60), keys[16:60].astype(np.float16))


@pytest.mark.parametrize("keys_shape, vals_shape", [((15, 4), (15,)), ((16, 5), (16,)), ((16, 4), (17,))])
def test_wrong_shaped_shard_is_refused(key_store, keys_shape, vals_shape):
    with pytest.raises(ArtifactError, match=r"shard 00002 got shape"):
        key_store.write_shard(Shard(2, 32, 48), np.ones(keys_shape, np.float32), np.ones(vals_shape, np.int32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_keys_are_refused_naming_shard_and_global_row(key_store, bad):
    keys, vals = key_data(2, 16, 4)
    keys[5, 2] = bad
    keys[9, 0] = bad
    with pytest.raises(ArtifactError) as err:
        key_store.write_shard(Shard(1, 16, 32), keys, vals)
    message = str(err.value)
    assert "shard 00001" in message
    assert "global row 21" in message
    assert "2 rows in all" in message
    assert zarr_files(key_store.rows.root) == []


def test_keys_that_overflow_float16_are_refused(key_store):
    """A finite float32 key beyond float16's range would be stored as inf: the writer must refuse it
    (finiteness is checked after the cast to the stored dtype, not before)."""
    keys, vals = key_data(2, 16, 4)
    keys[3, 1] = 1e5  # float16 max is 65504
    with np.errstate(over="ignore"):
        with pytest.raises(ArtifactError, match=r"shard 00000 .*global row 3"):
            key_store.write_shard(Shard(0, 0, 16), keys, vals)


def test_unsupported_key_dtype_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not supported"):
        KeyStore.create(str(tmp_path), 8, 4, dtype="int8")
    assert not os.path.exists(tmp_path / "datastore.zarr")


def test_shard_whose_values_equal_the_fill_value_is_written(tmp_path):
    """Rows whose whole distribution fits in ``width`` have truncated == 0, the array's fill value: the Zarr
    shard file of such a shard is still written (``write_empty_chunks`` is applied every time an array is
    opened, as Zarr does not persist it), so it has a file and a checksum like any other."""
    uri = str(tmp_path / "art")
    n, width = 16, 4
    tokens, probs, _ = distribution_data(4, n, width)
    probs = probs / probs.sum(axis=1, keepdims=True)
    truncated = np.zeros(n, np.float32)

    build = ArtifactBuild.begin(uri, "targets", {"width": width})
    store = DistributionStore.create(build.uri, n, width, chunk_rows=4, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    write_all(build, plan, lambda s: store.write_shard(
        s, tokens[s.start:s.stop], probs[s.start:s.stop], truncated[s.start:s.stop]))
    assert "distributions.zarr/truncated/c/0" in fs.list_files(uri)
    build.publish(counts={"rows": n, "vocab_size": VOCAB}, arrays=store.rows.describe())
    np.testing.assert_array_equal(DistributionStore.open(uri).truncated(), truncated)
    assert verify(uri) == []


# -- resume -----------------------------------------------------------------------------------------------


def test_create_again_on_resume_reuses_store_and_keeps_data(artifact_uri):
    n, dim = 64, 4
    keys, vals = key_data(9, n, dim)
    params = {"dim": dim}
    build = ArtifactBuild.begin(artifact_uri, "keys", params)
    store = KeyStore.create(build.uri, n, dim, dtype="bfloat16", chunk_rows=8, shard_chunks=2)
    plan = build.plan(store.rows.plan())
    first = plan.shards[1]
    build.markers.mark_done(first, store.write_shard(first, keys[first.start:first.stop], vals[first.start:first.stop]))
    build.release()  # -- interrupted here (its writer is gone); a new run resumes --
    build = ArtifactBuild.begin(artifact_uri, "keys", params)
    assert not build.up_to_date
    store = KeyStore.create(build.uri, n, dim, dtype="bfloat16", chunk_rows=8, shard_chunks=2)
    assert store.key_dtype == "bfloat16"
    expected = torch.tensor(keys).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(store.keys(first.start, first.stop), expected[first.start:first.stop])
    np.testing.assert_array_equal(store.vals(first.start, first.stop), vals[first.start:first.stop])
    plan = build.plan(store.rows.plan())
    pending = build.pending(plan)
    assert first not in pending and len(pending) == 3
    write_all(build, plan, lambda s: store.write_shard(s, keys[s.start:s.stop], vals[s.start:s.stop]))
    build.publish(counts={"rows": n, "vocab_size": VOCAB}, arrays=store.rows.describe())
    np.testing.assert_array_equal(KeyStore.open(artifact_uri).keys(), expected)
    np.testing.assert_array_equal(KeyStore.open(artifact_uri).vals(), vals)
    assert verify(artifact_uri) == []


@pytest.mark.parametrize("create_again, message", [
    (lambda root: KeyStore.create(root, 48, 4, chunk_rows=8, shard_chunks=2),
     r"keys: existing array is \(64, 4\) float16, expected \(48, 4\) float16; pass --rebuild"),
    (lambda root: KeyStore.create(root, 64, 8, chunk_rows=8, shard_chunks=2),
     r"keys: existing array is \(64, 4\) float16, expected \(64, 8\) float16; pass --rebuild"),
    (lambda root: KeyStore.create(root, 64, 4, dtype="float32", chunk_rows=8, shard_chunks=2),
     r"keys: existing array is \(64, 4\) float16, expected \(64, 4\) float32; pass --rebuild"),
    (lambda root: NeighbourStore.create(root, 64, 4, sub="datastore.zarr"),
     r"datastore.zarr: array 'ids' missing"),
], ids=["rows", "dim", "dtype", "other-store"])
def test_create_again_with_different_shape_is_refused(key_store, create_again, message):
    keys, vals = key_data(3, 16, 4)
    key_store.write_shard(Shard(0, 0, 16), keys, vals)
    with pytest.raises(ArtifactError, match=message):
        create_again(key_store.rows.root)
    # The refused create left the existing arrays and their data alone.
    reopened = KeyStore.open(key_store.rows.root, writable=True)
    assert reopened.rows.array("keys").shape == (64, 4)
    np.testing.assert_array_equal(reopened.keys(0, 16), keys.astype(np.float16))
