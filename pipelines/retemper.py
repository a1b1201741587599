"""``memforge retemper`` and ``memforge explain``: new distributions from stored neighbours, and a
readable account of one row's retrieval."""
from __future__ import annotations

import logging
import math
import os
import tempfile

import numpy as np

from memforge.pipelines import executor, knn
from memforge.pipelines.datastore_rows import DatastoreRows
from memforge.pipelines.stage import Published
from memforge.pipelines.targets import Targets
from memforge.pipelines.tokenizer import load_tokenizer
from memforge.storage import fs
from memforge.storage.artifact import Artifact, input_uri, open_artifact
from memforge.storage.errors import MemforgeError
from memforge.storage.shards import Shard, load_layout, load_plan
from memforge.storage.stores import TOKENIZER_DIR, DistributionStore, NeighbourStore, PartOffsets, TokenStore

log = logging.getLogger("memforge")


def _inputs(artifact: Artifact) -> dict[str, Artifact]:
    """The artifact's inputs as they are now; refuses any that changed since it was built."""
    inputs = {}
    for record in artifact.manifest["inputs"]:
        current = open_artifact(input_uri(artifact, record), record["kind"])
        if current.content_digest != record["content_digest"]:
            raise MemforgeError(f"{current.uri}: changed since {artifact.uri} was built "
                                f"(content {current.content_digest[:12]}, recorded {record['content_digest'][:12]})")
        inputs[record["role"]] = current
    return inputs


def _with_neighbours(targets: Artifact, command: str) -> Artifact:
    """``targets``, once it holds its neighbours (``targets.keep_neighbours``)."""
    if not targets.params.get("keep_neighbours", True):
        raise MemforgeError(f"{targets.uri}: {command} needs the stored neighbours, and this artifact was built "
                            "with targets.keep_neighbours: false; rebuild targets with keep_neighbours: true")
    return targets


def _artifacts_dir(artifact: Artifact) -> str | None:
    """The artifacts directory ``artifact`` was built in: the common parent of it and the inputs its
    manifest records by relative path (None when it records none so)."""
    relative = [input_uri(artifact, r) for r in artifact.manifest["inputs"] if "://" not in r["uri"]
                and not r["uri"].startswith("/")]
    if not relative or not fs.is_local(artifact.uri):
        return None
    return os.path.commonpath([artifact.uri, *relative])


def _check_out(out: str, source: Artifact, inputs: dict[str, Artifact]) -> None:
    """``--out`` may name a new place or an earlier retempered targets artifact, never its own source or
    inputs, nor an artifact of another kind."""
    for artifact in (source, *inputs.values()):
        if out == artifact.uri or artifact.uri.startswith(out + "/") or out.startswith(artifact.uri + "/"):
            raise MemforgeError(f"--out: {out} is (or holds, or lies inside) {artifact.uri}, which retemper reads")
    if fs.exists(fs.join(out, "_manifest.json")):
        kind = open_artifact(out).kind
        if kind != "targets":
            raise MemforgeError(f"--out: {out} holds a {kind} artifact, not targets; choose another path")


