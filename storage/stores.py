"""Typed stores: tokens (Parquet), keys, neighbours and distributions (Zarr v3).

Zarr stores are created once with their final shape by the driver, then written one whole
plan shard at a time by workers; readers take row ranges. bfloat16 keys are stored as their
raw 16-bit patterns (``uint16``, attribute ``key_dtype: bfloat16``) since numpy has no bfloat16.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memforge.storage import fs
from memforge.storage.artifact import read_manifest
from memforge.storage.errors import ArtifactError
from memforge.storage.shards import Shard
from memforge.storage.zarr_rows import ArraySpec, ZarrRows

KEY_DTYPES = ("float16", "float32", "bfloat16")
TOKENIZER_DIR = "tokenizer"  # the token store's tokenizer (HF directory) inside the tokens artifact
PROB_DTYPES = ("float32", "float16")


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class KeyStore:
    """Datastore keys ``[N, d]`` (float16 default, float32, bfloat16) and int32 next-token values ``[N]``."""

    def __init__(self, rows: ZarrRows):
        self.rows = rows
        self.key_dtype = rows.group.attrs.get("key_dtype", str(rows.array("keys").dtype))

    @classmethod
    def create(cls, root: str, n_rows: int, dim: int, dtype: str = "float16", chunk_rows: int = 4096,
               shard_chunks: int = 8, sub: str = "datastore.zarr") -> "KeyStore":
        if dtype not in KEY_DTYPES:
            raise ArtifactError(f"key dtype {dtype!r} not supported (choose from {', '.join(KEY_DTYPES)})")
        specs = [ArraySpec("keys", "uint16" if dtype == "bfloat16" else dtype, (dim,)), ArraySpec("vals", "int32")]
        return cls(ZarrRows.create(root, specs, n_rows, chunk_rows, shard_chunks, sub, {"key_dtype": dtype}))

    @classmethod
    def open(cls, root: str, sub: str = "datastore.zarr", writable: bool = False) -> "KeyStore":
        return cls(ZarrRows.open(root, sub, writable))

    @property
    def dim(self) -> int:
        return self.rows.array("keys").shape[1]

    def write_shard(self, shard: Shard, keys: np.ndarray, vals: np.ndarray) -> dict[str, str]:
        """Write one shard; keys non-finite in the stored dtype (NaN, inf, float16 overflow) are
        refused naming the shard and the global row."""
        if self.key_dtype == "bfloat16":
            stored = bfloat16_bits(keys)
            finite = np.isfinite(bfloat16_to_float32(stored))
        else:
            stored = np.asarray(keys).astype(self.key_dtype, copy=False)
            finite = np.isfinite(stored)
        bad = np.flatnonzero(~finite.reshape(len(stored), -1).all(axis=1))
        if bad.size:
            raise ArtifactError(
                f"{self.rows.uri}: shard {shard.name} has key values that are not finite as {self.key_dtype} "
                f"at global row {shard.start + int(bad[0])} ({bad.size} rows in all)"
            )
        return self.rows.write_shard(shard, {"keys": stored, "vals": np.asarray(vals)})

    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Keys of rows ``[start, stop)``: stored dtype, or float32 for bfloat16 stores."""
        raw = self.rows.read("keys", start, stop)
        return bfloat16_to_float32(raw) if self.key_dtype == "bfloat16" else raw

    def vals(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("vals", start, stop)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Keys (float32) of rows ``rows`` (any order, repeats allowed); Zarr reads only the chunks that hold them."""
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        raw = self.rows.array("keys").get_orthogonal_selection((unique, slice(None)))
        raw = bfloat16_to_float32(raw) if self.key_dtype == "bfloat16" else raw.astype(np.float32)
        return raw[inverse]


def neighbour_id_dtype(datastore_rows: int) -> str:
    """The smallest integer type that holds every datastore row id and -1."""
    return "int32" if datastore_rows <= np.iinfo(np.int32).max else "int64"


class NeighbourStore:
    """k nearest neighbours per query row: global ids (int32 when the datastore allows, else int64; -1 = none)
    and squared L2 distances (float32)."""

    def __init__(self, rows: ZarrRows):
        self.rows = rows

    @classmethod
    def create(cls, root: str, n_rows: int, k: int, chunk_rows: int = 4096, shard_chunks: int = 8,
               sub: str = "neighbours.zarr", ids_dtype: str = "int64") -> "NeighbourStore":
        specs = [ArraySpec("ids", ids_dtype, (k,), -1, "lz4-bitshuffle"),
                 ArraySpec("dists", "float32", (k,), np.inf, "lz4-bitshuffle")]
        return cls(ZarrRows.create(root, specs, n_rows, chunk_rows, shard_chunks, sub))

    @classmethod
    def open(cls, root: str, sub: str = "neighbours.zarr", writable: bool = False) -> "NeighbourStore":
        return cls(ZarrRows.open(root, sub, writable))

    @property
    def k(self) -> int:
        return self.rows.array("ids").shape[1]

    def write_shard(self, shard: Shard, ids: np.ndarray, dists: np.ndarray) -> dict[str, str]:
        return self.rows.write_shard(shard, {"ids": ids, "dists": dists})

    def ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("ids", start, stop)

    def dists(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("dists", start, stop)


class DistributionStore:
    """Sparse kNN distributions, ragged: each row keeps its own number of (token id int32, probability) pairs
    (those the targets' keep rule kept), sorted by probability descending, plus the probability mass not kept
    (``truncated``). Stored at a fixed width (the rule's cap) padded with (-1, 0): the arrays keep their final
    shape from creation and whole-chunk writes, and bit-shuffled LZ4 stores the padding in almost nothing."""

    def __init__(self, rows: ZarrRows):
        self.rows = rows

    @classmethod
    def create(cls, root: str, n_rows: int, width: int, probs_dtype: str = "float32", chunk_rows: int = 4096,
               shard_chunks: int = 8, sub: str = "distributions.zarr") -> "DistributionStore":
        if probs_dtype not in PROB_DTYPES:
            raise ArtifactError(f"probability dtype {probs_dtype!r} not supported ({', '.join(PROB_DTYPES)})")
        specs = [ArraySpec("tokens", "int32", (width,), -1, "lz4-bitshuffle"),
                 ArraySpec("probs", probs_dtype, (width,), 0, "lz4-bitshuffle"),
                 ArraySpec("truncated", "float32", (), 0, "lz4-bitshuffle")]
        return cls(ZarrRows.create(root, specs, n_rows, chunk_rows, shard_chunks, sub))

    @classmethod
    def open(cls, root: str, sub: str = "distributions.zarr", writable: bool = False) -> "DistributionStore":
        return cls(ZarrRows.open(root, sub, writable))

    @property
    def width(self) -> int:
        """The most tokens a row can keep (the stored arrays' width)."""
        return self.rows.array("tokens").shape[1]

    def write_shard(self, shard: Shard, tokens: np.ndarray, probs: np.ndarray,
                    truncated: np.ndarray) -> dict[str, str]:
        return self.rows.write_shard(shard, {"tokens": tokens, "probs": probs, "truncated": truncated})

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("tokens", start, stop)

    def probs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("probs", start, stop)

    def truncated(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.rows.read("truncated", start, stop)

    def ragged(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, probs, truncated) of rows ``[start, stop)``, the pairs cut to the widest of those rows (a row's
        padding comes after its tokens, so nothing kept is lost): what a reader holds is the rows' own size, not
        the store's width."""
        tokens, probs = self.tokens(start, stop), self.probs(start, stop)
        widest = int((tokens >= 0).sum(axis=1).max(initial=0))
        return tokens[:, :widest].copy(), probs[:, :widest].copy(), self.truncated(start, stop)


TOKEN_SCHEMA = pa.schema([("token", pa.int32()), ("doc", pa.int64())])


class TokenStore:
    """Tokenized corpus (one split) as Parquet parts, one per work shard holding any number of rows:
    token id and document id. Global row offsets of the parts are recorded
    by the stage (``PartOffsets``) once all parts are written."""

    def __init__(self, root: str, sub: str = "parts"):
        self.root = fs.normalize(root)
        self.sub = sub.strip("/")

    @classmethod
    def open(cls, root: str, sub: str = "parts") -> "TokenStore":
        """A reader over a published token artifact (refuses unpublished ones)."""
        read_manifest(root)
        return cls(root, sub)

    def part(self, shard: Shard | str) -> str:
        """Path of a shard's part relative to the artifact root."""
        name = f"part-{shard if isinstance(shard, str) else shard.name}.parquet"
        return f"{self.sub}/{name}" if self.sub else name

    def write_shard(self, shard: Shard, tokens: np.ndarray, docs: np.ndarray) -> dict[str, str]:
        """Write one part atomically; return its checksum."""
        if len(tokens) != len(docs):
            raise ArtifactError(f"{fs.join(self.root, self.part(shard))}: token and doc columns differ "
                                f"in length ({len(tokens)}, {len(docs)})")
        table = pa.table({"token": np.asarray(tokens, np.int32), "doc": np.asarray(docs, np.int64)},
                         schema=TOKEN_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        rel = self.part(shard)
        return {rel: fs.write_bytes_atomic(fs.join(self.root, rel), buffer.getbuffer())}

    def read_shard(self, shard: Shard | str, rows: int | None = None, columns: list[str] | None = None) -> pa.Table:
        """One part, with its schema (and row count, when given) checked; a damaged file names itself."""
        uri = fs.join(self.root, self.part(shard))
        filesystem, path = fs.filesystem(uri)
        try:
            table = pq.read_table(path, filesystem=filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"{uri}: unreadable Parquet part: {exc}") from None
        if table.schema != TOKEN_SCHEMA or (rows is not None and table.num_rows != rows):
            expected = f"{rows} rows" if rows is not None else "rows"
            raise ArtifactError(
                f"{uri}: expected {expected} of {TOKEN_SCHEMA}, found {table.num_rows} rows of {table.schema}"
            )
        return table.select(columns) if columns else table

    def read_rows(self, offsets: "PartOffsets", start: int, stop: int, column: str = "token") -> np.ndarray:
        """Rows ``[start, stop)`` of the split's global row space, reading only the parts they touch."""
        pieces = []
        for name, first, last in offsets.covering(start, stop):
            values = self.read_shard(name, last - first, [column]).column(column).to_numpy()
            pieces.append(values[max(start, first) - first:min(stop, last) - first])
        return np.concatenate(pieces) if pieces else np.zeros(0, TOKEN_SCHEMA.field(column).type.to_pandas_dtype())


@dataclass(frozen=True)
class PartOffsets:
    """Global row range of each Parquet part of a token split: ``(shard name, start, stop)``, in order."""

    parts: tuple[tuple[str, int, int], ...]

    @classmethod
    def from_counts(cls, counts: list[tuple[str, int]]) -> "PartOffsets":
        parts, start = [], 0
        for name, rows in counts:
            parts.append((name, start, start + rows))
            start += rows
        return cls(tuple(parts))

    @classmethod
    def from_json(cls, data: list) -> "PartOffsets":
        return cls(tuple((str(n), int(a), int(b)) for n, a, b in data))

    def to_json(self) -> list:
        return [list(p) for p in self.parts]

    @property
    def total_rows(self) -> int:
        return self.parts[-1][2] if self.parts else 0

    def covering(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """Non-empty parts that overlap rows ``[start, stop)``."""
        first = bisect.bisect_right([p[2] for p in self.parts], start)
        return [p for p in self.parts[first:] if p[1] < stop and p[2] > p[1]]
