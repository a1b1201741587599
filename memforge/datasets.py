"""kNN targets as PyTorch datasets: padded tensors of the stored tokens and probabilities, plus the
remainder mass, with each row's query key and next token when the targets record them."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def _sample(arrays: dict, index: int) -> dict:
    """One row of ``arrays`` as tensors: row, tokens (-1 = padding) and next_token int64, probs, remainder and
    key float32."""
    sample = {"row": torch.tensor(int(arrays["row"][index])),
              "tokens": torch.from_numpy(arrays["tokens"][index].astype(np.int64)),
              "probs": torch.from_numpy(np.asarray(arrays["probs"][index], dtype=np.float32)),
              "remainder": torch.tensor(float(arrays["remainder"][index]))}
    if "key" in arrays:
        sample["key"] = torch.from_numpy(np.asarray(arrays["key"][index], dtype=np.float32))
        sample["next_token"] = torch.tensor(int(arrays["next_token"][index]))
    return sample


class TargetsDataset(Dataset):
    """Map-style dataset of a targets artifact: ``dataset[i]`` is row ``i`` as a dict of tensors
    (``row``, ``tokens``, ``probs``, ``remainder`` and, with the queries, ``key`` and ``next_token``).

    A ``DataLoader`` fetches a batch with one read per stored chunk it touches; for a pass over many rows,
    `TargetsIterable` reads each chunk once.
    """

    def __init__(self, targets, with_queries: bool | None = None):
        """``targets``: a `memforge.Targets` (from `memforge.read_targets`); ``with_queries``: add each row's
        query key and next token (default: when the artifact records them)."""
        self.targets = targets
        self.with_queries = targets.has_queries if with_queries is None else with_queries

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The rows ``indices`` (any order), each stored chunk read once."""
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.targets.artifact.uri}: rows must lie in [0, {len(self)}), got {indices}")
        store = self.targets.store.rows
        arrays = {"row": rows, "tokens": store.array("tokens").get_orthogonal_selection((rows, slice(None))),
                  "probs": store.array("probs").get_orthogonal_selection((rows, slice(None))),
                  "remainder": store.array("truncated").get_orthogonal_selection((rows,))}
        if self.with_queries:
            arrays["key"], arrays["next_token"] = self.targets.queries.take(rows)
        return [_sample(arrays, i) for i in range(len(rows))]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


class TargetsIterable(IterableDataset):
    """Iterable dataset of a targets artifact: reads whole stored chunks, in order or in a seeded random
    chunk order (rows shuffled within each chunk), and yields rows as `TargetsDataset` does.

    Chunks are divided among ``DataLoader`` workers and among ``torch.distributed`` ranks, so each row is
    read once per pass across them all.
    """

    def __init__(self, targets, with_queries: bool | None = None, shuffle: bool = False, seed: int = 0):
        """``targets``: a `memforge.Targets`; ``shuffle``: a seeded random chunk order (another per
        `set_epoch`) and rows shuffled within each chunk."""
        self.targets = targets
        self.with_queries = targets.has_queries if with_queries is None else with_queries
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Another chunk order for each epoch (when shuffling)."""
        self.epoch = epoch

    def _chunks(self) -> list[int]:
        n_chunks = -(-len(self.targets) // self.targets.chunk_rows)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n_chunks) if self.shuffle
                 else np.arange(n_chunks))
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return [int(c) for c in order[rank * workers + worker_id::world * workers]]

    def __iter__(self):
        chunk_rows = self.targets.chunk_rows
        for chunk in self._chunks():
            start = chunk * chunk_rows
            arrays = self.targets.to_numpy(start, start + chunk_rows, self.with_queries)
            count = len(arrays["tokens"])
            arrays["row"] = np.arange(start, start + count)
            order = (np.random.default_rng([self.seed, self.epoch, chunk]).permutation(count) if self.shuffle
                     else range(count))
            for index in order:
                yield _sample(arrays, int(index))
