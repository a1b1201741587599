"""Progress of a running Beam job, read from its shard markers (works for any runner).

Workers record ``rows`` and ``seconds`` in each marker's stats; a watcher thread in the
driver logs one line per finished shard with its throughput and, on a terminal, shows a
progress bar with the overall rate and ETA.
"""
from __future__ import annotations

import logging
import sys
import threading

from tqdm import tqdm

from memforge.storage.shards import Shard, ShardMarkers

log = logging.getLogger("memforge")


class ShardProgress:
    """Context manager that reports shards of ``shards`` as their markers appear."""

    def __init__(self, label: str, uri: str, shards: list[Shard], unit: str, total: int | None = None,
                 interval: float = 0.5):
        self.label, self.unit, self.interval = label, unit, interval
        self.markers = ShardMarkers(uri)
        self.waiting = {s.name: s for s in shards}
        self.total = total if total is not None else sum(s.rows for s in shards)
        self.bar = tqdm(total=self.total, unit=f" {unit}", unit_scale=True, desc=label, file=sys.stderr,
                        disable=not sys.stderr.isatty(), smoothing=0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ShardProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Report every shard whose marker appeared since the last poll."""
        for name in sorted(self.markers.done_names() & set(self.waiting)):
            shard = self.waiting.pop(name)
            stats = self.markers.read(shard).get("stats", {})
            rows, seconds = stats.get("rows", shard.rows), stats.get("seconds", 0.0)
            rate = f"{rows / seconds:,.0f} {self.unit}/s" if seconds else "n/a"
            log.info("%s: shard %s done: %s %s in %.2f s (%s)", self.label, name, f"{rows:,}", self.unit,
                     seconds, rate)
            self.bar.update(rows)
