"""Prefect's cached stage results are data, never code.

Prefect checks whether a result is cached by deserializing the stored record with whatever serializer the
record names (``pickle`` included, or a JSON serializer with another ``object_decoder``). So before Prefect
looks, memforge reads the record under a stage's cache key as plain JSON; one that is not exactly a JSON
record of plain values is never handed to Prefect: the stage gets another key, misses the cache and runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method
from prefect.results import get_default_result_storage
from prefect.serializers import JSONSerializer

log = logging.getLogger("memforge.flows")
# The serializer memforge's stage tasks write with (result_serializer="json"), as a record spells it.
JSON_SERIALIZER = JSONSerializer().model_dump(mode="json")


def _plain(value: Any) -> bool:
    """Plain JSON values only: no ``__class__`` objects, which Prefect's decoder would import and build."""
    if isinstance(value, dict):
        return "__class__" not in value and all(_plain(item) for item in value.values())
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return True


def record_problem(content: bytes) -> str | None:
    """Why the stored result record ``content`` must not be read, or None when it is plain JSON data."""
    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return "it is not JSON"
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    if serializer != JSON_SERIALIZER:
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        return f"its serializer is {kind!r}, not memforge's JSON serializer"
    try:
        result = json.loads(record.get("result"))
    except (TypeError, ValueError):
        return "its result is not JSON"
    return None if _plain(result) else "its result holds objects, not plain values"


def trusted_cache_key(key: str) -> str:
    """``key`` when nothing is cached under it or the cached record is plain JSON data; else another key, so
    that Prefect never deserializes the record (the stage runs again and caches a JSON result)."""
    try:
        storage = get_default_result_storage(_sync=True)
        content = call_explicitly_sync_block_method(storage, "read_path", (key,), {})
    except Exception:  # noqa: BLE001 - nothing cached (or unreadable): Prefect's own lookup misses too
        return key
    problem = record_problem(content)
    if problem is None:
        return key
    log.warning("cached result %s is refused (%s): the stage runs instead of reading it", key, problem)
    return f"{key}-refused-{hashlib.sha256(content).hexdigest()[:12]}"
