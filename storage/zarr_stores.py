"""Zarr stores that hash every object on its way out and, on local disks, make it durable before returning.

A shard's marker records its files' checksums and is written only after its data: with these stores the
checksums come from the bytes written (nothing is read back to hash it, which on an object store would
double the traffic), and a local file is fsynced, renamed into place and its directory fsynced before the
marker can name it, so "marker present" means "data durable" also across a power loss.
"""
from __future__ import annotations

import asyncio

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import FsspecStore, LocalStore

from memforge.storage import fs
from memforge.storage.extras import missing_filesystem


class _Checksums:
    """The checksums of the objects written through this store, by key, until taken."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: dict[str, str] = {}

    def take_checksum(self, key: str) -> str:
        """The checksum of ``key``'s last write through this store (forgotten once taken)."""
        return self.written.pop(key)


class DurableLocalStore(_Checksums, LocalStore):
    """LocalStore whose writes go through ``fs.write_bytes_atomic``: temp file, fsync, rename, fsync of the
    directory; each object's checksum is taken from the bytes written."""

    async def set(self, key: str, value: Buffer) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        data = value.as_buffer_like()
        self.written[key] = await asyncio.to_thread(fs.write_bytes_atomic, str(self.root / key), data)


class HashingFsspecStore(_Checksums, FsspecStore):
    """FsspecStore (object stores: one PUT publishes an object whole) that records each object's checksum."""

    async def set(self, key: str, value: Buffer, byte_range: tuple[int, int] | None = None) -> None:
        await super().set(key, value, byte_range)
        self.written[key] = fs.checksum_of(value.as_buffer_like())


def zarr_store(uri: str) -> Store:
    """A Zarr store for a local path or an fsspec URL."""
    uri = fs.normalize(uri)
    if fs.is_local(uri):
        return DurableLocalStore(uri)
    try:
        return HashingFsspecStore.from_url(uri)
    except ImportError as exc:
        raise missing_filesystem(uri, exc) from None
