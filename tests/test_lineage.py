"""Lineage of a real 3-artifact chain tokens -> keys -> targets, via ``memforge lineage``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from memforge.flows.cli import main
from memforge.storage.artifact import ArtifactBuild, open_artifact
from memforge.storage.lineage import render
from memforge.storage.shards import ShardPlan
from memforge.storage.stores import DistributionStore, KeyStore, NeighbourStore, TokenStore
from memforge.storage.verify import verify

pytestmark = pytest.mark.stage

ROWS = 300
VOCAB = 1000
DIM = 8
K = 4
WIDTH = 3
CHUNK, SHARD_CHUNKS = 32, 2


def build_tokens(uri: str) -> str:
    """Publish a TokenStore artifact: ROWS tokens in 3 Parquet parts, documents of 50 tokens."""
    build = ArtifactBuild.begin(uri, "tokens", {"seed": 0, "rows": ROWS})
    store = TokenStore(uri)
    plan = build.plan(ShardPlan.even(ROWS, 100))
    for shard in build.pending(plan):
        rng = np.random.default_rng((0, shard.id))
        rows = np.arange(shard.start, shard.stop)
        files = store.write_shard(shard, rng.integers(0, VOCAB, shard.rows), rows // 50)
        build.markers.mark_done(shard, files)
    build.publish(counts={"rows": ROWS, "vocab_size": VOCAB})
    return uri


def build_keys(uri: str, tokens_uri: str, seed: int, rebuild: bool = False) -> str:
    """Publish a KeyStore artifact from the tokens: random keys, next token of each position as value."""
    tokens = open_artifact(tokens_uri, kind="tokens")
    build = ArtifactBuild.begin(uri, "keys", {"seed": seed, "dim": DIM}, inputs={"tokens": tokens},
                                rebuild=rebuild)
    token_store = TokenStore(tokens_uri)
    all_tokens = np.concatenate([
        token_store.read_shard(s).column("token").to_numpy() for s in ShardPlan.even(ROWS, 100).shards
    ])
    next_tokens = np.roll(all_tokens, -1)
    store = KeyStore.create(uri, ROWS, dim=DIM, chunk_rows=CHUNK, shard_chunks=SHARD_CHUNKS)
    plan = build.plan(store.rows.plan())
    for shard in build.pending(plan):
        keys = np.random.default_rng((seed, shard.id)).standard_normal((shard.rows, DIM))
        files = store.write_shard(shard, keys, next_tokens[shard.start:shard.stop])
        build.markers.mark_done(shard, files)
    build.publish(counts={"rows": ROWS, "vocab_size": VOCAB}, arrays=store.rows.describe())
    return uri


def build_targets(uri: str, keys_uri: str) -> str:
    """Publish neighbours + distributions in one artifact: exact kNN over the keys, excluding self."""
    keys_art = open_artifact(keys_uri, kind="keys")
    build = ArtifactBuild.begin(uri, "targets", {"k": K, "width": WIDTH}, inputs={"keys": keys_art})
    source = KeyStore.open(keys_uri)
    keys, vals = source.keys().astype(np.float32), source.vals()
    neighbours = NeighbourStore.create(uri, ROWS, K, chunk_rows=CHUNK, shard_chunks=SHARD_CHUNKS)
    dists_store = DistributionStore.create(uri, ROWS, WIDTH, chunk_rows=CHUNK, shard_chunks=SHARD_CHUNKS)
    assert neighbours.rows.plan() == dists_store.rows.plan()
    plan = build.plan(neighbours.rows.plan())
    for shard in build.pending(plan):
        q = keys[shard.start:shard.stop]
        d = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
        d[np.arange(shard.rows), np.arange(shard.start, shard.stop)] = np.inf
        ids = np.argsort(d, axis=1, kind="stable")[:, :K]
        dist = np.take_along_axis(d, ids, axis=1).astype(np.float32)
        toks = np.full((shard.rows, WIDTH), -1, np.int32)
        probs = np.zeros((shard.rows, WIDTH), np.float32)
        truncated = np.zeros(shard.rows, np.float32)
        weights = np.exp(-(dist - dist[:, :1]))
        weights /= weights.sum(1, keepdims=True)
        for r in range(shard.rows):
            agg: dict[int, float] = {}
            for token, w in zip(vals[ids[r]], weights[r]):
                agg[int(token)] = agg.get(int(token), 0.0) + float(w)
            ranked = sorted(agg.items(), key=lambda kv: -kv[1])
            kept = ranked[:WIDTH]
            toks[r, :len(kept)] = [t for t, _ in kept]
            probs[r, :len(kept)] = [p for _, p in kept]
            truncated[r] = sum(p for _, p in ranked[WIDTH:])
        files = neighbours.write_shard(shard, ids, dist)
        files.update(dists_store.write_shard(shard, toks, probs, truncated))
        build.markers.mark_done(shard, files)
    build.publish(counts={"rows": ROWS, "datastore_rows": ROWS, "vocab_size": VOCAB, "query_offset": 0},
                  arrays={**neighbours.rows.describe(), **dists_store.rows.describe()},
                  stats={"self_query": True})
    return uri


@pytest.fixture
def chain(tmp_path):
    """tokens -> keys -> targets, published under tmp_path; returns the three uris."""
    tokens = build_tokens(str(tmp_path / "tokens"))
    keys = build_keys(str(tmp_path / "keys" / "train"), tokens, seed=1)
    targets = build_targets(str(tmp_path / "targets" / "train"), keys)
    return tokens, keys, targets


def lineage_json(uri: str, capsys) -> dict:
    """Run ``memforge lineage URI --json`` and parse its output (asserting exit 0)."""
    capsys.readouterr()
    assert main(["lineage", uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_chain_is_sound(chain):
    for uri in chain:
        assert verify(uri) == [], uri
    targets = open_artifact(chain[2], kind="targets")
    assert sorted(targets.manifest["arrays"]) == [
        "distributions.zarr/probs", "distributions.zarr/tokens", "distributions.zarr/truncated",
        "neighbours.zarr/dists", "neighbours.zarr/ids",
    ]
    assert [i["role"] for i in targets.manifest["inputs"]] == ["keys"]


def test_lineage_text_names_every_ancestor(chain, capsys):
    tokens, keys, targets = chain
    capsys.readouterr()
    assert main(["lineage", targets]) == 0
    out = capsys.readouterr().out
    for uri in chain:
        art = open_artifact(uri)
        line = next(line for line in out.splitlines() if f"  {uri}  " in line)
        assert f"fingerprint {art.fingerprint[:16]}" in line
        assert art.kind in line
    assert "[keys]" in out and "[tokens]" in out
    assert out.index(targets) < out.index(keys) < out.index(tokens)
    params_lines = [line.strip() for line in out.splitlines() if line.strip().startswith("params:")]
    assert len(params_lines) == 3
    assert {"k=4", "width=3"} <= set(params_lines[0].split())
    assert {"seed=1", "dim=8"} <= set(params_lines[1].split())
    assert {"seed=0", f"rows={ROWS}"} <= set(params_lines[2].split())
    assert sum(line.strip().startswith("code: memforge") for line in out.splitlines()) == 3
    assert "stale" not in out and "!" not in out


def test_lineage_json_tree(chain, capsys):
    tokens, keys, targets = chain
    root = lineage_json(targets, capsys)
    nodes = [root, root["inputs"][0], root["inputs"][0]["inputs"][0]]
    assert [len(n["inputs"]) for n in nodes] == [1, 1, 0]
    assert [n["role"] for n in nodes] == [None, "keys", "tokens"]
    for node, uri, kind in zip(nodes, [targets, keys, tokens], ["targets", "keys", "tokens"]):
        manifest = open_artifact(uri).manifest
        assert node["uri"] == uri
        assert node["kind"] == kind
        assert node["fingerprint"] == manifest["fingerprint"]
        assert node["params"] == manifest["params"]
        assert node["code"]["source_digest"] == manifest["code"]["source_digest"]
        assert len(node["code"]["source_digest"]) == 64
        assert node["created"] == manifest["run"]["finished_at"] and node["created"]
        assert node["run_id"] == manifest["run"]["run_id"] and node["run_id"]
        assert "error" not in node and "stale_input" not in node
    assert len({n["fingerprint"] for n in nodes}) == 3


def test_rebuilt_upstream_marks_input_stale(chain, capsys):
    tokens, keys, targets = chain
    old_keys = open_artifact(keys).content_digest
    build_keys(keys, tokens, seed=2, rebuild=True)
    new_keys_fp, new_keys = open_artifact(keys).fingerprint, open_artifact(keys).content_digest
    assert new_keys != old_keys
    assert verify(targets) == []  # the targets themselves are intact, only out of date

    root = lineage_json(targets, capsys)
    keys_node = root["inputs"][0]
    assert keys_node["fingerprint"] == new_keys_fp
    assert keys_node["stale_input"] == (f"built from content {old_keys[:12]}, upstream now holds "
                                        f"{new_keys[:12]} (fingerprint {new_keys_fp[:12]})")
    assert "stale_input" not in root and "stale_input" not in keys_node["inputs"][0]

    assert main(["lineage", targets]) == 0
    out = capsys.readouterr().out
    assert f"! stale: built from content {old_keys[:12]}" in out
    # The keys artifact's own lineage is not stale: it was built from the current tokens.
    assert "stale_input" not in lineage_json(keys, capsys)


def test_lineage_of_missing_or_unpublished_path_fails(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["lineage", missing]) != 0
    assert "no artifact here" in capsys.readouterr().out

    assert main(["lineage", missing, "--json"]) != 0
    node = json.loads(capsys.readouterr().out)
    assert node["uri"] == missing and "no artifact here" in node["error"] and node["inputs"] == []

    unpublished = tmp_path / "half"
    ArtifactBuild.begin(str(unpublished), "keys", {"seed": 0})
    assert main(["lineage", str(unpublished)]) != 0
    assert "not published" in capsys.readouterr().out


def test_lineage_text_shows_a_shared_ancestor_once():
    """A diamond (targets <- keys, targets <- index <- keys): the second path to keys is one line."""
    def node(kind, uri, inputs=()):
        return {"role": kind, "uri": uri, "kind": kind, "fingerprint": uri * 4, "params": {}, "code": {},
                "created": "2026-01-01", "run_id": "r", "stats": {}, "inputs": list(inputs)}

    keys = node("keys", "/a/keys", [node("tokens", "/a/tokens")])
    lines = render(node("targets", "/a/targets", [keys, node("index", "/a/index", [keys])]))
    assert sum("/a/tokens" in line for line in lines) == 1
    repeated = [line for line in lines if "/a/keys" in line]
    assert len(repeated) == 2 and repeated[1].endswith("(shown above)") and "(shown above)" not in repeated[0]
