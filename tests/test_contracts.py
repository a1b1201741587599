"""Cross-artifact contracts (``pipelines.contracts``): an artifact swapped for one of another chain is refused
by every stage that combines it with the rest, all the way down, naming both sides."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memforge.flows.cli import main

from chain import rewrite_manifest, stage_args

pytestmark = pytest.mark.stage

TOP = ("tokens", "decoder", "keys", "index", "targets", "memory")


def swapped(chain, art: Path, role: str, edit) -> Path:
    """``art`` with every artifact of the chain linked, except ``role``: a copy whose manifest ``edit``
    rewrites and re-seals (as another chain's build would have written it)."""
    art.mkdir()
    top, _, split = role.partition("/")
    for name in TOP:
        if name != top:
            (art / name).symlink_to(chain["art"] / name)
        elif split:
            (art / name).mkdir()
            for entry in (chain["art"] / name).iterdir():
                if entry.name != split:
                    (art / name / entry.name).symlink_to(entry)
    shutil.copytree(chain["art"] / role, art / role)
    rewrite_manifest(art / role, edit)
    return art


def _recorded(role: str, value: str = "f" * 64):
    """An edit: the input ``role`` of the manifest was built from other content."""
    return lambda manifest: next(i for i in manifest["inputs"] if i["role"] == role).update(content_digest=value)


def _stats(field: str, value):
    return lambda manifest: manifest["stats"].update({field: value})


@pytest.mark.parametrize("role, edit, stages, disagree", [
    # keys of another chain (same corpus, a decoder trained with another seed): the fault
    ("keys/train", _recorded("decoder"), ("index", "targets", "train-memory", "evaluate"), "decoder"),
    ("keys/validation", _recorded("tokens"), ("index", "evaluate"), "tokens"),  # keys <-> tokens
    ("index", _recorded("keys"), ("targets", "evaluate"), "keys/train"),  # index <-> keys
    ("targets/train", _recorded("datastore"), ("train-memory",), "keys/train"),  # targets <-> keys
    ("memory", _recorded("decoder"), ("evaluate",), "decoder"),  # memory <-> decoder
])
def test_a_swapped_artifact_is_refused_down_the_chain(chain, tmp_path, capsys, role, edit, stages, disagree):
    art = swapped(chain, tmp_path / "art", role, edit)
    for stage in stages:
        capsys.readouterr()
        assert main([stage, *stage_args(chain["root"], art)]) == 1, stage
        err = capsys.readouterr().err
        assert f"memforge {stage}: error: {stage}: its inputs disagree on {disagree}: " in err, err
        assert f"{disagree} content ffffffffffff" in err and str(art / role) in err, err
        assert not (art / "eval").exists()


@pytest.mark.parametrize("field, value", [("model_fingerprint", "0" * 64), ("layer", 0)])
def test_keys_of_another_encoder_are_refused_where_they_meet_the_queries(chain, tmp_path, capsys, field, value):
    """The index's keys and the queries searched in it must come from one encoder, layer and representation:
    evaluate's index <-> the model that makes its queries."""
    art = swapped(chain, tmp_path / "art", "keys/train", _stats(field, value))
    for stage in ("index", "evaluate"):
        capsys.readouterr()
        assert main([stage, *stage_args(chain["root"], art)]) == 1, stage
        err = capsys.readouterr().err
        assert f"the keys artifacts it combines disagree on stats.{field}: " in err, err
        assert str(art / "keys" / "train") in err and str(art / "keys" / "validation") in err, err
