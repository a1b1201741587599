"""What a worker process keeps between bundles: models and indexes, built once per process.

Runners differ in how often they call a DoFn's ``setup``: Beam's local FnApiRunner once per worker,
its DaskRunner once per bundle (with memforge's one shard per Dask partition, once per shard). What
is expensive to open (an encoder, an index and its datastore rows) is kept here, keyed by what
identifies its content, so it is loaded at most once per worker process whatever the runner. Only
the newest ``KEEP`` entries stay: a long-lived cluster worker serves many builds.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

KEEP = 2
_entries: OrderedDict[Hashable, Any] = OrderedDict()
_lock = threading.Lock()


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """The value kept under ``key``, built by ``build()`` the first time (one build at a time)."""
    with _lock:
        if key not in _entries:
            _entries[key] = build()
            while len(_entries) > KEEP:
                _entries.popitem(last=False)
        _entries.move_to_end(key)
        return _entries[key]
