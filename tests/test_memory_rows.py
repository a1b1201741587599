"""The memory's training rows on several ranks: every global batch is the same set of rows whatever the world
size, each rank reads only its own chunks, a resumed position reads the same batches, and the pass checksum
tells a pass that served each row once from one that repeated or skipped a row."""
from __future__ import annotations

import types

import numpy as np
import pytest

from memforge.storage.errors import MemforgeError
from memforge.training.memory_data import Coverage, MemoryRows
from memforge.training.world import World

pytestmark = pytest.mark.unit

N_ROWS, CHUNK_ROWS, BATCH = 1000, 64, 50


class States:
    dim = 2

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return np.repeat(np.arange(start, stop, dtype=np.float32)[:, None], 2, axis=1)


class Values:
    def vals(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop) % 7


class Distributions:
    """Row r keeps r % 3 + 1 tokens (ragged), so batches pad to their own widest row."""

    def __init__(self):
        self.rows = types.SimpleNamespace(n_rows=N_ROWS)
        self.reads: list[tuple[int, int]] = []

    def ragged(self, start: int, stop: int):
        self.reads.append((start, stop))
        rows = np.arange(start, stop)
        width = 3
        tokens = np.where(np.arange(width)[None, :] < (rows % 3 + 1)[:, None], rows[:, None] % 11, -1).astype(np.int32)
        probs = np.where(tokens >= 0, 0.25, 0.0)
        return tokens, probs, np.full(len(rows), 0.25)


def rows_of(buffer_chunks: int, rank: int = 0, world: int = 1) -> tuple[MemoryRows, Distributions]:
    distributions = Distributions()
    return MemoryRows(States(), Values(), distributions, CHUNK_ROWS, buffer_chunks, seed=3, rank=rank,
                      world_size=world), distributions


def steps(rows: MemoryRows, first: int, count: int) -> list:
    batches = rows.batches(first, BATCH)
    return [next(batches) for _ in range(count)]


def read_rows(distributions: Distributions) -> list[int]:
    return [row for start, stop in distributions.reads for row in range(start, stop)]


@pytest.mark.parametrize("buffer_chunks,world", [(4, 2), (3, 2), (4, 3), (2, 4)])
def test_the_ranks_share_out_each_global_batch_and_read_each_row_once(buffer_chunks, world):
    """The last chunk is short (1000 rows in chunks of 64): a buffer holding it still splits evenly."""
    whole, whole_reads = rows_of(buffer_chunks)
    expected = steps(whole, 0, 60)  # three passes
    shares = [rows_of(buffer_chunks, rank, world) for rank in range(world)]
    per_rank = [steps(rows, 0, 60) for rows, _ in shares]
    for step, batch in enumerate(expected):
        parts = [ranks[step] for ranks in per_rank]
        served = np.concatenate([part.row for part in parts])
        assert sorted(served) == sorted(batch.row), step
        for part in parts:  # a row's data is the row's, whichever rank serves it
            assert np.array_equal(part.states[:, 0], part.row.astype(np.float32))
            assert np.array_equal(part.next_token, part.row % 7)
            assert np.array_equal((part.tokens >= 0).sum(axis=1), part.row % 3 + 1)
    # together the ranks read each row once, and each reads an equal share of each buffer (to one row)
    assert sorted(row for _, d in shares for row in read_rows(d)) == sorted(read_rows(whole_reads))
    for buffer in whole._buffers(0):
        size = sum(stop - start for start, stop in map(whole._chunk_rows, buffer))
        counts = [int((rows._share(buffer)[1] >= 0).sum()) for rows, _ in shares]
        assert sum(counts) == size and max(counts) - min(counts) <= 1


def test_a_resumed_position_serves_the_same_batches_on_another_world_size():
    whole, _ = rows_of(4)
    expected = steps(whole, 0, 45)[17:]
    resumed = [steps(rows_of(4, rank, 2)[0], 17, 28) for rank in range(2)]
    for step, batch in enumerate(expected):
        assert sorted(np.concatenate([ranks[step].row for ranks in resumed])) == sorted(batch.row)


def test_the_pass_checksum_tells_each_row_once_from_a_repeat_and_a_skip():
    world = World()
    whole = Coverage(N_ROWS)
    whole.add(0, np.random.default_rng(0).permutation(N_ROWS))
    whole.add(1, np.arange(10))
    whole.merge(world, range(0, 2))
    assert whole.record() == {"passes_checked": 1, "open": {"1": [10, whole.open[1][1]]}}

    resumed = Coverage(N_ROWS, whole.record())  # a checkpoint's counts carried on
    resumed.add(1, np.arange(10, N_ROWS))
    resumed.merge(world, range(1, 2))
    assert resumed.checked == 2 and resumed.open == {}

    broken = Coverage(N_ROWS)
    rows = np.arange(N_ROWS)
    rows[5] = 6  # row 6 twice, row 5 never
    broken.add(0, rows)
    with pytest.raises(MemforgeError, match="pass 0 served 1000 rows .* not each of the 1000 rows once"):
        broken.merge(world, range(0, 1))
