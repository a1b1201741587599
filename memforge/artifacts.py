"""Published artifacts by path or URL: manifest, lineage and verification."""
from __future__ import annotations

from memforge.storage import artifact as _artifact
from memforge.storage import fs
from memforge.storage.lineage import lineage as _lineage
from memforge.storage.verify import verify as _verify


class Artifact(_artifact.Artifact):
    """A published artifact: a directory (local path or fsspec URL) whose ``_manifest.json`` says what it
    holds and where it came from.

    Attributes:
        uri: where it is, normalised (absolute path or URL).
        manifest: the whole manifest (kind, params, inputs, code, environment, run, checksums, stats).
    """

    @property
    def inputs(self) -> dict[str, str]:
        """Each input's role mapped to where that input is now (relative records follow a moved directory)."""
        return {record["role"]: _artifact.input_uri(self, record) for record in self.manifest.get("inputs", [])}

    def lineage(self) -> dict:
        """The upstream tree of this artifact (see [memforge.lineage][])."""
        return lineage(self.uri)

    def verify(self) -> list[str]:
        """Re-check this artifact's checksums and invariants (see [memforge.verify][])."""
        return verify(self.uri)


def open_artifact(path: str, kind: str | None = None) -> Artifact:
    """Open the published artifact at ``path`` (a directory or URL such as ``s3://bucket/art/targets/train``).

    Raises `MemforgeError` naming the path when nothing is published there (no manifest, an interrupted
    build, an unknown schema) or when ``kind`` is given and the artifact is of another kind.
    """
    found = _artifact.open_artifact(str(path), kind)
    return Artifact(found.uri, found.manifest)


def lineage(path: str) -> dict:
    """Where the artifact at ``path`` came from: a tree of nodes (``kind``, ``uri``, ``fingerprint``, ``params``,
    ``execution``, ``code``, ``created``, ``run_id``, ``inputs``: the same nodes for each input, down to the
    corpus). A node whose upstream changed since it was built carries ``stale_input``; an unreadable upstream
    carries ``error``."""
    return _lineage(fs.normalize(str(path)))


def verify(path: str) -> list[str]:
    """Re-check the artifact at ``path``: checksums, shapes, dtypes, shard markers and each store's
    invariants. Returns the problems found, each naming the file or value at fault; empty when sound."""
    return _verify(str(path))
