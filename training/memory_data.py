"""Training rows of the MLP memory, shuffled by a chunk-level buffer.

A row is (query state, sparse kNN distribution, next token) of one datastore row. Distributions are
ragged (each row keeps its own number of tokens): a chunk is read cut to its widest row, and a batch is
padded with (-1, 0) to its own widest row, so memory follows the rows' sizes, not the store's width. Each epoch
visits the Zarr chunks in a seeded random order, ``buffer_chunks`` chunks at a time: their rows
are read sequentially, then served in a seeded random order. The order is a function of the seed
and the position, so a resumed run (position = step x batch size) reads the same batches.
Query states come from the key store (offline) or from the decoder run on the token windows
that own the rows (online), through the same code as ``encode``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from memforge.pipelines.windows import encode_rows
from memforge.storage.stores import DistributionStore, KeyStore, PartOffsets, TokenStore


class KeyStoreStates:
    """Offline: query states are the stored keys (the decoder is the encoder, same layer)."""

    def __init__(self, keys: KeyStore):
        self.keys = keys

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

    def take(self, rows: np.ndarray) -> "Batch":
        """Rows ``rows``, their token pairs cut to the widest of them."""
        tokens = self.tokens[rows]
        widest = int((tokens >= 0).sum(axis=1).max(initial=0))
        return Batch(self.states[rows], tokens[:, :widest], self.probs[rows][:, :widest], self.remainder[rows],
                     self.next_token[rows])


def stack(parts: list[Batch]) -> Batch:
    """The rows of ``parts`` in order, token pairs padded with (-1, 0) to the widest part's width."""
    widest = max(part.tokens.shape[1] for part in parts)

    def padded(array: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(array, ((0, 0), (0, widest - array.shape[1])), constant_values=fill)

    return Batch(np.concatenate([p.states for p in parts]), np.concatenate([padded(p.tokens, -1) for p in parts]),
                 np.concatenate([padded(p.probs, 0) for p in parts]), np.concatenate([p.remainder for p in parts]),
                 np.concatenate([p.next_token for p in parts]))


class MemoryRows:
    """Shuffled batches over all rows of the train targets."""

    def __init__(self, states, values: KeyStore, distributions: DistributionStore, chunk_rows: int,
                 buffer_chunks: int, seed: int):
        self.states, self.values, self.distributions = states, values, distributions
        self.n_rows = distributions.rows.n_rows
        self.chunk_rows, self.buffer_chunks, self.seed = chunk_rows, buffer_chunks, seed
        self.n_chunks = -(-self.n_rows // chunk_rows)

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows)

    def _buffers(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        return [order[i:i + self.buffer_chunks] for i in range(0, self.n_chunks, self.buffer_chunks)]

    def _read(self, chunks: np.ndarray) -> Batch:
        """All rows of ``chunks`` (each read sequentially, cut to its widest row), in chunk order."""
        parts = []
        for chunk in chunks:
            start, stop = self._chunk_rows(int(chunk))
            tokens, probs, truncated = self.distributions.ragged(start, stop)
            parts.append(Batch(self.states(start, stop), tokens, probs.astype(np.float32),
                               truncated.astype(np.float32), self.values.vals(start, stop).astype(np.int64)))
        return stack(parts)

    def batches(self, first_step: int, batch_size: int) -> Iterator[Batch]:
        """Batches from step ``first_step`` on, endlessly (epoch after epoch)."""
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
                data = self._read(chunks)
                while len(rows):
                    take, rows = rows[:batch_size - filled], rows[batch_size - filled:]
                    pending.append(data.take(take))
                    filled += len(take)
                    if filled == batch_size:
                        yield stack(pending)
                        pending, filled = [], 0
            epoch += 1
