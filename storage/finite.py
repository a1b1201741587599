"""Strict JSON holds no NaN or Infinity: such numbers are recorded as null, and where they were is said."""
from __future__ import annotations

import math
from typing import Any


def nulled(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` with every non-finite float (NaN, ±inf, at any depth) replaced by None, and the dotted
    keys (``stats.loss``, ``curve[3].loss``) of the replaced ones."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [f"{where or 'the value'} ({value})"]
    found: list[str] = []
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key], inner = nulled(item, f"{where}.{key}" if where else str(key))
            found += inner
        return out, found
    if isinstance(value, (list, tuple)):
        items = []
        for index, item in enumerate(value):
            kept, inner = nulled(item, f"{where}[{index}]")
            items.append(kept)
            found += inner
        return items, found
    return value, found
