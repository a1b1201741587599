"""One split of the token store as a token stream for training and evaluation.

Parts are read whole (a Parquet part is a few hundred KB) and the most recently used ones kept,
so neither training nor evaluation holds the corpus in memory. Random training blocks are a
function of (seed, step, micro-step): a resumed run reads exactly the blocks it would have read.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from memforge.storage.artifact import Artifact
from memforge.storage.stores import PartOffsets, TokenStore


class TokenStream:
    """Tokens ``[0, n_tokens)`` of one split, with the documents' end-of-text tokens in between."""

    def __init__(self, tokens: Artifact, split: str, cached_parts: int = 16):
        self.reader = TokenStore(tokens.uri, split)
        self.offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"][split]["parts"])
        self.n_tokens = self.offsets.total_rows
        self.cached_parts = cached_parts
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _part(self, name: str, rows: int) -> np.ndarray:
        if name in self._cache:
            self._cache.move_to_end(name)
        else:
            self._cache[name] = self.reader.read_shard(name, rows, ["token"]).column("token").to_numpy()
            if len(self._cache) > self.cached_parts:
                self._cache.popitem(last=False)
        return self._cache[name]

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as int64."""
        pieces = [self._part(name, last - first)[max(start, first) - first:min(stop, last) - first]
                  for name, first, last in self.offsets.covering(start, stop)]
        return np.concatenate(pieces).astype(np.int64)

    def random_blocks(self, seed: int, step: int, micro: int, count: int, length: int, rank: int = 0,
                      world_size: int = 1) -> np.ndarray:
        """Of the ``count`` blocks of ``length`` tokens at positions drawn from (seed, step, micro), those of
        ``rank`` (every ``world_size``-th, so the ranks together read each block once)."""
        if self.n_tokens < length:
            raise ValueError(f"the split has {self.n_tokens} tokens, fewer than one block of {length}")
        starts = np.random.default_rng([seed, step, micro]).integers(0, self.n_tokens - length + 1, count)
        return np.stack([self.slice(int(s), int(s) + length) for s in np.sort(starts)[rank::world_size]])

    def blocks(self, length: int):
        """Consecutive blocks of ``length`` tokens overlapping by one (each token is predicted once),
        the last one shorter; yields (first token position, tokens)."""
        for start in range(0, max(1, self.n_tokens - 1), length - 1):
            block = self.slice(start, min(start + length, self.n_tokens))
            if len(block) > 1:
                yield start, block

    def counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the split (streamed part by part)."""
        total = np.zeros(vocab_size, dtype=np.int64)
        for name, first, last in self.offsets.parts:
            total += np.bincount(self._part(name, last - first), minlength=vocab_size)[:vocab_size]
        return total
