"""Measuring tools every bench part shares: peak memory of a process tree, bytes on disk, the order of timed
variants, and how a figure's method note is written. Imports no other part of ``memforge.bench``."""
from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from memforge.storage import fs


class Note(NamedTuple):
    """What a figure measures (one line), and for a ratio the two figures it divides (numerator, denominator)."""
    what: str
    ratio_of: tuple[str, str] | None = None


class PartRun(NamedTuple):
    """One bench part's figures and the wall seconds the part took."""
    figures: dict
    seconds: float


class PeakMemory(NamedTuple):
    """Peaks of a command's process tree, summed over its processes (bytes), and its wall time."""
    rss: int  # resident set: private memory plus the file pages mapped in (memory-mapped stores, indexes)
    private: int  # resident minus shared (file-backed and shared-memory) pages: what the tree itself holds
    pss: int  # proportional set: each shared page split among the processes mapping it (counted once in all)
    seconds: float


PSS_EVERY = 4  # of the 50 ms memory samples


def memforge_command(*args: str) -> list[str]:
    """The command line of ``memforge ARGS`` with this interpreter's console script."""
    return [str(Path(sys.executable).parent / "memforge"), *args]


def peak_tree_memory(command: list[str]) -> PeakMemory:
    """Run ``command``; return the peak summed RSS, private memory and PSS of it and its children, and its wall
    time. PSS (which reads each process's page map, ~1 ms per GB resident) is sampled every
    ``PSS_EVERY``-th time."""
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, private, pss, done = 0, 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, private, pss
        for tick in itertools.count():
            if done.is_set():
                return
            try:
                tree = [p for p in (process, *process.children(recursive=True)) if p.is_running()]
                infos = [p.memory_info() for p in tree]
                peak = max(peak, sum(i.rss for i in infos))
                private = max(private, sum(i.rss - i.shared for i in infos))
                if tick % PSS_EVERY == 0:
                    pss = max(pss, sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}")
    return PeakMemory(peak, private, pss, time.perf_counter() - started)


def store_bytes(uri: str, suffixes: tuple[str, ...] = ()) -> int:
    """Bytes of an artifact's data files: those ending in ``suffixes`` and every Zarr chunk."""
    filesystem, path = fs.filesystem(uri)
    return sum(filesystem.size(fs.join(path, rel)) for rel in fs.list_files(uri) if rel.endswith(suffixes)
               or "/c/" in rel)


def tree_bytes(path: Path, allocated: bool = True) -> int:
    """Bytes of a directory tree's files: allocated on disk (so sparse files count what they hold), or
    their sizes."""
    return sum(f.stat().st_blocks * 512 if allocated else f.stat().st_size for f in Path(path).rglob("*")
               if f.is_file())


def round_orders(variants: int, repeats: int) -> list[list[int]]:
    """The order of ``variants`` in each of ``repeats`` rounds: rotated by one per round, so that with
    ``repeats`` a multiple of ``variants`` each takes every position equally often, and the last round
    ends with the last variant."""
    return [[(position + round_ + 1 - repeats) % variants for position in range(variants)]
            for round_ in range(repeats)]
