"""The contracts between artifacts, checked by every stage on what it is about to combine.

Two rules, written once here and applied by the executor to every stage (a new stage gets them for free):

- **One upstream, one content.** A stage's inputs and everything they were built from, followed through the
  ``inputs`` recorded in their manifests all the way up, must agree: each artifact of the chain (by its
  role, ``decoder``, ``keys/train``…) was seen with one content only. So keys encoded by another decoder, an
  index of another key store, targets of another index, a memory of another decoder or targets are refused
  wherever they meet the artifacts they would be combined with, naming both sides.
- **Shared facts.** Every artifact of a kind listed in ``SHARED_FACTS`` that a stage reaches states the same
  values of those facts (all key stores a stage combines come from one encoder, layer and representation: the
  index's keys and the queries searched in it live in one space).

An upstream that was rebuilt since (its manifest now holds other content than recorded) is known only by
the recorded content; its own upstreams are not followed.
"""
from __future__ import annotations

from dataclasses import dataclass

from memforge.storage import fs
from memforge.storage.artifact import Artifact, input_uri, read_manifest
from memforge.storage.errors import ArtifactError, MemforgeError

# kind -> manifest fields (dotted) that all artifacts of that kind combined by one stage must share
SHARED_FACTS: dict[str, tuple[str, ...]] = {
    "keys": ("stats.model_fingerprint", "stats.layer", "stats.representation", "stats.hidden_size"),
}


@dataclass(frozen=True)
class Sighting:
    """An artifact of the chain as one of the stage's inputs knows it: its content, and who says so."""

    content: str
    witness: str  # the artifact whose manifest records this content, or the artifact itself
    direct: bool  # True: the artifact itself, read by the stage


def _identity(uri: str, artifacts_dir: str) -> str:
    """An artifact's name in the chain: its role (``keys/train``) inside ``artifacts_dir``, else its location."""
    return fs.relative(uri, artifacts_dir) if fs.inside(uri, artifacts_dir) else uri


def _fact(manifest: dict, field: str):
    value = manifest
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class _Walk:
    """What a stage's inputs say about the chain above them (manifests read once each)."""

    def __init__(self, artifacts_dir: str):
        self.artifacts_dir = artifacts_dir
        self.sightings: dict[str, list[Sighting]] = {}
        self.facts: dict[tuple[str, str], list[tuple[object, str]]] = {}  # (kind, field) -> [(value, uri)]
        self._followed: set[tuple[str, str]] = set()
        self.manifests: dict[str, dict | None] = {}  # uri -> its manifest, None when unreadable

    def manifest(self, uri: str) -> dict | None:
        """The manifest at ``uri`` (read on first use), or None when it is gone or unreadable."""
        if uri not in self.manifests:
            try:
                self.manifests[uri] = read_manifest(uri)
            except ArtifactError:
                self.manifests[uri] = None
        return self.manifests[uri]

    def follow(self, uri: str, manifest: dict) -> None:
        """Record ``manifest``'s facts and inputs, then follow each input whose manifest still holds the
        recorded content."""
        if (uri, manifest["content_digest"]) in self._followed:
            return
        self._followed.add((uri, manifest["content_digest"]))
        for field in SHARED_FACTS.get(manifest.get("kind"), ()):
            self.facts.setdefault((manifest["kind"], field), []).append((_fact(manifest, field), uri))
        home = Artifact(uri, manifest)
        for record in manifest.get("inputs", []):
            upstream = input_uri(home, record)
            self.see(upstream, Sighting(str(record.get("content_digest")), uri, direct=False))
            current = self.manifest(upstream)  # None: gone or unreadable, known only by what was recorded
            if current is not None and current.get("content_digest") == record.get("content_digest"):
                self.follow(upstream, current)

    def see(self, uri: str, sighting: Sighting) -> None:
        self.sightings.setdefault(_identity(uri, self.artifacts_dir), []).append(sighting)


def _describe(identity: str, sighting: Sighting) -> str:
    if sighting.direct:
        return f"{sighting.witness} holds content {sighting.content[:12]}"
    return f"{sighting.witness} was built from {identity} content {sighting.content[:12]}"


def check_contracts(stage_name: str, inputs: dict[str, Artifact], artifacts_dir: str) -> None:
    """Refuse inputs that disagree on any upstream artifact or shared fact (see module doc), naming both sides."""
    walk = _Walk(fs.normalize(artifacts_dir))
    walk.manifests.update({artifact.uri: artifact.manifest for artifact in inputs.values()})
    for artifact in inputs.values():
        walk.see(artifact.uri, Sighting(artifact.content_digest, artifact.uri, direct=True))
        walk.follow(artifact.uri, artifact.manifest)
    for identity, sightings in sorted(walk.sightings.items()):
        first = next((s for s in sightings if s.direct), sightings[0])
        other = next((s for s in sightings if s.content != first.content), None)
        if other is not None:
            raise MemforgeError(f"{stage_name}: its inputs disagree on {identity}: {_describe(identity, first)}, but "
                                f"{_describe(identity, other)}; rebuild what is outdated (`memforge run` rebuilds "
                                "the chain in order)")
    for (kind, field), seen in sorted(walk.facts.items()):
        (value, uri), other = seen[0], next((item for item in seen if item[0] != seen[0][0]), None)
        if other is not None:
            raise MemforgeError(f"{stage_name}: the {kind} artifacts it combines disagree on {field}: {uri} has "
                                f"{str(value)[:16]}, {other[1]} has {str(other[0])[:16]}; they must come from one "
                                "encoder (rebuild them with one encode run)")
