"""index.factory auto: exact Flat for small datastores, else IVF-PQ sized by N and d (DESIGN §3)."""
from __future__ import annotations

import math

import pytest

from memforge.pipelines.faiss_index import build_empty, ivf_of, resolve_factory
from memforge.storage.params import IndexParams

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n_rows, dim", [(250_000, 128), (10_000_000, 1024), (100_000_000, 4096)])
def test_auto_factory_follows_the_rules_of_thumb(n_rows, dim):
    factory = resolve_factory(IndexParams(), n_rows, dim)
    index = build_empty(factory, dim)
    nlist = ivf_of(index).nlist
    assert 4 * math.sqrt(n_rows) <= nlist <= 16 * math.sqrt(n_rows) and nlist & (nlist - 1) == 0
    assert factory.startswith("OPQ") == (dim > 1024)
    assert index.d == dim and not index.is_trained


def test_auto_factory_is_exact_below_the_threshold():
    assert resolve_factory(IndexParams(flat_threshold=1000), 999, 64) == "Flat"
    assert resolve_factory(IndexParams(factory="IVF16,PQ8"), 10, 64) == "IVF16,PQ8"


# Run in a child process (its fds 1 and 2 are pipes): a thread writes numbered lines to fd 1 while the main
# thread merges the shards on disk and opens the merged index again and again.
CHATTER = """
import os, sys, threading
from memforge.pipelines import faiss_index, ondisk_merge
root, stop, count = sys.argv[1], threading.Event(), [0]
def chatter():
    while not stop.is_set():
        os.write(1, f"line {count[0]}\\n".encode())
        count[0] += 1
thread = threading.Thread(target=chatter)
thread.start()
ondisk_merge.merge_in_child(root, ["00000", "00001"])
for _ in range(300):
    index = faiss_index.read_merged(root)
stop.set()
thread.join()
faiss_index.set_nprobe(index, 8)
os.write(2, f"searched {index.search(faiss_index.np.eye(16, dtype='float32')[:1], 1)[1][0, 0] >= 0}\\n".encode())
"""


def test_on_disk_merge_and_read_leave_every_threads_stdout_alone(tmp_path):
    """Merging shards on disk and opening the merged index (FAISS prints to the C stdout in both) never
    touch the process's stdout: another thread writing meanwhile keeps all its lines on stdout, and
    nothing else reaches it."""
    import subprocess
    import sys

    import faiss
    import numpy as np

    from memforge.pipelines import faiss_index

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(2000, 16)).astype(np.float32)
    trained = build_empty("IVF8,Flat", 16)
    trained.train(keys)
    faiss_index.write(trained, str(tmp_path / faiss_index.TRAINED))
    for shard, rows in enumerate(np.array_split(np.arange(2000), 2)):
        part = faiss.clone_index(trained)
        part.add_with_ids(keys[rows], rows.astype(np.int64))
        faiss_index.write(part, str(tmp_path / faiss_index.shard_file(f"{shard:05d}")))
    done = subprocess.run([sys.executable, "-c", CHATTER, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"line {i}" for i in range(len(lines))], "every line the thread wrote, in order, nothing else"
    assert "resizing" in done.stderr and "line " not in done.stderr and "searched True" in done.stderr


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4"])
def test_a_querys_search_does_not_depend_on_its_block_or_the_threads(tmp_path, factory):
    """FAISS computes a block of 2000 queries at d 64 as one BLAS product, and a lone query on 2 threads by
    splitting the database: other float bits for the same query (and with them the order of near ties).
    The index's search gives a query the same distances and ids in a block of 2000, of 7 or alone, on 1
    or 2 threads, and leaves FAISS's BLAS switch as it was."""
    import faiss
    import numpy as np

    from memforge.pipelines.faiss_index import shard_file, write
    from memforge.pipelines.sharded_index import ShardedIndex

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(10_000, 64)).astype(np.float16).astype(np.float32)
    index = build_empty(factory, 64)
    index.train(keys)
    index.add_with_ids(keys, np.arange(len(keys)))
    write(index, str(tmp_path / shard_file("00000")))
    searcher = ShardedIndex(str(tmp_path), "", ["00000"], 16, merged=False)
    queries = keys[:2002] + np.float32(0.01)
    threshold, threads = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        whole = searcher.search(queries, 32)
        for block in (7, 1):
            parts = [searcher.search(queries[start:start + block], 32) for start in range(0, 420, block)]
            for got, expected in zip((np.concatenate(p) for p in zip(*parts)), whole):
                np.testing.assert_array_equal(got, expected[:420])
        faiss.omp_set_num_threads(1)
        for got, expected in zip(searcher.search(queries, 32), whole):
            np.testing.assert_array_equal(got, expected)
    finally:
        faiss.omp_set_num_threads(threads)
    assert faiss.cvar.distance_compute_blas_threshold == threshold
