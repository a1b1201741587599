"""Durability order and hashing on the way out: a shard's data files are fsynced and renamed into place
before its marker, every marker before the manifest, and no written data file is read back to hash it."""
from __future__ import annotations

import json
import os

import pytest

from memforge.storage import fs
from memforge.storage.shards import MARKERS_DIR
from memforge.storage.verify import verify

import toy_stage

pytestmark = pytest.mark.unit


def test_data_is_durable_before_its_marker_and_markers_before_the_manifest(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace, checksum = os.fsync, os.replace, fs.file_checksum
    durable: set[str] = set()  # temp files fsynced so far

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        durable.add(os.readlink(f"/proc/self/fd/{fd}"))

    def recording_replace(src, dst) -> None:
        replace(src, dst)
        events.append(("durable" if os.fspath(src) in durable else "not fsynced", os.fspath(dst)))

    hashed: list[str] = []

    def recording_checksum(uri: str) -> str:
        hashed.append(uri)
        return checksum(uri)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(fs, "file_checksum", recording_checksum)
    uri = tmp_path / "keys"
    toy_stage.run(str(uri), seed=0, rows=500)

    order = [dst for _, dst in events]
    assert all(state == "durable" for state, _ in events), [e for e in events if e[0] != "durable"]
    markers = sorted((uri / MARKERS_DIR).glob("*.json"))
    assert len(markers) == 4
    data_files = 0
    for marker in markers:
        marker_at = order.index(str(marker))
        for rel in json.loads(marker.read_text())["files"]:
            assert order.index(str(uri / rel)) < marker_at, f"{rel} renamed into place after its marker"
            data_files += 1
    assert data_files == 2 * 4, "two arrays (keys, vals), one file each per shard"
    assert order[-1] == str(uri / "_manifest.json"), "the manifest comes last"
    read_back = [hashed_uri for hashed_uri in hashed if "/c/" in hashed_uri]
    assert read_back == [], f"data files read back to hash them: {read_back}"
    assert verify(str(uri)) == []