def retemper(targets_uri: str, temperature: float, k: int | None = None, out: str | None = None,
             rebuild: bool = False, width: int | None = None) -> str:
    """Distributions for another temperature (and optionally a smaller k and width) from the stored
    neighbours, without searching, under the source's keep rule (``min_prob``, ``mass``; a null width stays
    k): the result equals, fingerprint included, a fresh ``targets`` run with those params and the source's
    candidates (the k nearest of the same candidates are the first k of the stored, exactly re-ranked
    neighbours)."""
    source = _with_neighbours(open_artifact(targets_uri, "targets"), "retemper")
    params = source.params
    k = params["k"] if k is None else k
    width = params["width"] if width is None else width
    if not (temperature > 0 and math.isfinite(temperature)):  # refuses NaN and infinity too
        raise MemforgeError(f"--temperature: must be a positive finite number, got {temperature}")
    if not 0 < k <= params["k"]:
        raise MemforgeError(f"--k: {k} must be between 1 and the stored k ({params['k']})")
    if width is not None and not 0 < width <= k:
        raise MemforgeError(f"--width: {width} must be between 1 and k ({k}), as targets.width must; "
                            f"the stored width is {params['width'] or params['k']}")
    rule = knn.KeepRule.of(k, width, params.get("min_prob"), params.get("mass"))
    new_params = {**params, "temperature": temperature, "k": k, "width": width,
                  "min_prob": params.get("min_prob"), "mass": params.get("mass")}
    out = fs.normalize(out or f"{source.uri}-T{temperature:g}-k{k}")
    inputs = _inputs(source)
    _check_out(out, source, inputs)
    stored_neighbours, stored = NeighbourStore.open(source.uri), DistributionStore.open(source.uri)
    n_rows = stored_neighbours.rows.n_rows
    chunk = stored.rows.array("probs").chunks[0]  # each store in its source's geometry
    neighbour_unit, unit = stored_neighbours.rows.unit_rows(), stored.rows.unit_rows()
    rows = DatastoreRows(inputs["index"].uri, inputs["index"].fingerprint)
    created = {}

    def create() -> None:
        created["neighbours"] = NeighbourStore.create(out, n_rows, k, chunk, neighbour_unit // chunk,
                                                      ids_dtype=str(stored_neighbours.rows.array("ids").dtype))
        created["distributions"] = DistributionStore.create(out, n_rows, rule.width,
                                                            str(stored.rows.array("probs").dtype), chunk, unit // chunk)

    def write(shard: Shard) -> dict[str, str]:
        ids = stored_neighbours.ids(shard.start, shard.stop)[:, :k]
        dists = stored_neighbours.dists(shard.start, shard.stop)[:, :k]
        files = created["neighbours"].write_shard(shard, ids, dists)
        sparse = knn.distributions(dists, rows.values_of(ids), temperature, rule)
        files.update(created["distributions"].write_shard(shard, *sparse))
        return files

    def finalize() -> Published:
        arrays = {**created["neighbours"].rows.describe(), **created["distributions"].rows.describe()}
        stats = {**source.manifest["stats"], "temperature": temperature, "k": k, "width": width,
                 "retempered_from": source.uri}
        return Published(counts=source.manifest["counts"], arrays=arrays, stats=stats)

    if not executor.derive(out, "targets", new_params, inputs, source.manifest["format"], rebuild,
                           Targets.code_files(), load_plan(source.uri), load_layout(source.uri), create, write,
                           finalize, root=_artifacts_dir(source)):
        return out
    log.info("retemper: published %s (T=%g, k=%d)", out, temperature, k)
    return out


def explain(targets_uri: str, row: int, context: int = 24) -> str:
    """The query's context and next token, then each neighbour's context, next token, distance, probability."""
    targets = _with_neighbours(open_artifact(targets_uri, "targets"), "explain")
    inputs = _inputs(targets)
    tokens = _inputs(inputs["queries"])["tokens"]
    n_rows = targets.manifest["counts"]["rows"]
    if not 0 <= row < n_rows:
        raise MemforgeError(f"--row: {row} is out of range (the artifact has {n_rows} rows)")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = load_tokenizer(fs.local_dir(tokens.path(TOKENIZER_DIR), scratch))
    splits = tokens.manifest["stats"]["splits"]

    def window(split: str, datastore_row: int) -> tuple[str, str]:
        offsets = PartOffsets.from_json(splits[split]["parts"])
        start = max(0, datastore_row + 1 - context)
        ids = TokenStore(tokens.uri, split).read_rows(offsets, start, datastore_row + 2)
        return tokenizer.decode(ids[:-1]), tokenizer.decode(ids[-1:])

    split, temperature = targets.params["split"], targets.params["temperature"]
    ids = NeighbourStore.open(targets.uri).ids(row, row + 1)[0]
    dists = NeighbourStore.open(targets.uri).dists(row, row + 1)[0]
    valid = ids >= 0
    weights = np.exp(-(dists[valid] - dists[valid].min()) / temperature)
    probs = weights / weights.sum()
    text, following = window(split, row)
    lines = [f"{split} row {row}  (k={targets.params['k']}, T={temperature:g})",
             f"query context: {text!r}", f"next token:    {following!r}", ""]
    for rank, (neighbour, distance, p) in enumerate(zip(ids[valid], dists[valid], probs), 1):
        text, following = window("train", int(neighbour))
        lines.append(f"#{rank:<3} id {neighbour}  distance {distance:.4f}  p {p:.4f}  next {following!r}")
        lines.append(f"     context: {text!r}")
    dist = DistributionStore.open(targets.uri)
    pairs = [(tokenizer.decode([int(t)]), float(p)) for t, p in zip(dist.tokens(row, row + 1)[0],
                                                                     dist.probs(row, row + 1)[0]) if t >= 0]
    lines += ["", "distribution: " + ", ".join(f"{t!r}: {p:.4f}" for t, p in pairs),
              f"truncated mass: {float(dist.truncated(row, row + 1)[0]):.4f}"]
    return "\n".join(lines)
