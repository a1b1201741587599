"""Shard plans and completion markers: the one API every stage uses to resume.

A plan maps shard id -> global row range and is written once, before any worker starts
(``_plan.json``). A shard is done when ``_shards/<id>.json`` exists; it is written after
the shard's data is durable and records the checksums of the files the shard wrote.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from memforge.storage import fs
from memforge.storage.errors import ArtifactError, DamagedFileError

PLAN_NAME = "_plan.json"
MARKERS_DIR = "_shards"


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of an artifact, written by exactly one worker."""

    id: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.id:05d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """All shards of an artifact, covering ``[0, total_rows)`` in order without gaps."""

    total_rows: int
    shards: tuple[Shard, ...]

    @classmethod
    def even(cls, total_rows: int, shard_rows: int) -> "ShardPlan":
        """Shards of ``shard_rows`` rows each (the last may be shorter)."""
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        bounds = list(range(0, total_rows, shard_rows)) + [total_rows]
        return cls(total_rows, tuple(Shard(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))))

    @classmethod
    def from_sizes(cls, sizes: list[int]) -> "ShardPlan":
        """Shards of the given row counts, laid end to end."""
        shards, start = [], 0
        for i, size in enumerate(sizes):
            shards.append(Shard(i, start, start + size))
            start += size
        return cls(start, tuple(shards))

    def to_json(self) -> dict:
        return {"total_rows": self.total_rows, "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict) -> "ShardPlan":
        return cls(data["total_rows"], tuple(Shard(**s) for s in data["shards"]))


class ShardMarkers:
    """Completion markers of one artifact directory; safe to use from any worker process."""

    def __init__(self, artifact_uri: str):
        self.uri = fs.normalize(artifact_uri)

    def _marker(self, shard: Shard) -> str:
        return fs.join(self.uri, MARKERS_DIR, f"{shard.name}.json")

    def is_done(self, shard: Shard) -> bool:
        return fs.exists(self._marker(shard))

    def done_names(self) -> set[str]:
        names = fs.list_files(fs.join(self.uri, MARKERS_DIR))
        return {n[: -len(".json")] for n in names if n.endswith(".json") and "/" not in n}

    def mark_done(self, shard: Shard, files: dict[str, str], stats: dict | None = None) -> None:
        """Record ``shard`` as done with the checksums of the files it wrote (call after they are durable)."""
        fs.write_json_atomic(
            self._marker(shard),
            {**asdict(shard), "files": files, "stats": stats or {}},
        )

    def read(self, shard: Shard) -> dict:
        return fs.read_json(self._marker(shard))

    def check(self, shard: Shard) -> tuple[dict | None, str | None]:
        """``shard``'s marker and None when it is sound; else None and why not (torn, another shard's, no
        file list): such a shard is not done."""
        try:
            marker = self.read(shard)
        except DamagedFileError as exc:
            return None, str(exc)
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            return None, f"{self._marker(shard)}: damaged, not a shard marker"
        if (marker.get("id"), marker.get("start"), marker.get("stop")) != (shard.id, shard.start, shard.stop):
            return None, f"{self._marker(shard)}: damaged, it names rows {marker.get('start')}-{marker.get('stop')}, " \
                         f"the plan's shard {shard.name} is rows {shard.start}-{shard.stop}"
        return marker, None

    def sound(self, plan: ShardPlan, known: dict[str, dict] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
        """The markers of ``plan``'s finished shards that are sound (by shard name), and why each other one
        present is not; markers in ``known`` (checked before) are not read again."""
        present, sound, damaged = self.done_names(), dict(known or {}), {}
        for shard in plan.shards:
            if shard.name in present and shard.name not in sound:
                marker, problem = self.check(shard)
                if problem is None:
                    sound[shard.name] = marker
                else:
                    damaged[shard.name] = problem
        return sound, damaged


def save_plan(artifact_uri: str, plan: ShardPlan, layout: dict | None = None) -> ShardPlan:
    """Write the plan (with the ``layout`` params it follows) once; on resume require the stored plan
    to be the same one."""
    uri = fs.join(artifact_uri, PLAN_NAME)
    if fs.exists(uri):
        stored = load_plan(artifact_uri)
        if stored != plan or load_layout(artifact_uri) != (layout or {}):
            raise ArtifactError(
                f"{artifact_uri}: stored shard plan ({len(stored.shards)} shards, {stored.total_rows} rows) "
                f"differs from the new one ({len(plan.shards)} shards, {plan.total_rows} rows); "
                "pass --rebuild to discard the interrupted build"
            )
        return stored
    fs.write_json_atomic(uri, {**plan.to_json(), "layout": layout or {}})
    return plan


def load_plan(artifact_uri: str) -> ShardPlan:
    return ShardPlan.from_json(fs.read_json(fs.join(artifact_uri, PLAN_NAME)))


def load_layout(artifact_uri: str) -> dict:
    """The layout params (chunk and shard sizes) the stored plan was made for."""
    return fs.read_json(fs.join(artifact_uri, PLAN_NAME)).get("layout", {})
