"""Where each artifact lives: the one map from artifact role to location under ``artifacts_dir``.

A role names an artifact by what it is in the chain (``keys/train``); its location is always
``<artifacts_dir>/<role>``, and stages never build paths of their own. ``ROLES`` lists the roles
of the built-in chain with the artifact kind each one holds (a stage declared elsewhere may add
roles: they follow the same rule and carry no kind check).
"""
from __future__ import annotations

from memforge.storage import fs

SPLITS = ("train", "validation")  # the splits that are encoded (keys, targets)
TOKEN_SPLITS = (*SPLITS, "test")  # the token store's: the test split is only ever scored, never encoded
ROLES: dict[str, str] = {
    "tokens": "tokens",
    "decoder": "decoder",
    "keys/train": "keys",
    "keys/validation": "keys",
    "index": "index",
    "targets/train": "targets",
    "targets/validation": "targets",
    "memory": "memory",
    "eval": "evaluation",
    "export": "export",
}


def artifact_uri(artifacts_dir: str, role: str) -> str:
    """Location of the artifact playing ``role``."""
    return fs.join(artifacts_dir, *role.split("/"))


def kind_of(role: str) -> str | None:
    """The artifact kind a role holds (None for roles outside the built-in chain)."""
    return ROLES.get(role)


def split_roles(prefix: str) -> tuple[str, ...]:
    """``keys`` -> ``("keys/train", "keys/validation")``."""
    return tuple(f"{prefix}/{split}" for split in SPLITS)
