"""Crash, resume, up-to-date and refusal behaviour of an artifact build, using tests/toy_stage.py.

Crashes are real: the toy stage runs in a subprocess that SIGKILLs itself after K shards.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memforge.flows.cli import main
from memforge.storage import fs
from memforge.storage.artifact import BUILD_NAME, MANIFEST_NAME, REBUILD_OUTDATED, ArtifactBuild, open_artifact
from memforge.storage.errors import ArtifactError
from memforge.storage.shards import MARKERS_DIR, PLAN_NAME, ShardPlan, load_plan
from memforge.storage.stores import KeyStore
from memforge.storage.verify import verify

import toy_stage

pytestmark = pytest.mark.stage

REPO = Path(__file__).resolve().parent.parent
ROWS = 600           # 64-row chunks x 2 per Zarr shard -> 128-row plan shards: 5 shards, the last one 88 rows
N_SHARDS = 5
KILL_AFTER = 2
SEED = 7


def run_stage(uri: Path, seed: int = SEED, rows: int = ROWS, *extra: str) -> subprocess.CompletedProcess:
    """Run tests/toy_stage.py as a real subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, "tests/toy_stage.py", str(uri), "--seed", str(seed), "--rows", str(rows), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def crash(uri: Path, seed: int = SEED, after: int = KILL_AFTER) -> None:
    """Run the toy stage and have it SIGKILL itself after ``after`` shards; assert it really died."""
    proc = run_stage(uri, seed, ROWS, "--die-after", str(after))
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""  # killed before printing its result


def data_files(uri: Path) -> dict[str, bytes]:
    """Bytes of every file of an artifact except its bookkeeping (manifest, build state, markers)."""
    out = {}
    for rel in fs.list_files(str(uri)):
        if rel in (MANIFEST_NAME, BUILD_NAME) or rel.startswith(MARKERS_DIR + "/"):
            continue
        out[rel] = (uri / rel).read_bytes()
    return out


