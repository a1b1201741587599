"""Merge an IVF index's shards into one on-disk index (FAISS's ``merge_ondisk``), run as a child process.

FAISS prints progress ("resizing <file> to <n> bytes") to the C ``stdout``, which only a swap of file
descriptor 1 could catch, and that swap would take every other thread's output with it. In a child
process whose stdout is the parent's stderr, FAISS may print what it likes: memforge's stdout carries
only results. ``python -m pipelines.ondisk_merge CHECKSUMS_JSON INDEX_DIR SHARD_NAME...``

The checksums of the two files it writes come back through ``CHECKSUMS_JSON``: ``merged.index`` hashed on
its way out; ``merged.ivfdata``, which FAISS fills through a memory map, read once right after the merge
(from the page cache), so that publishing reads neither.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from memforge.pipelines import faiss_index
from memforge.pipelines.faiss_build import faiss
from memforge.storage import fs
from memforge.storage.errors import MemforgeError


def merge(root: str, shard_names: list[str]) -> dict[str, str]:
    """Merge the shards' inverted lists into ``merged.ivfdata`` and write ``merged.index`` (last), which names
    its data file without a directory: the artifact stays relocatable and its bytes do not depend on where
    it was built. Returns the checksums of both files."""
    from faiss.contrib.ondisk import merge_ondisk

    trained = faiss_index.read(fs.join(root, faiss_index.TRAINED))
    data = fs.join(root, faiss_index.MERGED_DATA)
    fs.remove_tree(data)  # debris of an interrupted merge
    merge_ondisk(trained, [fs.join(root, faiss_index.shard_file(name)) for name in shard_names], data)
    faiss.downcast_InvertedLists(faiss_index.ivf_of(trained).invlists).filename = faiss_index.MERGED_DATA
    return {faiss_index.MERGED_DATA: fs.file_checksum(data),
            faiss_index.MERGED: faiss_index.write(trained, fs.join(root, faiss_index.MERGED))}


def merge_in_child(root: str, shard_names: list[str]) -> dict[str, str]:
    """``merge`` in a child process whose stdout goes to this process's stderr; returns its checksums."""
    with tempfile.TemporaryDirectory() as scratch:
        checksums = os.path.join(scratch, "checksums.json")
        done = subprocess.run([sys.executable, "-m", __name__, checksums, root, *shard_names], check=False,
                              stdout=2)  # file descriptor 2 itself, whatever object sys.stderr is now
        if done.returncode != 0:
            raise MemforgeError(f"{root}: merging the index shards on disk failed (exit {done.returncode}; "
                                "FAISS's message is above)")
        with open(checksums) as handle:
            return json.load(handle)


if __name__ == "__main__":
    with open(sys.argv[1], "w") as out:
        json.dump(merge(sys.argv[2], sys.argv[3:]), out)
