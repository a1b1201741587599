"""Find artifacts below a directory and summarise each (``memforge ls``)."""
from __future__ import annotations

from memforge.storage import fs
from memforge.storage.artifact import BUILD_NAME, MANIFEST_NAME, read_manifest
from memforge.storage.errors import ArtifactError
from memforge.storage.shards import PLAN_NAME, ShardMarkers, load_plan


def find_artifacts(root: str) -> list[str]:
    """Artifact directories (published or in progress) below ``root``, not descending into them."""
    filesystem, path = fs.filesystem(root)
    base = fs.normalize(root)
    found: list[str] = []

    def walk(directory: str, uri: str) -> None:
        try:
            entries = filesystem.ls(directory, detail=True)
        except FileNotFoundError:
            return
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        if MANIFEST_NAME in names or BUILD_NAME in names:
            found.append(uri)
            return
        for name, entry in sorted(names.items()):
            if entry["type"] == "directory":
                walk(entry["name"], fs.join(uri, name))

    walk(path, base)
    return found


def _damaged(uri: str, reason: str) -> dict:
    return {"uri": uri, "status": f"damaged: {reason}", "kind": "?", "rows": None, "fingerprint": None,
            "when": None, "detail": reason, "stats": {}}


def summarise(uri: str) -> dict:
    """Status, kind, rows, fingerprint and build time of one artifact; a damaged one (unreadable manifest,
    build record or plan) is reported as such, never raised."""
    manifest_uri = fs.join(uri, MANIFEST_NAME)
    try:
        manifest = read_manifest(uri)
    except ArtifactError as exc:
        if fs.exists(manifest_uri):  # present but unreadable: not an interrupted build
            return _damaged(uri, str(exc))
        try:
            state = fs.read_json(fs.join(uri, BUILD_NAME)) if fs.exists(fs.join(uri, BUILD_NAME)) else {}
            progress = ""
            if fs.exists(fs.join(uri, PLAN_NAME)):
                plan = load_plan(uri)
                sound, damaged = ShardMarkers(uri).sound(plan)
                progress = f" ({len(sound)}/{len(plan.shards)} shards done" + (
                    f", {len(damaged)} damaged marker(s) redone on rerun)" if damaged else ")")
        except (ValueError, KeyError, TypeError) as damage:
            return _damaged(uri, f"unreadable build record or shard plan: {damage}")
        return {"uri": uri, "status": "incomplete" + progress, "kind": state.get("kind", "?"),
                "rows": None, "fingerprint": state.get("fingerprint"), "when": state.get("started_at"),
                "detail": str(exc), "stats": {}}
    return {"uri": uri, "status": "published", "kind": manifest["kind"],
            "rows": manifest.get("counts", {}).get("rows"), "fingerprint": manifest["fingerprint"],
            "when": manifest.get("run", {}).get("finished_at"), "detail": "", "stats": manifest.get("stats", {})}