def expected_keys(seed: int, rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The keys and vals the toy stage must have written for ``seed``, concatenated over the plan."""
    plan = ShardPlan.even(rows, toy_stage.CHUNK_ROWS * toy_stage.SHARD_CHUNKS)
    parts = [toy_stage.shard_data(seed, s.id, s.rows) for s in plan.shards]
    return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])


def assert_holds_seed(uri: Path, seed: int) -> None:
    """The published keys artifact at ``uri`` holds exactly the data of ``seed``."""
    art = open_artifact(str(uri), kind="keys")
    assert art.params == {"seed": seed, "rows": ROWS}
    store = KeyStore.open(str(uri))
    keys, vals = expected_keys(seed)
    np.testing.assert_array_equal(store.keys(), keys)
    np.testing.assert_array_equal(store.vals(), vals)


def test_killed_writer_leaves_unpublished_artifact(tmp_path, capsys):
    uri = tmp_path / "keys"
    crash(uri)

    assert (uri / BUILD_NAME).exists() and not (uri / MANIFEST_NAME).exists()
    assert len(load_plan(str(uri)).shards) == N_SHARDS
    assert sorted(p.name for p in (uri / MARKERS_DIR).iterdir()) == ["00000.json", "00001.json"]

    with pytest.raises(ArtifactError, match="not published"):
        open_artifact(str(uri))
    problems = verify(str(uri))
    assert len(problems) == 1 and "not published" in problems[0]

    # A published sibling shows up next to it, so ls really distinguishes the two states.
    assert toy_stage.run(str(tmp_path / "done"), seed=1, rows=ROWS)["written"] == N_SHARDS
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith(str(uri) + " "))
    assert f"incomplete ({KILL_AFTER}/{N_SHARDS} shards done)" in row
    assert "keys" in row
    done_row = next(line for line in lines if line.startswith(str(tmp_path / "done") + " "))
    assert "published" in done_row and str(ROWS) in done_row


def test_resume_skips_done_shards_and_matches_uninterrupted_run(tmp_path):
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    crash(resumed)
    marker_before = (resumed / MARKERS_DIR / "00000.json").read_bytes()
    shard0_before = (resumed / "datastore.zarr/keys/c/0/0").stat().st_mtime_ns

    proc = run_stage(resumed)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"skipped": KILL_AFTER, "written": N_SHARDS - KILL_AFTER, "up_to_date": False}
    # The completed shard was really skipped: neither its marker nor its data file was rewritten.
    assert (resumed / MARKERS_DIR / "00000.json").read_bytes() == marker_before
    assert (resumed / "datastore.zarr/keys/c/0/0").stat().st_mtime_ns == shard0_before

    assert toy_stage.run(str(clean), SEED, ROWS) == {"skipped": 0, "written": N_SHARDS, "up_to_date": False}

    m_resumed, m_clean = open_artifact(str(resumed)).manifest, open_artifact(str(clean)).manifest
    assert m_resumed["fingerprint"] == m_clean["fingerprint"]
    assert m_resumed["files"] == m_clean["files"]
    assert m_resumed["shards"] == {"count": N_SHARDS}
    assert PLAN_NAME in m_resumed["files"]
    assert "datastore.zarr/keys/c/4/0" in m_resumed["files"] and "datastore.zarr/vals/c/4" in m_resumed["files"]

    bytes_resumed, bytes_clean = data_files(resumed), data_files(clean)
    assert sorted(bytes_resumed) == sorted(m_resumed["files"])  # the manifest lists every data file
    assert bytes_resumed == bytes_clean

    assert not (resumed / BUILD_NAME).exists()
    assert verify(str(resumed)) == []
    assert verify(str(clean)) == []
    assert_holds_seed(resumed, SEED)


def test_rerun_of_published_artifact_is_up_to_date(tmp_path):
    uri = tmp_path / "keys"
    assert toy_stage.run(str(uri), SEED, ROWS)["written"] == N_SHARDS
    manifest_before = (uri / MANIFEST_NAME).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in uri.rglob("*") if p.is_file()}

    proc = run_stage(uri)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"skipped": 0, "written": 0, "up_to_date": True}
    assert toy_stage.run(str(uri), SEED, ROWS) == {"skipped": 0, "written": 0, "up_to_date": True}

    assert (uri / MANIFEST_NAME).read_bytes() == manifest_before
    assert {p: p.stat().st_mtime_ns for p in uri.rglob("*") if p.is_file()} == mtimes
    assert not (uri / BUILD_NAME).exists()


def test_changed_params_refused_on_interrupted_build_unless_rebuild(tmp_path):
    uri = tmp_path / "keys"
    crash(uri, seed=SEED)

    with pytest.raises(ArtifactError, match="--rebuild") as info:
        toy_stage.run(str(uri), seed=SEED + 1, rows=ROWS)
    assert "interrupted build" in str(info.value)
    proc = run_stage(uri, SEED + 1)
    assert proc.returncode == 1 and "--rebuild" in proc.stderr
    # The refusal left the interrupted build untouched.
    assert len(list((uri / MARKERS_DIR).iterdir())) == KILL_AFTER
    assert fs.read_json(str(uri / BUILD_NAME))["params"] == {"seed": SEED, "rows": ROWS}

    result = toy_stage.run(str(uri), seed=SEED + 1, rows=ROWS, rebuild=True)
    assert result == {"skipped": 0, "written": N_SHARDS, "up_to_date": False}
    assert_holds_seed(uri, SEED + 1)
    assert verify(str(uri)) == []


def test_changed_params_refused_on_published_artifact_unless_rebuild(tmp_path):
    uri = tmp_path / "keys"
    toy_stage.run(str(uri), SEED, ROWS)
    old = open_artifact(str(uri))

    with pytest.raises(ArtifactError, match="--rebuild") as info:
        toy_stage.run(str(uri), seed=SEED + 1, rows=ROWS)
    assert "different keys artifact is published" in str(info.value)
    assert open_artifact(str(uri)).manifest == old.manifest

    proc = run_stage(uri, SEED + 1, ROWS, "--rebuild")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"skipped": 0, "written": N_SHARDS, "up_to_date": False}
    new = open_artifact(str(uri))
    assert new.fingerprint != old.fingerprint
    assert new.manifest["files"] != old.manifest["files"]
    assert_holds_seed(uri, SEED + 1)
    assert verify(str(uri)) == []


def test_resume_with_different_stored_plan_is_refused(tmp_path):
    """Same params (same fingerprint) but a different shard plan than the stored one: refused."""
    uri = tmp_path / "keys"
    crash(uri)
    build = ArtifactBuild.begin(str(uri), "keys", {"seed": SEED, "rows": ROWS})
    assert not build.up_to_date
    with pytest.raises(ArtifactError, match="--rebuild") as info:
        build.plan(ShardPlan.even(ROWS, toy_stage.CHUNK_ROWS))  # 10 shards instead of the stored 5
    assert "differs" in str(info.value)
    assert load_plan(str(uri)) == ShardPlan.even(ROWS, 128)
    # The stored plan is still accepted, and a resume after the refusal completes normally.
    assert build.plan(ShardPlan.even(ROWS, 128)) == load_plan(str(uri))
    build.release()  # one writer at a time: the resume below is a second build
    assert toy_stage.run(str(uri), SEED, ROWS) == {"skipped": KILL_AFTER, "written": N_SHARDS - KILL_AFTER,
                                                   "up_to_date": False}
    assert verify(str(uri)) == []


def test_publish_refused_while_shards_lack_markers(tmp_path):
    """A build cannot be published while planned shards are still pending."""
    uri = tmp_path / "keys"
    crash(uri)
    build = ArtifactBuild.begin(str(uri), "keys", {"seed": SEED, "rows": ROWS})
    with pytest.raises(ArtifactError, match=f"{N_SHARDS - KILL_AFTER} of {N_SHARDS} shards"):
        build.publish(counts={"rows": ROWS})
    assert not (uri / MANIFEST_NAME).exists()


def test_killed_after_last_shard_publishes_without_rewriting(tmp_path, capsys):
    """All shards done but no manifest: ls says N/N done, and the rerun only publishes."""
    uri, clean = tmp_path / "keys", tmp_path / "clean"
    crash(uri, after=N_SHARDS)
    with pytest.raises(ArtifactError, match="not published"):
        open_artifact(str(uri))
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    assert f"incomplete ({N_SHARDS}/{N_SHARDS} shards done)" in capsys.readouterr().out

    assert toy_stage.run(str(uri), SEED, ROWS) == {"skipped": N_SHARDS, "written": 0, "up_to_date": False}
    toy_stage.run(str(clean), SEED, ROWS)
    assert open_artifact(str(uri)).manifest["files"] == open_artifact(str(clean)).manifest["files"]
    assert data_files(uri) == data_files(clean)
    assert verify(str(uri)) == []


def test_attempt_that_finished_no_shard_is_replaced_without_rebuild(tmp_path):
    """A build that failed before any shard completed (e.g. bad input) holds no work: other params may replace it."""
    uri = str(tmp_path / "art")
    ArtifactBuild.begin(uri, "keys", {"seed": 1, "rows": ROWS}).release()  # started, failed before any shard
    result = toy_stage.run(uri, seed=SEED, rows=ROWS)
    assert result == {"skipped": 0, "written": N_SHARDS, "up_to_date": False}
    assert open_artifact(uri, "keys").params == {"seed": SEED, "rows": ROWS}


def test_debris_of_a_zarr_write_killed_mid_chunk_is_not_published(tmp_path):
    """Zarr's LocalStore writes ``<chunk>.<uuid>.partial`` then renames; a SIGKILL in between leaves it behind."""
    uri, clean = tmp_path / "keys", tmp_path / "clean"
    crash(uri)
    chunk_dir = uri / "datastore.zarr/keys/c/3"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    debris = chunk_dir / f"0.{'ab' * 16}.partial"
    debris.write_bytes(b"half a chunk")

    assert run_stage(uri).returncode == 0
    toy_stage.run(str(clean), SEED, ROWS)
    assert not debris.exists()
    assert open_artifact(str(uri)).manifest["files"] == open_artifact(str(clean)).manifest["files"]
    assert verify(str(uri)) == []


def test_rebuild_outdated_replaces_other_fingerprints_and_resumes_its_own(tmp_path):
    """What orchestrators pass: an outdated artifact (published or interrupted) is replaced, an
    interrupted build of the same fingerprint resumes, an up-to-date one is kept."""
    uri = tmp_path / "keys"
    toy_stage.run(str(uri), seed=1, rows=ROWS)
    assert toy_stage.run(str(uri), SEED, ROWS, rebuild=REBUILD_OUTDATED) == {
        "skipped": 0, "written": N_SHARDS, "up_to_date": False}
    assert_holds_seed(uri, SEED)
    assert toy_stage.run(str(uri), SEED, ROWS, rebuild=REBUILD_OUTDATED)["up_to_date"] is True

    crash(uri := tmp_path / "interrupted")  # the same fingerprint: resumed, not restarted
    assert toy_stage.run(str(uri), SEED, ROWS, rebuild=REBUILD_OUTDATED) == {
        "skipped": KILL_AFTER, "written": N_SHARDS - KILL_AFTER, "up_to_date": False}

    crash(uri := tmp_path / "other", seed=1)  # other params, with finished shards: discarded
    assert toy_stage.run(str(uri), SEED, ROWS, rebuild=REBUILD_OUTDATED)["written"] == N_SHARDS
    assert_holds_seed(uri, SEED)
    with pytest.raises(ArtifactError, match="rebuild must be"):
        ArtifactBuild.begin(str(uri), "keys", {}, rebuild="sometimes")
