"""Params as one stage sees them: only the keys it declares, every read recorded.

A stage that reads a key it did not declare fails at once (its fingerprint or its DVC stage
would miss it); the recorded reads let a test find declared keys that no code reads.
"""
from __future__ import annotations

from typing import Any, Iterable

from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params, Section


class UndeclaredParamError(MemforgeError):
    """A stage read a params key that its declaration does not list."""


def covers(declared: Iterable[str], dotted: str) -> bool:
    """True when ``dotted`` is one of ``declared`` or lies inside a declared section."""
    return any(dotted == key or dotted.startswith(key + ".") for key in declared)


class ParamsView:
    """Read-only view of ``params`` limited to ``declared`` dotted keys; ``reads`` collects what was read."""

    def __init__(self, params: Params, declared: Iterable[str], owner: str, reads: set[str] | None = None):
        self._params, self._declared, self._owner = params, tuple(declared), owner
        self.reads = reads if reads is not None else set()

    def _read(self, dotted: str, value: Any) -> Any:
        if not covers(self._declared, dotted):
            raise UndeclaredParamError(f"stage {self._owner} read params key {dotted!r}, which its declaration "
                                       "does not list")
        self.reads.add(dotted)
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._params, name)
        if isinstance(value, Section):
            return _SectionView(self, name, value)
        return self._read(name, value)

    def value(self, dotted: str) -> Any:
        """The JSON-able value of one declared dotted key."""
        return self._read(dotted, self._params.value(dotted))

    def values(self, keys: Iterable[str], strip: str | None = None) -> dict[str, Any]:
        """JSON-able values of ``keys``; ``strip`` drops that section's prefix (``targets.k`` -> ``k``)."""
        prefix = f"{strip}." if strip else None
        return {key[len(prefix):] if prefix and key.startswith(prefix) else key: self.value(key) for key in keys}


class _SectionView:
    def __init__(self, view: ParamsView, name: str, section: Section):
        self._view, self._name, self._section = view, name, section

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        return self._view._read(f"{self._name}.{key}", getattr(self._section, key))
