"""Whether DVC's ``dvc.lock`` agrees with an artifact on disk (for ``memforge lineage``).

DVC computes and compares the hashes: this module only finds the DVC project and the stage whose
output holds the artifact, and asks DVC whether that output changed since ``dvc.lock`` recorded it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

LOCK_NAME = "dvc.lock"


def _project_root(path: Path) -> Path | None:
    for parent in (path, *path.parents):
        if (parent / ".dvc").is_dir() and (parent / "dvc.yaml").is_file():
            return parent
    return None


@functools.lru_cache(maxsize=8)
def _repo(root: str):
    from dvc.repo import Repo

    return Repo(root)


def _overlaps(out: Path, artifact: Path) -> bool:
    return out == artifact or out in artifact.parents or artifact in out.parents


def dvc_agreement(uri: str) -> dict | None:
    """``{"stage", "outs", "agrees", "detail"}`` for a local artifact inside a DVC project whose
    dvc.yaml has a stage writing it; None when DVC does not track it."""
    artifact = Path(uri).resolve()
    root = _project_root(artifact)
    if root is None:
        return None
    from dvc.exceptions import DvcException

    try:
        return _agreement(_repo(str(root)), root, artifact)
    except DvcException as exc:  # e.g. a DVC project outside a git repository: report it, never crash lineage
        return {"stage": "?", "outs": [], "agrees": False, "detail": f"DVC cannot read {root}: {exc}"}


def _agreement(repo, root: Path, artifact: Path) -> dict | None:
    for stage in repo.index.stages:
        outs = [out for out in stage.outs if _overlaps(Path(out.fs_path), artifact)]
        if not outs:
            continue
        names = [out.def_path for out in outs]
        lock_file = root / LOCK_NAME
        locked = yaml.safe_load(lock_file.read_text()) if lock_file.exists() else None
        if not locked or stage.name not in (locked.get("stages") or {}):
            return {"stage": stage.name, "outs": names, "agrees": False, "detail": "no dvc.lock record"}
        changed: dict[str, str] = {}
        for entry in repo.status(targets=[stage.addressing]).get(stage.addressing, []):
            if isinstance(entry, dict):
                changed.update({path: state for path, state in entry.get("changed outs", {}).items()
                                if path in names})
        detail = ", ".join(f"{path} {state}" for path, state in changed.items()) or "outputs match dvc.lock"
        return {"stage": stage.name, "outs": names, "agrees": not changed, "detail": detail}
    return None
