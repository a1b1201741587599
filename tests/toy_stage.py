"""A tiny deterministic "keys" stage used only by tests; it drives the real artifact API.

Run as a script: ``python tests/toy_stage.py OUT_URI --seed S --rows N [--rebuild] [--die-after K] [--sleep S]``
prints one JSON line with the result; ``--die-after K`` SIGKILLs the process after K shards; ``--sleep S``
waits S seconds after each shard (a slow writer).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time

import numpy as np

from memforge.storage.artifact import ArtifactBuild
from memforge.storage.stores import KeyStore

DIM = 16
VOCAB = 1000
CHUNK_ROWS = 64
SHARD_CHUNKS = 2


def shard_data(seed: int, shard_id: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys (float16) and vals (int32) of one shard, a pure function of (seed, shard id)."""
    rng = np.random.default_rng((seed, shard_id))
    keys = rng.standard_normal((n_rows, DIM)).astype(np.float16)
    vals = rng.integers(0, VOCAB, size=n_rows, dtype=np.int32)
    return keys, vals


def run(uri: str, seed: int, rows: int, rebuild: bool | str = False, die_after: int | None = None,
        sleep: float = 0.0) -> dict:
    """Build (or resume) the toy keys artifact at ``uri``; return skipped/written/up_to_date."""
    build = ArtifactBuild.begin(uri, "keys", {"seed": seed, "rows": rows}, rebuild=rebuild)
    if build.up_to_date:
        return {"skipped": 0, "written": 0, "up_to_date": True}
    try:
        store = KeyStore.create(uri, rows, dim=DIM, dtype="float16", chunk_rows=CHUNK_ROWS, shard_chunks=SHARD_CHUNKS)
        plan = build.plan(store.rows.plan())
        pending = build.pending(plan)
        written = 0
        for shard in pending:
            keys, vals = shard_data(seed, shard.id, shard.rows)
            files = store.write_shard(shard, keys, vals)
            build.markers.mark_done(shard, files)
            time.sleep(sleep)
            written += 1
            if die_after is not None and written >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        build.publish(counts={"rows": rows, "vocab_size": VOCAB}, arrays=store.rows.describe())
    finally:
        build.release()  # a failed build gives up its lease, as the executor's do
    return {"skipped": len(plan.shards) - len(pending), "written": written, "up_to_date": False}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("uri")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    print(json.dumps(run(args.uri, args.seed, args.rows, rebuild=args.rebuild, die_after=args.die_after,
                         sleep=args.sleep)))


if __name__ == "__main__":
    _main()
