"""Row-aligned Zarr v3 arrays: created once with their final shape, written in whole shards.

Each array's first axis is the global row id. Arrays use Zarr's sharding codec with one
Zarr shard per plan shard, so a plan shard is exactly one file per array and two workers
never touch the same file (partial writes to a shared Zarr shard lose data under concurrency).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from memforge.storage import fs
from memforge.storage.artifact import read_manifest
from memforge.storage.errors import ArtifactError
from memforge.storage.headers import zarr_header
from memforge.storage.shards import Shard, ShardPlan
from memforge.storage.zarr_stores import zarr_store

# Not persisted by Zarr: applied each time an array is opened, so every shard has its file.
_WRITE_CONFIG = {"write_empty_chunks": True}
# Compressors by name: zstd compresses float keys best; Blosc-LZ4 with bit shuffling is faster and smaller
# for integer ids, distances and sparse probabilities (neighbours at k 1024: 4.4 KB/row at 1.3 GB/s, where
# byte shuffling gave 4.8 KB/row at 0.9 GB/s).
COMPRESSORS = {
    "zstd": lambda: ZstdCodec(level=0),
    "lz4-bitshuffle": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}


@dataclass(frozen=True)
class ArraySpec:
    """One row-aligned array: name, stored dtype, shape of one row, fill value, compressor name."""

    name: str
    dtype: str
    row_shape: tuple[int, ...] = ()
    fill_value: float | int = 0
    compressor: str = "zstd"


def shard_geometry(n_rows: int, chunk_rows: int, shard_chunks: int) -> tuple[int, int]:
    """(chunk rows, Zarr shard rows) for an array of ``n_rows``: small arrays get one smaller shard."""
    chunk = min(chunk_rows, max(n_rows, 1))
    return chunk, chunk * min(shard_chunks, -(-max(n_rows, 1) // chunk))


def _group_exists(uri: str) -> bool:
    return fs.exists(fs.join(uri, "zarr.json"))


class ZarrRows:
    """A Zarr group of row-aligned arrays (see module doc)."""

    def __init__(self, root: str, sub: str, group: zarr.Group):
        self.root = fs.normalize(root)
        self.sub = sub.strip("/")
        self.uri = fs.join(self.root, self.sub)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads the array's zarr.json

    @classmethod
    def create(cls, root: str, specs: list[ArraySpec], n_rows: int, chunk_rows: int, shard_chunks: int,
               sub: str = "", attrs: dict | None = None) -> "ZarrRows":
        """Create the arrays once with their final shape; on resume, open them and check they match.

        Zarr shards hold ``shard_chunks`` chunks of ``chunk_rows`` rows (fewer for small arrays).
        """
        uri = fs.join(root, sub)
        if _group_exists(uri):
            store = cls.open(root, sub, writable=True)
            for spec in specs:
                store._check(spec, n_rows)
            return store
        chunk, shard = shard_geometry(n_rows, chunk_rows, shard_chunks)
        group = zarr.open_group(zarr_store(uri), mode="a", attributes=attrs or {})
        for spec in specs:
            group.create_array(
                spec.name,
                shape=(n_rows, *spec.row_shape),
                chunks=(chunk, *spec.row_shape),
                shards=(shard, *spec.row_shape),
                dtype=spec.dtype,
                fill_value=spec.fill_value,
                compressors=[COMPRESSORS[spec.compressor]()],
            )
        return cls(root, sub, group)

    @classmethod
    def open(cls, root: str, sub: str = "", writable: bool = False) -> "ZarrRows":
        """Open an existing group: read-only (published artifacts only) or ``r+`` for its writers; never ``w``."""
        uri = fs.join(root, sub)
        if not writable:
            read_manifest(root)
        if not _group_exists(uri):
            raise ArtifactError(f"{uri}: no Zarr group here (zarr.json missing)")
        return cls(root, sub, zarr.open_group(zarr_store(uri), mode="r+" if writable else "r"))

    def _check(self, spec: ArraySpec, n_rows: int) -> None:
        array = self.array(spec.name)
        expected = (n_rows, *spec.row_shape)
        if array.shape != expected or str(array.dtype) != spec.dtype:
            raise ArtifactError(
                f"{self.uri}/{spec.name}: existing array is {array.shape} {array.dtype}, "
                f"expected {expected} {spec.dtype}; pass --rebuild to discard it"
            )

    def array(self, name: str) -> zarr.Array:
        """Array ``name``; it writes shards even when they hold only the fill value (a file per shard). Metadata
        Zarr cannot parse, and data types or codecs memforge never writes (``headers.zarr_header``), are refused
        naming the array before any of its data is read."""
        if name not in self._arrays:
            try:
                array = self.group[name]
            except KeyError:
                raise ArtifactError(f"{self.uri}: array {name!r} missing") from None
            except (ValueError, TypeError) as exc:
                raise ArtifactError(f"{self.uri}/{name}: unreadable Zarr metadata ({exc})") from None
            zarr_header(array.metadata.to_dict(), f"{self.uri}/{name}")
            self._arrays[name] = array.with_config(_WRITE_CONFIG)
        return self._arrays[name]

    @property
    def n_rows(self) -> int:
        return next(iter(self.group.arrays()))[1].shape[0]

    def unit_rows(self, name: str | None = None) -> int:
        """Rows per storage file (Zarr shard) of array ``name``, or the largest over all arrays."""
        if name is None:
            return max(self.unit_rows(n) for n, _ in self.group.arrays())
        array = self.array(name)
        return (array.shards or array.chunks)[0]

    def plan(self) -> ShardPlan:
        """The shard plan whose shards are whole storage files of every array."""
        return ShardPlan.even(self.n_rows, self.unit_rows())

    def files_of(self, name: str, shard: Shard) -> list[str]:
        """Paths (relative to the artifact root) of the storage files holding ``shard``'s rows of ``name``."""
        array = self.array(name)
        unit = self.unit_rows(name)
        first, last = shard.start // unit, (shard.stop - 1) // unit
        zeros = (0,) * (array.ndim - 1)
        prefix = f"{self.sub}/{name}" if self.sub else name
        return [f"{prefix}/{array.metadata.encode_chunk_key((i, *zeros))}" for i in range(first, last + 1)]

    def write_shard(self, shard: Shard, columns: dict[str, np.ndarray]) -> dict[str, str]:
        """Write all arrays' rows of ``shard`` (whole storage files only); return their checksums."""
        files = {}
        for name, values in columns.items():
            array = self.array(name)
            unit = self.unit_rows(name)
            if shard.start % unit or (shard.stop % unit and shard.stop != array.shape[0]):
                raise ArtifactError(
                    f"{self.uri}/{name}: shard {shard.name} rows [{shard.start}, {shard.stop}) are not "
                    f"aligned to the array's {unit}-row storage units"
                )
            if values.shape != (shard.rows, *array.shape[1:]):
                raise ArtifactError(
                    f"{self.uri}/{name}: shard {shard.name} got shape {values.shape}, "
                    f"expected {(shard.rows, *array.shape[1:])}"
                )
            array[shard.start:shard.stop] = values.astype(array.dtype, copy=False)
            for rel in self.files_of(name, shard):  # hashed as they were written: nothing is read back
                files[rel] = self.group.store.take_checksum(rel[len(self.sub) + 1:] if self.sub else rel)
        return files

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.array(name)[start:stop]

    def describe(self) -> dict[str, dict]:
        """Shape, dtype, chunk and shard sizes of every array (what manifests record)."""
        prefix = f"{self.sub}/" if self.sub else ""
        return {
            prefix + name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                   "shards": list(a.shards) if a.shards else None}
            for name, a in sorted(self.group.arrays())
        }
