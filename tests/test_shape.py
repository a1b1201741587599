"""Ragged target distributions (rows keep their own number of tokens, stored padded to the keep rule's cap):
the store's round trip and verify, reads cut to the widest row, and the memory's batches padded to theirs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memforge.pipelines.knn import KeepRule, distributions
from memforge.storage.artifact import ArtifactBuild, open_artifact
from memforge.storage.stores import DistributionStore, KeyStore
from memforge.storage.verify import verify
from memforge.training.memory import memory_loss
from memforge.training.memory_data import MemoryRows

pytestmark = pytest.mark.unit

N, K, CAP, VOCAB, CHUNK = 96, 64, 64, 50, 16


def ragged_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real kNN distributions of random neighbours under a floor rule at cap k: rows keep 1 to many tokens."""
    rng = np.random.default_rng(5)
    dists = np.sort(rng.exponential(2.0, (N, K)), axis=1).astype(np.float32)
    dists[: N // 3] *= 400  # sharp rows: one or two tokens pass the floor
    values = rng.zipf(1.2, (N, K)) % VOCAB
    return distributions(dists, values, 1.0, KeepRule.of(K, None, 1e-3))


def publish(uri: str, tokens, probs, truncated) -> DistributionStore:
    """A targets artifact holding these rows, written whole chunk by whole chunk as the stage writes them."""
    build = ArtifactBuild.begin(uri, "targets", {"width": None, "min_prob": 1e-3})
    store = DistributionStore.create(build.uri, N, CAP, chunk_rows=CHUNK, shard_chunks=1)
    for shard in build.pending(build.plan(store.rows.plan())):
        rows = slice(shard.start, shard.stop)
        build.markers.mark_done(shard, store.write_shard(shard, tokens[rows], probs[rows], truncated[rows]))
    build.publish(counts={"rows": N, "vocab_size": VOCAB}, arrays=store.rows.describe())
    return DistributionStore.open(open_artifact(uri, "targets").uri)


def test_a_ragged_store_round_trips_verifies_and_reads_cut_to_its_widest_row(tmp_path):
    tokens, probs, truncated = ragged_rows()
    kept = (tokens >= 0).sum(axis=1)
    assert kept.min() <= 2 and kept.max() > 10, "the rows must differ in size"
    store = publish(str(tmp_path / "targets"), tokens, probs, truncated)
    assert store.width == CAP
    np.testing.assert_array_equal(store.tokens(), tokens)
    np.testing.assert_array_equal(store.probs(), probs)
    assert verify(str(tmp_path / "targets")) == []
    for start, stop in ((0, 10), (0, N), (40, 77)):
        cut_tokens, cut_probs, cut_truncated = store.ragged(start, stop)
        widest = kept[start:stop].max()
        assert cut_tokens.shape == cut_probs.shape == (stop - start, widest)
        np.testing.assert_array_equal(cut_tokens, tokens[start:stop, :widest])
        np.testing.assert_array_equal(cut_probs, probs[start:stop, :widest])
        np.testing.assert_array_equal(cut_truncated, truncated[start:stop])
        assert (tokens[start:stop, widest:] == -1).all(), "nothing kept lies beyond the cut"


def test_memory_batches_are_padded_to_their_widest_row_and_lose_nothing(tmp_path):
    """Every row comes back once per epoch with exactly its kept tokens; each batch is as wide as its widest
    row; the loss of a batch is the loss of its rows at the store's full width."""
    tokens, probs, truncated = ragged_rows()
    store = publish(str(tmp_path / "targets"), tokens, probs, truncated)
    build = ArtifactBuild.begin(str(tmp_path / "keys"), "keys", {})
    keys = KeyStore.create(build.uri, N, 4, "float32", chunk_rows=CHUNK, shard_chunks=1)
    for shard in build.pending(build.plan(keys.rows.plan())):
        row_ids = np.arange(shard.start, shard.stop)
        build.markers.mark_done(shard, keys.write_shard(shard, np.repeat(row_ids[:, None], 4, 1), row_ids % VOCAB))
    build.publish(counts={"rows": N}, arrays=keys.rows.describe())
    keys = KeyStore.open(str(tmp_path / "keys"))
    rows = MemoryRows(lambda start, stop: keys.keys(start, stop).astype(np.float32), keys, store, CHUNK, 2, seed=1)
    batches = rows.batches(0, 24)
    seen = []
    kept = (tokens >= 0).sum(axis=1)
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (24, VOCAB)).astype(np.float32))
    for _ in range(N // 24):
        batch = next(batches)
        ids = batch.states[:, 0].astype(np.int64)  # each row's state is its row id
        assert batch.tokens.shape[1] == kept[ids].max() < CAP
        for j, row in enumerate(ids):
            np.testing.assert_array_equal(batch.tokens[j, :kept[row]], tokens[row, :kept[row]])
            assert (batch.tokens[j, kept[row]:] == -1).all() and (batch.probs[j, kept[row]:] == 0).all()
        narrow = memory_loss(logits, *(torch.from_numpy(a) for a in (batch.tokens, batch.probs, batch.remainder,
                                                                      batch.next_token)), alpha=0.5)
        full = memory_loss(logits, torch.from_numpy(tokens[ids]), torch.from_numpy(probs[ids]),
                           torch.from_numpy(truncated[ids]), torch.from_numpy(batch.next_token), alpha=0.5)
        assert torch.allclose(torch.stack(narrow), torch.stack(full))
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(N))
