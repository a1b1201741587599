"""Artifact directories: begin or resume a build, publish it with its manifest, open published ones.

Lifecycle (DESIGN.md §2): ``_build.json`` records an in-progress build and its fingerprint;
the shard plan and markers record progress; ``_manifest.json`` is written last, atomically,
and is what makes the artifact exist for readers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from memforge.storage import fs, headers, provenance
from memforge.storage.errors import ArtifactError
from memforge.storage.lease import LEASE_NAME, Lease
from memforge.storage.shards import (
    MARKERS_DIR,
    PLAN_NAME,
    Shard,
    ShardMarkers,
    ShardPlan,
    load_layout,
    load_plan,
    save_plan,
)

SCHEMA_VERSION = 2  # 2: content_digest, execution; inputs enter fingerprints by content
MANIFEST_NAME = "_manifest.json"
BUILD_NAME = "_build.json"
CHECKPOINTS_DIR = "_checkpoints"  # training stages' resumable progress, like shard markers
_BOOKKEEPING = (MANIFEST_NAME, BUILD_NAME, LEASE_NAME)
# ``rebuild`` value that replaces only artifacts built with other params, inputs or code.
REBUILD_OUTDATED = "outdated"
_log = logging.getLogger("memforge.artifact")


def fingerprint(kind: str, params: dict, input_digests: dict[str, str], code: dict) -> str:
    """Hash of what determines an artifact's content: kind, content params, inputs' content digests, code.

    Inputs enter by what they hold, not by how they were made: an upstream rebuilt by other code into
    the same bytes leaves this artifact up to date.
    """
    payload = {
        "kind": kind,
        "params": params,
        "inputs": dict(sorted(input_digests.items())),
        "code": {"package_version": code.get("package_version"), "source_digest": code["source_digest"]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# kind -> prefixes of files an artifact keeps beside its data for people and tools (``explain``, ``retemper``),
# which no stage reads: they stay out of its content digest, so keeping the targets' neighbours beside
# byte-identical distributions leaves what was built from the distributions up to date
DIGEST_EXCLUDES: dict[str, tuple[str, ...]] = {"targets": ("neighbours.zarr/",)}


def content_digest(kind: str, files: dict[str, str], excludes: Iterable[str] = ()) -> str:
    """Hash of what an artifact holds for its consumers: its kind and the checksum of every file but those
    under ``excludes`` (the manifest's ``content_excludes``)."""
    excludes = tuple(excludes)
    payload = {"kind": kind, "files": dict(sorted((name, checksum) for name, checksum in files.items()
                                                  if not name.startswith(excludes)))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A published artifact: its location and manifest."""

    uri: str
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def content_digest(self) -> str:
        """What the artifact holds (its files' checksums); what its consumers' fingerprints hash."""
        return self.manifest["content_digest"]

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    def path(self, *parts: str) -> str:
        return fs.join(self.uri, *parts)


def read_manifest(uri: str) -> dict:
    """The manifest of the artifact at ``uri``; refuses missing, unpublished and unknown-schema ones."""
    uri = fs.normalize(uri)
    manifest_uri = fs.join(uri, MANIFEST_NAME)
    if not fs.exists(manifest_uri):
        if fs.exists(fs.join(uri, BUILD_NAME)):
            raise ArtifactError(
                f"{uri}: artifact is not published (no {MANIFEST_NAME}): its build was interrupted "
                "or is still running; rerun the stage to resume it"
            )
        if fs.exists(uri):
            raise ArtifactError(f"{uri}: not a memforge artifact (no {MANIFEST_NAME})")
        raise ArtifactError(f"{uri}: no artifact here (path does not exist)")
    try:
        manifest = fs.read_json(manifest_uri)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_uri}: manifest is not valid JSON: {exc}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_uri}: unknown schema_version {version!r} (this memforge reads {SCHEMA_VERSION})"
        )
    return manifest


def open_artifact(uri: str, kind: str | None = None) -> Artifact:
    """Open a published artifact, optionally requiring its ``kind``."""
    manifest = read_manifest(uri)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{fs.normalize(uri)}: is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return Artifact(fs.normalize(uri), manifest)


def _input_record(role: str, artifact: Artifact, home: str, root: str | None) -> dict:
    """How ``home``'s manifest names an input: relative to ``home`` (``../../tokens``) when both lie in
    ``root`` (the artifacts directory), so that a moved or copied directory reads its own inputs."""
    local = root is not None and fs.inside(home, root) and fs.inside(artifact.uri, root)
    return {"role": role, "uri": fs.relative(artifact.uri, home) if local else artifact.uri, "kind": artifact.kind,
            "fingerprint": artifact.fingerprint, "content_digest": artifact.content_digest}


def input_uri(artifact: Artifact, record: dict) -> str:
    """Where the input ``record`` of ``artifact``'s manifest is now (relative records follow a move)."""
    return fs.resolve(artifact.uri, record["uri"])


class ArtifactBuild:
    """One stage's write of one artifact: fingerprint check, shard plan, markers, publish.

    ``begin`` returns a build whose ``up_to_date`` is True when an identical artifact is
    already published (the stage has nothing to do).
    """

    def __init__(self, uri: str, kind: str, params: dict, inputs: dict[str, Artifact], fmt: str,
                 started_at: str, up_to_date: bool, code_files: tuple[provenance.SourceFile, ...] = (),
                 execution: dict | None = None, root: str | None = None):
        self.uri = uri
        self.root = root
        self.kind = kind
        self.params = params
        self.inputs = inputs
        self.format = fmt
        self.code = provenance.code_version(tuple(code_files))
        self.execution = execution or {}
        self.fingerprint = fingerprint(kind, params, {r: a.content_digest for r, a in inputs.items()}, self.code)
        self.started_at = started_at
        self.up_to_date = up_to_date
        self.markers = ShardMarkers(uri)
        self.lease: Lease | None = None
        self._records: dict[str, dict] = {}  # finished shards' markers, read once (finalize and publish both use them)

    @classmethod
    def begin(cls, uri: str, kind: str, params: dict, inputs: dict[str, Artifact] | None = None,
              fmt: str = "directory", rebuild: bool | str = False,
              code_files: tuple[provenance.SourceFile, ...] = (), execution: dict | None = None,
              root: str | None = None) -> "ArtifactBuild":
        """Start, resume, or refuse a build of ``kind`` at ``uri``.

        ``params`` are the content params (they enter the fingerprint with the inputs' fingerprints and
        the digest of ``code_files``); ``execution`` (workers, threads, batch sizes, runner options) is
        recorded in the manifest as provenance only. Inputs inside ``root`` (the artifacts directory)
        are recorded by relative path.

        ``rebuild``: False refuses to replace an artifact (published or interrupted) built with other
        params, inputs or code; True discards whatever is there; ``"outdated"`` (what orchestrators pass:
        they have decided the stage must run) replaces such an artifact but still resumes an
        interrupted build of this very fingerprint and keeps an up-to-date one.
        """
        if rebuild not in (False, True, REBUILD_OUTDATED):
            raise ArtifactError(f"rebuild must be False, True or {REBUILD_OUTDATED!r}, not {rebuild!r}")
        uri = fs.normalize(uri)
        build = cls(uri, kind, params, dict(inputs or {}), fmt, provenance.now(), up_to_date=False,
                    code_files=code_files, execution=execution, root=root)
        manifest_uri, state_uri = fs.join(uri, MANIFEST_NAME), fs.join(uri, BUILD_NAME)
        if rebuild is not True and fs.exists(manifest_uri) and read_manifest(uri)["fingerprint"] == build.fingerprint:
            build.up_to_date = True
            return build
        if rebuild is not True and not fs.exists(manifest_uri) and not fs.exists(state_uri) and \
                [rel for rel in fs.list_files(uri) if rel != LEASE_NAME]:
            raise ArtifactError(f"{uri}: exists and is not a memforge artifact; move it away or pass --rebuild")
        build.lease = Lease(uri).acquire()  # one writer: nothing below deletes under a live build
        try:
            build._claim(rebuild)
        except BaseException:
            build.release()
            raise
        return build

    def _claim(self, rebuild: bool | str) -> None:
        """Clear what this build replaces (never the lease), keep what it resumes, record it as in progress."""
        uri, kind = self.uri, self.kind
        manifest_uri, state_uri = fs.join(uri, MANIFEST_NAME), fs.join(uri, BUILD_NAME)
        if rebuild is True:
            fs.remove_contents(uri, keep=(LEASE_NAME,))
        elif fs.exists(manifest_uri):
            found = read_manifest(uri)["fingerprint"]
            if rebuild != REBUILD_OUTDATED:
                raise ArtifactError(
                    f"{uri}: a different {kind} artifact is published here (fingerprint {found[:12]}, "
                    f"this run {self.fingerprint[:12]}: params, inputs or code changed); pass --rebuild to "
                    "replace it"
                )
            _log.info("%s: replacing the outdated %s artifact (fingerprint %s, now %s)",
                      uri, kind, found[:12], self.fingerprint[:12])
            fs.remove_contents(uri, keep=(LEASE_NAME,))
        elif fs.exists(state_uri):
            state = fs.read_json(state_uri)
            if state.get("fingerprint") == self.fingerprint:
                self.started_at = state.get("started_at", self.started_at)
                return
            progress = self.markers.done_names() or fs.exists(fs.join(uri, CHECKPOINTS_DIR))
            if progress and rebuild != REBUILD_OUTDATED:
                raise ArtifactError(
                    f"{uri}: holds an interrupted build with other params, inputs or code "
                    f"(fingerprint {str(state.get('fingerprint'))[:12]}, this run {self.fingerprint[:12]}) "
                    "and its finished shards or checkpoints; pass --rebuild to discard them"
                )
            fs.remove_contents(uri, keep=(LEASE_NAME,))  # nothing finished, or the orchestrator replaces it
        self.write_state()

    def write_state(self) -> None:
        """Record this build as in progress (``_build.json``)."""
        fs.write_json_atomic(fs.join(self.uri, BUILD_NAME), {
            "kind": self.kind, "fingerprint": self.fingerprint, "params": self.params,
            "inputs": self._input_records(),
            "started_at": self.started_at, "run": provenance.run_identity(),
        })

    def _input_records(self) -> list[dict]:
        return [_input_record(r, a, self.uri, self.root) for r, a in self.inputs.items()]

    def restart(self) -> None:
        """Discard this interrupted build's work (its plan no longer holds) and record it anew."""
        fs.remove_contents(self.uri, keep=(LEASE_NAME,))
        self._records.clear()
        self.write_state()

    def release(self) -> None:
        """Give up the write lease (after publishing, or when the build stops)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    # -- shards ---------------------------------------------------------------------------
    def plan(self, plan: ShardPlan, layout: dict | None = None) -> ShardPlan:
        """Record the shard plan and the layout it follows (once); on resume both must be identical."""
        return save_plan(self.uri, plan, layout)

    def stored_layout(self) -> tuple[ShardPlan, dict] | None:
        """The plan and layout an interrupted build recorded, or None before planning."""
        if not fs.exists(fs.join(self.uri, PLAN_NAME)):
            return None
        return load_plan(self.uri), load_layout(self.uri)

    def pending(self, plan: ShardPlan) -> list[Shard]:
        """Shards of ``plan`` without a sound completion marker: not yet done, or with a damaged marker
        (torn, another shard's), which is redone."""
        sound, damaged = self.markers.sound(plan, self._records)
        for problem in damaged.values():
            _log.warning("%s; its shard is redone", problem)
        self._records.update(sound)
        return [s for s in plan.shards if s.name not in sound]

    # -- publish --------------------------------------------------------------------------
    def shard_records(self, plan: ShardPlan) -> list[dict]:
        """The completion marker of every shard of ``plan`` (all done), each read from storage once per build."""
        for shard in plan.shards:
            if shard.name not in self._records:
                self._records[shard.name] = self.markers.read(shard)
        return [self._records[shard.name] for shard in plan.shards]

    def _checksums(self, plan: ShardPlan | None, hashed: dict[str, str]) -> dict[str, str]:
        files = dict(hashed)
        if plan is not None:
            for record in self.shard_records(plan):
                files.update(record["files"])
        for rel in fs.list_files(self.uri):
            if fs.is_temporary(rel):  # left by a writer killed mid-write; never part of the artifact
                fs.remove_tree(fs.join(self.uri, rel))
                continue
            if rel in _BOOKKEEPING or rel.startswith(MARKERS_DIR + "/") or rel in files:
                continue
            files[rel] = fs.file_checksum(fs.join(self.uri, rel))
        return dict(sorted(files.items()))

    def publish(self, *, counts: dict[str, Any], arrays: dict[str, dict] | None = None,
                stats: dict[str, Any] | None = None, beam_runner: str | None = None,
                hashed: dict[str, str] | None = None) -> Artifact:
        """Write ``_manifest.json`` last, atomically; refuses while planned shards lack markers. Files are
        recorded with the checksums their shard markers or ``hashed`` (taken as they were written) give;
        only the rest are read to hash them. The headers of ``.npy`` and Parquet files are recorded too
        (``arrays`` describes the Zarr arrays)."""
        plan = load_plan(self.uri) if fs.exists(fs.join(self.uri, PLAN_NAME)) else None
        if plan is not None:
            missing = self.pending(plan)
            if missing:
                raise ArtifactError(
                    f"{self.uri}: cannot publish, {len(missing)} of {len(plan.shards)} shards have no "
                    f"completion marker (first: {missing[0].name})"
                )
        files = self._checksums(plan, hashed or {})
        excludes = [prefix for prefix in DIGEST_EXCLUDES.get(self.kind, ()) if any(f.startswith(prefix) for f in files)]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "format": self.format,
            "fingerprint": self.fingerprint,
            "content_digest": content_digest(self.kind, files, excludes),
            **({"content_excludes": excludes} if excludes else {}),
            "params": self.params,
            "inputs": self._input_records(),
            "code": self.code,
            "execution": self.execution,
            "environment": provenance.environment(beam_runner),
            "run": {**provenance.run_identity(), "started_at": self.started_at, "finished_at": provenance.now()},
            "counts": counts,
            "arrays": arrays or {},
            "shards": {"count": len(plan.shards) if plan else 0},
            "stats": stats or {},
            "files": files,
            "headers": headers.describe_files(self.uri, list(files)),
        }
        fs.write_json_atomic(fs.join(self.uri, MANIFEST_NAME), manifest)
        fs.remove_tree(fs.join(self.uri, BUILD_NAME))
        self.release()
        return Artifact(self.uri, manifest)
