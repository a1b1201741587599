"""What a stage checks of an input artifact before reading it: the manifest's identity, every recorded file
present, every typed file's header (``.npy``, Parquet, Zarr: read without the data, compared with the manifest,
object dtypes refused), and the bytes of a sample of the files (or all) against their checksums.

A consumer must never build from an artifact that ``memforge verify`` would fail. Re-hashing every input in
full on every run costs a full read (about 256 GB of fp16 keys at 100 M tokens), so the default re-hashes a
fresh random sample of about ``SAMPLE_BYTES`` per input per run: small files always fit, and a damaged
large file is found with a probability that grows with each run (``check_inputs: full`` reads all).
"""
from __future__ import annotations

import logging
import random
import time

from memforge.storage import fs
from memforge.storage.artifact import Artifact
from memforge.storage.errors import ArtifactError
from memforge.storage.headers import check_headers
from memforge.storage.verify import check_identity

log = logging.getLogger("memforge")
SAMPLE_BYTES = 256 * 2**20


def _sample(artifact: Artifact, rng: random.Random) -> list[str]:
    """Recorded files, shuffled, taken while they fit in ``SAMPLE_BYTES`` (at least one)."""
    sizes = dict(zip(artifact.manifest["files"], fs.sizes(artifact.uri, list(artifact.manifest["files"]))))
    chosen, total = [], 0
    for rel in rng.sample(sorted(sizes), len(sizes)):
        if chosen and total + sizes[rel] > SAMPLE_BYTES:
            continue
        chosen.append(rel)
        total += sizes[rel]
    return chosen


def check_intact(artifact: Artifact, mode: str = "sample", rng: random.Random | None = None) -> Artifact:
    """``artifact`` once its identity, files, headers and (per ``mode``: sample, full, off) checksums hold."""
    problems = list(check_identity(artifact.manifest))
    present = set(fs.list_files(artifact.uri))
    missing = sorted(rel for rel in artifact.manifest["files"] if rel not in present)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        problems.append(f"{missing[0]}{more} recorded in its manifest is missing")
    if not problems:
        problems.extend(check_headers(artifact.uri, artifact.manifest, present))
    if not problems and mode != "off":
        started = time.perf_counter()
        files = list(artifact.manifest["files"]) if mode == "full" else _sample(artifact, rng or random.Random())
        for rel in files:
            if fs.file_checksum(fs.join(artifact.uri, rel)) != artifact.manifest["files"][rel]:
                problems.append(f"{rel}: checksum mismatch (its bytes changed since publish)")
                break
        log.debug("%s: re-hashed %d of %d files (%s) in %.2f s", artifact.uri, len(files),
                  len(artifact.manifest["files"]), mode, time.perf_counter() - started)
    if problems:
        raise ArtifactError(f"{artifact.uri}: {problems[0]}; the artifact is damaged (memforge verify lists "
                            "everything): rebuild it")
    return artifact
