"""Re-check a published artifact: checksums, markers, every typed file's header (``headers``), per-store invariants.

Content invariants are read from the manifest's conventions: ``counts.vocab_size`` bounds
token ids and values, ``counts.datastore_rows`` bounds neighbour ids, and
``stats.self_query`` (queries are datastore rows ``counts.query_offset + i``) forbids a
row listing itself as its own neighbour.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from memforge.storage import fs
from memforge.storage.artifact import BUILD_NAME, MANIFEST_NAME, content_digest, fingerprint, read_manifest
from memforge.storage.errors import ArtifactError
from memforge.storage.headers import check_headers
from memforge.storage.lease import LEASE_NAME
from memforge.storage.shards import MARKERS_DIR, PLAN_NAME, ShardMarkers, load_plan
from memforge.storage.stores import DistributionStore, KeyStore, NeighbourStore, TokenStore
from memforge.storage.zarr_rows import ZarrRows

PROB_TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


def check_identity(manifest: dict) -> Iterator[str]:
    """The manifest's fingerprint and content digest, recomputed from what it records."""
    inputs = {i.get("role"): i.get("content_digest") for i in manifest.get("inputs", [])}
    try:
        expected = fingerprint(manifest["kind"], manifest["params"], inputs, manifest["code"])
    except (KeyError, TypeError) as exc:
        yield f"{MANIFEST_NAME}: cannot recompute the fingerprint: missing {exc}"
    else:
        if expected != manifest.get("fingerprint"):
            yield (f"{MANIFEST_NAME}: fingerprint {str(manifest.get('fingerprint'))[:12]} does not match its params, "
                   f"inputs and code ({expected[:12]}): the manifest was edited")
    if manifest.get("content_digest") != content_digest(manifest.get("kind"), manifest.get("files", {}),
                                                        manifest.get("content_excludes", ())):
        yield f"{MANIFEST_NAME}: content_digest does not match the recorded files: the manifest was edited"


def _check_files(uri: str, manifest: dict, present: set[str]) -> Iterator[str]:
    recorded = manifest.get("files", {})
    for rel, checksum in recorded.items():
        if rel not in present:
            yield f"{rel}: missing (recorded in manifest)"
        elif fs.file_checksum(fs.join(uri, rel)) != checksum:
            yield f"{rel}: checksum mismatch (content changed since publish)"
    for rel in sorted(present - set(recorded)):
        if rel not in (MANIFEST_NAME, BUILD_NAME, LEASE_NAME) and not rel.startswith(MARKERS_DIR + "/"):
            yield f"{rel}: unexpected file (not in manifest)"


def _check_counts(manifest: dict) -> Iterator[str]:
    """The manifest's row count against what it records: every row-aligned array has ``counts.rows`` rows,
    and an artifact with rows records its files (a manifest listing none describes no data)."""
    rows = manifest.get("counts", {}).get("rows")
    if rows and not manifest.get("files"):
        yield f"{MANIFEST_NAME}: counts.rows is {rows} but it records no files"
    for name, spec in manifest.get("arrays", {}).items():
        if rows is not None and spec.get("shape", [rows])[0] != rows:
            yield f"{name}: {spec['shape'][0]} rows, counts.rows says {rows}"


def _check_markers(uri: str) -> Iterator[str]:
    if not fs.exists(fs.join(uri, PLAN_NAME)):
        return
    plan = load_plan(uri)
    markers = ShardMarkers(uri)
    done = markers.done_names()
    for shard in plan.shards:
        if shard.name not in done:
            yield f"{MARKERS_DIR}/{shard.name}.json: missing completion marker for shard {shard.name} " \
                  f"(rows {shard.start}..{shard.stop})"


def _blocks(rows: ZarrRows) -> Iterator[tuple[int, int]]:
    step = rows.unit_rows()
    for start in range(0, rows.n_rows, step):
        yield start, min(start + step, rows.n_rows)


def _first(mask: np.ndarray, offset: int) -> int:
    return offset + int(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])


def _check_keys(uri: str, sub: str, manifest: dict) -> Iterator[str]:
    store = KeyStore.open(uri, sub)
    vocab = manifest.get("counts", {}).get("vocab_size")
    for start, stop in _blocks(store.rows):
        keys, vals = store.keys(start, stop), store.vals(start, stop)
        bad = ~np.isfinite(keys)
        if bad.any():
            yield f"{sub}/keys: non-finite value in row {_first(bad, start)}"
        bad = (vals < 0) | (vals >= vocab if vocab else False)
        if bad.any():
            yield f"{sub}/vals: token id out of range [0, {vocab}) in row {_first(bad, start)}"


