"""Training rows of the MLP memory, shuffled by a chunk-level buffer.

A row is (query state, sparse kNN distribution, next token) of one datastore row. Distributions are
ragged (each row keeps its own number of tokens): a chunk is read cut to its widest row, and a batch is
padded with (-1, 0) to its own widest row, so memory follows the rows' sizes, not the store's width. Each epoch
visits the Zarr chunks in a seeded random order, ``buffer_chunks`` chunks at a time: their rows
are read sequentially, then served in a seeded random order. The order is a function of the seed
and the position, so a resumed run (position = step x batch size) reads the same batches.
With several ranks, the batches are the same global batches: the rows of each buffer are cut into as many
equal ranges as there are ranks, each rank reads only its range and keeps, of every global batch, the
rows of its range. ``Coverage`` counts
and hashes the rows a pass served, so a run (and a run resumed on another number of ranks) shows that
no row was repeated or skipped within a pass.
Query states come from the key store (offline) or from the decoder run on the token windows
that own the rows (online), through the same code as ``encode``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from memforge.pipelines.windows import encode_rows
from memforge.storage.errors import MemforgeError
from memforge.storage.stores import DistributionStore, KeyStore, PartOffsets, TokenStore


class KeyStoreStates:
    """Offline: query states are the stored keys (the decoder is the encoder, same layer)."""

    def __init__(self, keys: KeyStore):
        self.keys, self.dim = keys, keys.dim

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.keys.keys(start, stop), dtype=np.float32)


class DecoderStates:
    """Online: query states from the frozen decoder at the memory's input layer, on the windows
    that own the rows (same windows as ``encode``)."""

    def __init__(self, model, capture, tokens_uri: str, parts: list, block_size: int, stride: int,
                 batch_size: int, hidden: int):
        self.model, self.capture = model, capture
        self.reader, self.offsets = TokenStore(tokens_uri, "train"), PartOffsets.from_json(parts)
        self.block_size, self.stride, self.batch_size, self.hidden = block_size, stride, batch_size, hidden
        self.dim = hidden

    def __call__(self, start: int, stop: int) -> np.ndarray:
        states, _, _ = encode_rows(self.model, self.capture, self.reader, self.offsets, start, stop,
                                   self.block_size, self.stride, self.batch_size, self.hidden)
        return states


@dataclass
class Batch:
    states: np.ndarray      # float32 [B, d]
    tokens: np.ndarray      # int32 [B, m], -1 = padding; m: the widest row's kept tokens
    probs: np.ndarray       # float32 [B, m]
    remainder: np.ndarray   # float32 [B]: the kNN mass of the tokens not stored
    next_token: np.ndarray  # int64 [B]
    row: np.ndarray         # int64 [B]: the rows' datastore positions

    def take(self, rows: np.ndarray) -> "Batch":
        """Rows ``rows``, their token pairs cut to the widest of them."""
        tokens = self.tokens[rows]
        widest = int((tokens >= 0).sum(axis=1).max(initial=0))
        return Batch(self.states[rows], tokens[:, :widest], self.probs[rows][:, :widest], self.remainder[rows],
                     self.next_token[rows], self.row[rows])


def stack(parts: list[Batch]) -> Batch:
    """The rows of ``parts`` in order, token pairs padded with (-1, 0) to the widest part's width."""
    widest = max(part.tokens.shape[1] for part in parts)

    def padded(array: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(array, ((0, 0), (0, widest - array.shape[1])), constant_values=fill)

    return Batch(np.concatenate([p.states for p in parts]), np.concatenate([padded(p.tokens, -1) for p in parts]),
                 np.concatenate([padded(p.probs, 0) for p in parts]), np.concatenate([p.remainder for p in parts]),
                 np.concatenate([p.next_token for p in parts]), np.concatenate([p.row for p in parts]))


def _mix(rows: np.ndarray) -> np.ndarray:
    """splitmix64 of each row position: a row's term in a pass's checksum."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def pass_checksum(rows: np.ndarray) -> int:
    """The checksum of serving ``rows`` (order-free: the sum of their mixes, modulo 2**64)."""
    with np.errstate(over="ignore"):
        return int(_mix(rows).sum(dtype=np.uint64))


class Coverage:
    """Rows served per pass (epoch): a count and an order-free checksum of their positions. ``merge`` sums every
    rank's counts with those a checkpoint carried; a pass whose count reaches the row count is checked against
    the checksum of every row once."""

    def __init__(self, n_rows: int, record: dict | None = None):
        self.n_rows = n_rows
        record = record or {}
        self.checked_before = self.checked = int(record.get("passes_checked", 0))
        self.carried = {int(e): (int(c), int(h)) for e, (c, h) in record.get("open", {}).items()}
        self.served: dict[int, list[int]] = {}  # this rank, this run: epoch -> [rows, checksum]
        self.open: dict[int, tuple[int, int]] = dict(self.carried)  # after merge: every rank's incomplete passes
        self._expected: int | None = None

    def add(self, epoch: int, rows: np.ndarray) -> None:
        entry = self.served.setdefault(epoch, [0, 0])
        entry[0] += len(rows)
        entry[1] = (entry[1] + pass_checksum(rows)) % 2**64

    def expected(self) -> int:
        """The checksum of a whole pass (every row once), computed in blocks."""
        if self._expected is None:
            total, block = 0, 1 << 22
            for start in range(0, self.n_rows, block):
                total += pass_checksum(np.arange(start, min(start + block, self.n_rows)))
            self._expected = total % 2**64
        return self._expected

    def merge(self, world, epochs: range) -> None:
        """Sum the counts of ``epochs`` (every pass this run touched) over the ranks and the checkpoint it
        resumed, then check the complete passes; raises when a pass served a row twice or skipped one."""
        mine = []
        for epoch in epochs:
            count, checksum = self.served.get(epoch, (0, 0))
            carried = self.carried.get(epoch, (0, 0))
            mine += [count + carried[0], (checksum + carried[1]) % 2**64]
        totals = world.all_sum([v - 2**64 if v >= 2**63 else v for v in mine], torch.int64)
        self.open, complete = {}, 0
        for epoch, count, checksum in zip(epochs, totals[0::2], totals[1::2]):
            checksum %= 2**64
            if count > self.n_rows or (count == self.n_rows and checksum != self.expected()):
                raise MemforgeError(f"pass {epoch} served {count} rows with checksum {checksum:#x}, not each of "
                                    f"the {self.n_rows} rows once ({self.expected():#x}): the data order is broken")
            if count == self.n_rows:
                complete += 1
            else:
                self.open[epoch] = (count, checksum)
        self.checked = self.checked_before + complete

    def record(self) -> dict:
        """What a checkpoint keeps (after ``merge``)."""
        return {"passes_checked": self.checked, "open": {str(e): list(v) for e, v in sorted(self.open.items())}}


class MemoryRows:
    """Shuffled global batches over all rows of the train targets; a rank reads and keeps only its share."""

    def __init__(self, states, values: KeyStore, distributions: DistributionStore, chunk_rows: int,
                 buffer_chunks: int, seed: int, rank: int = 0, world_size: int = 1):
        self.states, self.values, self.distributions = states, values, distributions
        self.n_rows = distributions.rows.n_rows
        self.chunk_rows, self.buffer_chunks, self.seed = chunk_rows, buffer_chunks, seed
        self.rank, self.world_size = rank, world_size
        self.n_chunks = -(-self.n_rows // chunk_rows)
        self.rows_read = 0

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows)

    def _buffers(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        return [order[i:i + self.buffer_chunks] for i in range(0, self.n_chunks, self.buffer_chunks)]

    def _read(self, spans: list[tuple[int, int]]) -> Batch:
        """The rows of ``spans`` (row ranges, each within one chunk, read sequentially and cut to its widest row),
        in order."""
        parts = []
        for start, stop in spans:
            tokens, probs, truncated = self.distributions.ragged(start, stop)
            parts.append(Batch(self.states(start, stop), tokens, probs.astype(np.float32),
                               truncated.astype(np.float32), self.values.vals(start, stop).astype(np.int64),
                               np.arange(start, stop, dtype=np.int64)))
            self.rows_read += stop - start
        if not parts:  # a buffer of fewer rows than ranks
            return Batch(np.zeros((0, self.states.dim), np.float32), np.zeros((0, 0), np.int32),
                         np.zeros((0, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                         np.zeros(0, np.int64))
        return stack(parts)

    def _share(self, chunks: np.ndarray) -> tuple[Batch, np.ndarray]:
        """This rank's rows of a buffer: its chunks' rows laid end to end are cut into as many equal ranges as
        there are ranks, and the rank reads its range only (a chunk a cut falls in is read in part by two
        ranks). Returns that data and, for each buffer position, the row's index in it (-1: another rank's)."""
        bounds = [self._chunk_rows(int(chunk)) for chunk in chunks]
        size = sum(stop - start for start, stop in bounds)
        low, high = size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size
        spans, offset = [], 0
        for start, stop in bounds:
            first, last = max(low, offset), min(high, offset + stop - start)
            if first < last:
                spans.append((start + first - offset, start + last - offset))
            offset += stop - start
        local = np.full(size, -1, dtype=np.int64)
        local[low:high] = np.arange(high - low)
        return self._read(spans), local

    def batches(self, first_step: int, batch_size: int, coverage: Coverage | None = None) -> Iterator[Batch]:
        """This rank's rows of the global batches from step ``first_step`` on, endlessly (epoch after epoch);
        ``coverage`` counts each row as it is served."""
        epoch, skip = divmod(first_step * batch_size, self.n_rows)
        pending: list[Batch] = []
        filled = 0
        while True:
            for number, chunks in enumerate(self._buffers(epoch)):
                size = sum(b - a for a, b in map(self._chunk_rows, chunks))
                if skip >= size:
                    skip -= size
                    continue
                rows = np.random.default_rng([self.seed, epoch, number]).permutation(size)[skip:]
                skip = 0
                data, local = self._share(chunks)
                while len(rows):
                    take, rows = rows[:batch_size - filled], rows[batch_size - filled:]
                    part = data.take(local[take][local[take] >= 0])
                    if coverage is not None:
                        coverage.add(epoch, part.row)
                    pending.append(part)
                    filled += len(take)
                    if filled == batch_size:
                        yield stack(pending)
                        pending, filled = [], 0
            epoch += 1
