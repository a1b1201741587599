"""The index's datastore rows: exact keys kept in the key store's dtype, re-ranking distances exact."""
import faiss
import numpy as np
import pytest

from memforge.pipelines import datastore_rows
from memforge.pipelines.half_distances import l2_by_idx
from memforge.storage.shards import ShardPlan
from memforge.storage.stores import KeyStore

pytestmark = pytest.mark.unit

N, DIM, K = 300, 24, 50


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rerank_keys_are_kept_in_the_key_dtype_and_give_float32_distances(tmp_path, dtype):
    """keys.npy holds the key store's own bytes (2 per value for float16/bfloat16), and the re-ranking
    distances from it equal FAISS's over a float32 copy of the same keys (bit for bit for float32 keys; for
    16-bit keys up to the summation order, the keys themselves being widened exactly)."""
    rng = np.random.default_rng(0)
    store = KeyStore.create(str(tmp_path / "keys"), N, DIM, dtype=dtype, chunk_rows=64, shard_chunks=2)
    keys = rng.standard_normal((N, DIM), dtype=np.float32) * 3
    keys[::3, 0], keys[::4, 1], keys[::5, 2] = 0.0, 3e-6, -5e-7  # zeros and (float16) subnormals
    for shard in store.rows.plan().shards:
        store.write_shard(shard, keys[shard.start:shard.stop], rng.integers(0, 100, shard.rows, dtype=np.int32))
    root = tmp_path / "index"
    root.mkdir()
    written = datastore_rows.write(store, ShardPlan.even(N, 100), str(root), exact_keys=True)
    assert set(written) == {datastore_rows.VALUES, datastore_rows.KEYS}
    assert np.load(root / datastore_rows.KEYS).nbytes == N * DIM * (4 if dtype == "float32" else 2)
    rows = datastore_rows.DatastoreRows(str(root), "k")
    base = np.ascontiguousarray(store.keys(), dtype=np.float32)  # the key store's keys, widened exactly
    assert np.array_equal(rows.key_rows(0, N), base)

    queries = rng.standard_normal((7, DIM), dtype=np.float32)
    ids = rng.integers(0, N, (7, K)).astype(np.int64)
    ids[2, 5:] = -1
    lookup, expected = np.maximum(ids, 0), np.empty(ids.shape, np.float32)  # held: swig_ptr keeps no reference
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(expected), faiss.swig_ptr(queries), faiss.swig_ptr(base),
                            faiss.swig_ptr(lookup), DIM, 7, K)
    expected[ids == -1] = np.inf
    found = rows.distances(queries, ids)
    if dtype == "float32":
        assert np.array_equal(found, expected)
    else:
        assert np.array_equal(np.isinf(found), ids == -1)
        assert np.allclose(found[ids >= 0], expected[ids >= 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bfloat16", [False, True])
def test_every_finite_16_bit_key_is_widened_exactly(bfloat16):
    """Distances from queries 0 and 1 to a one-dimensional key of each finite bit pattern are exactly
    x^2 and (1 - x)^2: the kernel reads every value, subnormals and signed zeros included, as float32 does."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = ((patterns.astype(np.uint32) << 16).view(np.float32) if bfloat16
              else patterns.view(np.float16).astype(np.float32))
    finite = np.isfinite(values)
    patterns, values = patterns[finite].reshape(-1, 1), values[finite]
    out = np.empty((2, len(values)), np.float32)
    l2_by_idx(np.array([[0.0], [1.0]], np.float32), patterns, np.tile(np.arange(len(values)), (2, 1)), bfloat16, out)
    with np.errstate(over="ignore"):  # the largest bfloat16 values square to inf, in the kernel as here
        assert np.array_equal(out[0], values * values)
        assert np.array_equal(out[1], (np.float32(1) - values) ** 2)