def _check_neighbours(uri: str, sub: str, manifest: dict) -> Iterator[str]:
    store = NeighbourStore.open(uri, sub)
    counts, stats = manifest.get("counts", {}), manifest.get("stats", {})
    datastore_rows = counts.get("datastore_rows")
    offset = counts.get("query_offset", 0)
    for start, stop in _blocks(store.rows):
        ids, dists = store.ids(start, stop), store.dists(start, stop)
        bad = (ids < -1) | (ids >= datastore_rows if datastore_rows else False)
        if bad.any():
            yield f"{sub}/ids: neighbour id out of range in row {_first(bad, start)}"
        if stats.get("self_query"):
            own = np.arange(start, stop, dtype=np.int64)[:, None] + offset
            bad = ids == own
            if bad.any():
                yield f"{sub}/ids: row {_first(bad, start)} lists itself as a neighbour"
        bad = (ids >= 0) & ~(np.isfinite(dists) & (dists >= 0))
        if bad.any():
            yield f"{sub}/dists: negative or non-finite distance in row {_first(bad, start)}"


def _check_distributions(uri: str, sub: str, manifest: dict) -> Iterator[str]:
    store = DistributionStore.open(uri, sub)
    vocab = manifest.get("counts", {}).get("vocab_size")
    tolerance = PROB_TOLERANCE[str(store.rows.array("probs").dtype)]
    for start, stop in _blocks(store.rows):
        tokens = store.tokens(start, stop)
        probs = store.probs(start, stop).astype(np.float64)
        truncated = store.truncated(start, stop).astype(np.float64)
        bad = (probs < 0) | ~np.isfinite(probs)
        if bad.any():
            yield f"{sub}/probs: negative or non-finite probability in row {_first(bad, start)}"
        bad = (tokens < -1) | (tokens >= vocab if vocab else False) | ((tokens == -1) & (probs != 0))
        if bad.any():
            yield f"{sub}/tokens: token id out of range (or padding with mass) in row {_first(bad, start)}"
        total = probs.sum(axis=1) + truncated
        bad = np.abs(total - 1.0) > tolerance
        if bad.any():
            row = _first(bad, start)
            yield f"{sub}/probs: row {row} sums to {total[row - start]:.6f} with its truncated mass, not 1 " \
                  f"(tolerance {tolerance}; {int(bad.sum())} rows in this block)"


def _check_token_parts(uri: str, manifest: dict) -> Iterator[str]:
    vocab = manifest.get("counts", {}).get("vocab_size")
    for rel in sorted(r for r in manifest.get("files", {}) if r.endswith(".parquet")):
        sub, _, filename = rel.rpartition("/")
        store = TokenStore.open(uri, sub)
        try:
            tokens = store.read_shard(filename[len("part-"):-len(".parquet")]).column("token").to_numpy()
        except ArtifactError as exc:
            yield str(exc)
            continue
        bad = (tokens < 0) | (tokens >= vocab if vocab else False)
        if bad.any():
            yield f"{rel}: token id out of range in row {int(np.flatnonzero(bad)[0])} of the part"


_STORE_CHECKS: dict[str, Callable[[str, str, dict], Iterator[str]]] = {
    "keys": _check_keys, "ids": _check_neighbours, "probs": _check_distributions,
}


def _check_contents(uri: str, manifest: dict) -> Iterator[str]:
    groups = {name.rpartition("/")[0] for name in manifest.get("arrays", {})}
    for sub in sorted(groups):
        names = {n.rpartition("/")[2] for n in manifest["arrays"] if n.rpartition("/")[0] == sub}
        for marker_array, check in _STORE_CHECKS.items():
            if marker_array in names:
                yield from check(uri, sub, manifest)
    if manifest.get("kind") == "tokens":
        yield from _check_token_parts(uri, manifest)


def verify(uri: str) -> list[str]:
    """All problems found in the artifact at ``uri``; an empty list means it is sound."""
    uri = fs.normalize(uri)
    try:
        manifest = read_manifest(uri)
    except ArtifactError as exc:
        return [str(exc)]
    present = set(fs.list_files(uri))
    problems = [*check_identity(manifest), *_check_counts(manifest), *_check_files(uri, manifest, present),
                *_check_markers(uri), *check_headers(uri, manifest, present)]
    if problems:
        # Content checks read every row; they only make sense on files that match the manifest.
        return problems + ["content checks skipped until the problems above are fixed"]
    try:
        return list(_check_contents(uri, manifest))
    except Exception as exc:  # noqa: BLE001 - any read failure is a finding, not a crash
        return [f"{uri}: cannot read contents: {type(exc).__name__}: {exc}"]
