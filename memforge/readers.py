"""Read keys, values and kNN targets of published artifacts as NumPy arrays and Arrow tables."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from memforge.artifacts import Artifact, open_artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.stores import DistributionStore, KeyStore

QUERIES_ROLE = "queries"  # the input of a targets artifact that holds its rows' query keys and next tokens


class Keys:
    """The datastore of a ``keys`` artifact: one hidden-state key and one next-token value per row.

    Row ``i`` is the same row in the index's ids, the neighbour ids and the targets built from it.
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.store = KeyStore.open(artifact.uri)

    def __len__(self) -> int:
        return self.store.rows.n_rows

    @property
    def dim(self) -> int:
        """Width of a key (the encoder's hidden size)."""
        return self.store.dim

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk: reads of whole chunks are the cheap ones."""
        return self.store.rows.array("vals").chunks[0]

    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Keys ``[stop - start, dim]`` of rows ``[start, stop)``, in the stored dtype (float32 for bfloat16)."""
        return self.store.keys(start, stop)

    def values(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Next-token ids (int32) of rows ``[start, stop)``."""
        return self.store.vals(start, stop)

    def take(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """Keys (float32) and values of the given rows, in any order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.store.take(rows), self.store.rows.array("vals").get_orthogonal_selection((rows,))

    def to_arrow(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``[start, stop)`` as a table: ``row`` (int64), ``key`` (fixed-size list), ``value`` (int32)."""
        keys = self.keys(start, stop)
        stop = start + len(keys)
        flat = pa.array(np.ascontiguousarray(keys).reshape(-1))
        return pa.table({"row": pa.array(np.arange(start, stop, dtype=np.int64)),
                         "key": pa.FixedSizeListArray.from_arrays(flat, self.dim),
                         "value": pa.array(self.values(start, stop))})


class Targets:
    """The kNN distributions of a ``targets`` artifact: per row, the tokens that carry the neighbours' mass
    with their probabilities (sorted by probability, padded with token -1 and probability 0), and the
    ``remainder``: the mass of the tokens beyond the stored width.

    When the artifact records its query keys (the ``queries`` input, a ``keys`` artifact of the same split),
    each row also has its query ``key`` and its ``next_token``: what the memory learns from.
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.store = DistributionStore.open(artifact.uri)
        queries = artifact.inputs.get(QUERIES_ROLE)
        self._queries_uri = queries
        self._queries: Keys | None = None

    def __len__(self) -> int:
        return self.store.rows.n_rows

    @property
    def width(self) -> int:
        """The most tokens a row keeps: the stored width (``targets.width``, or k when it is null)."""
        return self.store.width

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk: reads of whole chunks are the cheap ones."""
        return self.store.rows.array("truncated").chunks[0]

    @property
    def queries(self) -> Keys:
        """The ``keys`` artifact that holds these rows' query keys and next tokens."""
        if self._queries is None:
            if self._queries_uri is None:
                raise MemforgeError(f"{self.artifact.uri}: this targets artifact records no {QUERIES_ROLE!r} input")
            queries = Keys(open_artifact(self._queries_uri, "keys"))
            if len(queries) != len(self):
                raise MemforgeError(f"{self._queries_uri}: holds {len(queries)} rows, the targets "
                                    f"{self.artifact.uri} hold {len(self)}")
            self._queries = queries
        return self._queries

    @property
    def has_queries(self) -> bool:
        """Whether the artifact records its query keys (see `queries`)."""
        return self._queries_uri is not None

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids ``[rows, width]`` (int32, -1 = padding)."""
        return self.store.tokens(start, stop)

    def probs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Probabilities ``[rows, width]`` (float32; 0 where the token is padding)."""
        return self.store.probs(start, stop).astype(np.float32, copy=False)

    def remainder(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The probability mass of each row's tokens that are not stored (float32 ``[rows]``)."""
        return self.store.truncated(start, stop)

    def to_numpy(self, start: int = 0, stop: int | None = None, with_queries: bool | None = None) -> dict:
        """Rows ``[start, stop)`` as arrays: ``tokens``, ``probs``, ``remainder`` and, with the queries (default:
        when recorded), ``key`` and ``next_token``."""
        arrays = {"tokens": self.tokens(start, stop), "probs": self.probs(start, stop),
                  "remainder": self.remainder(start, stop)}
        if self.has_queries if with_queries is None else with_queries:
            arrays["key"] = self.queries.keys(start, stop)
            arrays["next_token"] = self.queries.values(start, stop)
        return arrays

    def to_arrow(self, start: int = 0, stop: int | None = None, with_queries: bool | None = None) -> pa.Table:
        """Rows ``[start, stop)`` as a table: ``row``, ``tokens`` and ``probs`` (lists without the padding),
        ``remainder`` and, with the queries, ``key`` (fixed-size list) and ``next_token``."""
        arrays = self.to_numpy(start, stop, with_queries)
        tokens, probs = arrays["tokens"], arrays["probs"]
        kept = tokens >= 0
        offsets = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32)
        rows = np.arange(start, start + len(tokens), dtype=np.int64)
        columns = {"row": pa.array(rows),
                   "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens[kept])),
                   "probs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs[kept])),
                   "remainder": pa.array(arrays["remainder"])}
        if "key" in arrays:
            key = np.ascontiguousarray(arrays["key"])
            columns["key"] = pa.FixedSizeListArray.from_arrays(pa.array(key.reshape(-1)), key.shape[1])
            columns["next_token"] = pa.array(arrays["next_token"])
        return pa.table(columns)

    def to_hf(self, start: int = 0, stop: int | None = None, with_queries: bool | None = None):
        """Rows ``[start, stop)`` as a Hugging Face ``datasets.Dataset`` (the columns of `to_arrow`); needs the
        ``hf`` extra."""
        from memforge.storage.extras import require

        datasets = require("datasets", "hf", "Targets.to_hf")
        return datasets.Dataset(self.to_arrow(start, stop, with_queries))

    def dataset(self, with_queries: bool | None = None):
        """A ``torch.utils.data.Dataset`` of these rows (see `memforge.TargetsDataset`)."""
        from memforge.datasets import TargetsDataset

        return TargetsDataset(self, with_queries)

    def iterable(self, with_queries: bool | None = None, shuffle: bool = False, seed: int = 0):
        """A ``torch.utils.data.IterableDataset`` that reads whole chunks (see `memforge.TargetsIterable`)."""
        from memforge.datasets import TargetsIterable

        return TargetsIterable(self, with_queries, shuffle, seed)


def read_keys(path: str) -> Keys:
    """Open the published ``keys`` artifact at ``path`` (e.g. ``artifacts/keys/train``) for reading."""
    return Keys(open_artifact(path, "keys"))


def read_targets(path: str) -> Targets:
    """Open the published ``targets`` artifact at ``path`` (e.g. ``artifacts/targets/train``) for reading."""
    return Targets(open_artifact(path, "targets"))
