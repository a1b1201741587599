"""index + targets on a small real-text datastore: exact distributions against a brute-force
reference, self-exclusion by id, IVF-PQ recall, bad input."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from memforge.flows.cli import main
from memforge.pipelines import sharded_index
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import DistributionStore, KeyStore, NeighbourStore, PartOffsets, TokenStore
from memforge.storage.verify import verify

from crash import kill_after_first_shard, rerun
from tiny_lm import make_gpt2, write_corpus

pytestmark = pytest.mark.stage

K, WIDTH, T = 8, 8, 8.0


@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    """Prepared and encoded tiny corpus (in-process Beam runner) with an exact index and targets."""
    root = tmp_path_factory.mktemp("targets")
    train = write_corpus(root / "corpus" / "train", 6, 120, seed=3)
    write_corpus(root / "corpus" / "validation", 2, 60, seed=4)
    model = make_gpt2(root / "model", [p.read_text() for p in train])
    (root / "params.yaml").write_text("{}\n")
    settings = {"artifacts_dir": root / "art", "encode.model": model,
                "corpus.train": f"[{root}/corpus/train/*.txt]",
                "corpus.validation": f"[{root}/corpus/validation/*.txt]",
                "encode.block_size": 32, "encode.stride": 16, "encode.chunk_rows": 64, "encode.shard_chunks": 2,
                "targets.k": K, "targets.width": WIDTH, "targets.temperature": T, "targets.keep_neighbours": "true"}
    args = ["--params", str(root / "params.yaml")]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    beam = ["--", "--direct_running_mode=in_memory"]
    for stage in ("prepare", "encode", "index", "targets"):
        assert main([stage, *args, *beam]) == 0, stage
    return {"root": root, "art": root / "art", "args": args, "beam": beam}


def reference(keys: np.ndarray, vals: np.ndarray, queries: np.ndarray, self_query: bool):
    """Brute force in float64: squared L2 to every datastore row, own row excluded, top-K,
    softmax(-d/T) summed per next token. Returns (ids, dists, {token: prob} per row, tie flags)."""
    keys, queries = keys.astype(np.float64), queries.astype(np.float64)
    dists = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    if self_query:
        np.fill_diagonal(dists, np.inf)
    order = np.argsort(dists, axis=1, kind="stable")
    ids = order[:, :K]
    near = np.take_along_axis(dists, ids, axis=1)
    boundary_tie = np.isclose(near[:, -1], np.take_along_axis(dists, order[:, K:K + 1], axis=1)[:, 0], rtol=1e-6)
    rows = []
    for row_ids, row_d in zip(ids, near):
        weights = np.exp(-(row_d - row_d.min()) / T)
        probs: dict[int, float] = {}
        for j, w in zip(row_ids, weights):
            probs[int(vals[j])] = probs.get(int(vals[j]), 0.0) + w / weights.sum()
        rows.append(probs)
    return ids, near, rows, boundary_tie


@pytest.mark.parametrize("split", ["train", "validation"])
def test_exact_index_targets_equal_brute_force(datastore, split):
    art = datastore["art"]
    data = KeyStore.open(str(art / "keys" / "train"))
    keys, vals = data.keys().astype(np.float32), data.vals()
    queries = KeyStore.open(str(art / "keys" / split)).keys().astype(np.float32)
    uri = str(art / "targets" / split)
    neighbours, dist = NeighbourStore.open(uri), DistributionStore.open(uri)
    ids, tokens, probs, truncated = neighbours.ids(), dist.tokens(), dist.probs(), dist.truncated()
    ref_ids, ref_d, ref_rows, ties = reference(keys, vals, queries, self_query=split == "train")
    assert ties.mean() < 0.2, "too many rows with a tie at the k-th neighbour to compare"
    compared = 0
    for row in np.nonzero(~ties)[0]:
        assert set(ids[row]) == set(ref_ids[row]), row
        np.testing.assert_allclose(np.sort(neighbours.dists(row, row + 1)[0]), ref_d[row], rtol=1e-5, atol=1e-5)
        stored = {int(t): float(p) for t, p in zip(tokens[row], probs[row]) if t >= 0}
        assert stored.keys() == ref_rows[row].keys(), row
        for token, p in ref_rows[row].items():
            assert abs(stored[token] - p) <= 1e-5, (row, token)
        compared += 1
    assert compared >= 0.8 * len(queries)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)  # width == k: nothing truncated
    assert np.all(truncated <= 1e-6)
    if split == "train":
        assert not np.any(ids == np.arange(len(ids))[:, None]), "a row lists itself"
    assert verify(uri) == []
    manifest = open_artifact(uri, "targets").manifest
    assert manifest["stats"]["self_query"] == (split == "train") and manifest["stats"]["k"] == K


def test_ivf_pq_recall_and_top1_agreement(datastore, tmp_path, capsys, monkeypatch):
    """IVF-PQ: recall@k is measured and reported; top-1 token agrees with the exact targets on most rows.
    The datastore rows (values.npy, keys.npy) and FAISS's files are hashed as they are written, never read
    back for it at publish."""
    from memforge.storage import fs

    hashed_by_reading, checksum = [], fs.file_checksum
    monkeypatch.setattr(fs, "file_checksum", lambda uri: hashed_by_reading.append(uri) or checksum(uri))
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "index.factory=IVF16,PQ8",
            "--set", "index.nprobe=4", "--set", "index.train_points_per_list=39"]
    for stage in ("index", "targets"):
        capsys.readouterr()
        assert main([stage, *args, *datastore["beam"]]) == 0
        assert capsys.readouterr().out.splitlines() == [str(art / stage)], "stdout carries only the result"
        if stage == "index":  # (targets then re-hashes a sample of its inputs, as every stage does)
            assert not [uri for uri in hashed_by_reading if uri.endswith(("values.npy", "keys.npy", ".index"))]
    assert {"values.npy", "keys.npy"} <= open_artifact(str(art / "index"), "index").manifest["files"].keys()
    index = open_artifact(str(art / "index"), "index").manifest["stats"]
    assert index["factory"] == "IVF16,PQ8" and index["nlist"] == 16 and index["nprobe"] == 4
    assert index["merge"] == "ondisk" and (art / "index" / "merged.ivfdata").is_file()
    assert 0.0 < index["recall_at_k"] <= 1.0 and index["recall_queries"] > 0
    assert main(["ls", str(art)]) == 0
    assert f"recall@{index['recall_k']}={index['recall_at_k']}" in capsys.readouterr().out
    assert main(["lineage", str(art / "index")]) == 0
    assert f"recall_at_k={index['recall_at_k']}" in capsys.readouterr().out
    exact = DistributionStore.open(str(datastore["art"] / "targets" / "train")).tokens()[:, 0]
    approx = DistributionStore.open(str(art / "targets" / "train")).tokens()[:, 0]
    agreement = float((exact == approx).mean())
    print(f"IVF16,PQ8 nprobe=4: recall@{index['recall_k']} = {index['recall_at_k']}, top-1 agreement {agreement:.3f}")
    assert agreement > 0.5
    ids = NeighbourStore.open(str(art / "targets" / "train")).ids()
    assert not np.any(ids == np.arange(len(ids))[:, None])
    # Without the neighbour store the re-ranked candidates are not sorted (a distribution does not depend
    # on their order): the same distributions.
    unsorted = tmp_path / "unsorted"
    unsorted.mkdir()
    for name in ("tokens", "keys", "index"):
        os.symlink(art / name, unsorted / name)
    assert main(["targets", *args, "--set", f"artifacts_dir={unsorted}", "--set", "targets.keep_neighbours=false",
                 *datastore["beam"]]) == 0
    for split in ("train", "validation"):
        kept, bare = (DistributionStore.open(str(a / "targets" / split)) for a in (art, unsorted))
        np.testing.assert_array_equal(kept.tokens(), bare.tokens())
        np.testing.assert_allclose(kept.probs(), bare.probs(), rtol=0, atol=1e-7)
        assert not (unsorted / "targets" / split / "neighbours.zarr").exists()
    # The merged index finds its lists beside it, so the artifact can move (e.g. dvc pull elsewhere).
    queries = KeyStore.open(str(datastore["art"] / "keys" / "validation")).keys().astype(np.float32)
    before = sharded_index.ShardedIndex(str(art / "index"), "", [], 4, merged=True).search(queries, K)
    assert str(art).encode() not in (art / "index" / "merged.index").read_bytes(), "no path inside the index"
    moved = tmp_path / "elsewhere" / "index"
    shutil.copytree(art / "index", moved)
    shutil.rmtree(art / "index")
    after = sharded_index.ShardedIndex(str(moved), "", [], 4, merged=True).search(queries, K)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])


def test_pq_without_lists_trains_on_train_sample_and_fans_out_over_shards(datastore, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "index.factory=PQ4",
            "--set", "index.train_sample=300"]
    for stage in ("index", "targets"):
        assert main([stage, *args, *datastore["beam"]]) == 0
    index = open_artifact(str(art / "index"), "index").manifest
    assert index["stats"]["train_sample"] == 300 and index["stats"]["merge"] == "none"
    assert index["shards"]["count"] > 1 and not (art / "index" / "merged.index").exists()
    ids = NeighbourStore.open(str(art / "targets" / "train")).ids()
    assert (ids >= 0).all() and not np.any(ids == np.arange(len(ids))[:, None])
    assert verify(str(art / "targets" / "train")) == []


def test_same_document_window_excludes_nearby_rows(datastore, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys", "index"):
        os.symlink(datastore["art"] / name, art / name)
    window = 150  # wider than some documents: nearby rows of other documents exist
    assert main(["targets", *datastore["args"], "--set", f"artifacts_dir={art}",
                 "--set", f"targets.exclude_same_document_window={window}", *datastore["beam"]]) == 0
    ids = NeighbourStore.open(str(art / "targets" / "train")).ids()
    unfiltered = NeighbourStore.open(str(datastore["art"] / "targets" / "train")).ids()
    rows = np.arange(len(ids))[:, None]
    tokens = json.loads((datastore["art"] / "tokens" / "_manifest.json").read_text())
    assert tokens["counts"]["train_tokens"] == len(ids) + 1
    offsets = PartOffsets.from_json(tokens["stats"]["splits"]["train"]["parts"])
    docs = TokenStore(str(datastore["art"] / "tokens"), "train").read_rows(offsets, 1, len(ids) + 1, column="doc")

    def same_document_nearby(found: np.ndarray) -> np.ndarray:  # row i's value is token i + 1, of document docs[i]
        return (found >= 0) & (np.abs(found - rows) <= window) & (docs[np.clip(found, 0, None)] == docs[rows])

    assert not np.any(same_document_nearby(ids) & (ids != rows)), "a same-document neighbour within the window"
    # Nearby rows of another document (across a document boundary) are kept: every unfiltered neighbour that
    # is not excluded stays among the k nearest of the rest.
    nearby = (unfiltered >= 0) & (np.abs(unfiltered - rows) <= window)
    assert (nearby & ~same_document_nearby(unfiltered)).sum() > 0, \
        "the corpus must have neighbours across a document boundary"
    for row in range(len(ids)):
        kept = set(unfiltered[row][~same_document_nearby(unfiltered)[row]]) - {-1}
        assert kept <= set(ids[row]), row


@pytest.mark.parametrize("setting, new_index, message", [
    (["targets.k=100000", "targets.width=8"], [], "targets.k: 100000 must be smaller than the datastore size"),
    (["targets.nprobe=64", "index.factory=IVF16,Flat"], ["index.nprobe=4"],
     "targets.nprobe: 64 exceeds the index's nlist (16)"),
    (["index.exact_keys=false"], ["index.exact_keys=false"],
     "targets.exact_distances: {art}/index has no exact keys (built with index.exact_keys: false)"),
])
def test_bad_targets_input(datastore, tmp_path, capsys, setting, new_index, message):
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys", "index"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}"]
    for item in setting:
        args += ["--set", item]
    if new_index:  # the fault is in how the index was built
        (art / "index").unlink()
        index_args = [arg for item in new_index for arg in ("--set", item)]
        assert main(["index", *args, *index_args, *datastore["beam"]]) == 0
    capsys.readouterr()
    assert main(["targets", *args, *datastore["beam"]]) == 1
    assert message.format(art=art) in capsys.readouterr().err
    assert not (art / "targets" / "train" / "_manifest.json").exists()


def test_ondisk_merge_of_a_flat_index_is_refused_before_training(datastore, tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(datastore["art"] / "keys", art / "keys")
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "index.merge=ondisk"]
    assert main(["index", *args, *datastore["beam"]]) == 1
    assert "index.merge: ondisk applies to IVF indexes only" in capsys.readouterr().err
    assert not (art / "index" / "trained.index").exists() and not (art / "index" / "_manifest.json").exists()


def test_index_from_another_key_store_is_refused(datastore, tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(datastore["art"] / "tokens", art / "tokens")
    os.symlink(datastore["art"] / "index", art / "index")
    assert main(["encode", *datastore["args"], "--set", f"artifacts_dir={art}", "--set", "encode.dtype=float32",
                 *datastore["beam"]]) == 0
    capsys.readouterr()
    assert main(["targets", *datastore["args"], "--set", f"artifacts_dir={art}", *datastore["beam"]]) == 1
    assert "its inputs disagree on keys/train: " in capsys.readouterr().err


def test_retemper_equals_a_fresh_run(datastore, tmp_path):
    """On IVF-PQ with exact re-ranking, where the index's order and the exact order differ: retemper for a
    smaller k (and width), and for another T, equals a fresh run with the same candidates, bit for bit and
    fingerprint included. A fresh run with only k candidates keeps other neighbours and has another
    fingerprint."""
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "index.factory=IVF16,PQ8",
            "--set", "index.nprobe=4", "--set", "index.train_points_per_list=39"]
    assert main(["index", *args, *datastore["beam"]]) == 0
    assert main(["targets", *args, *datastore["beam"]]) == 0
    source = art / "targets" / "train"
    assert open_artifact(str(source), "targets").params["candidates"] == K

    def fresh(*settings: str) -> dict:
        shutil.rmtree(art / "targets")
        extra = [arg for item in settings for arg in ("--set", item)]
        assert main(["targets", *args, *extra, *datastore["beam"]]) == 0
        return open_artifact(str(source), "targets").manifest

    retempered = {}
    for label, options in (("k6", ["--temperature", str(T), "--k", "6", "--width", "6"]),
                           ("T2", ["--temperature", "2"])):
        out = tmp_path / label
        assert main(["retemper", str(source), *options, "--out", str(out)]) == 0
        retempered[label] = open_artifact(str(out), "targets").manifest
        assert verify(str(out)) == []
    for label, settings in (("k6", ["targets.k=6", "targets.width=6", f"targets.candidates={K}"]),
                            ("T2", ["targets.temperature=2"])):
        manifest = fresh(*settings)
        assert retempered[label]["fingerprint"] == manifest["fingerprint"], label
        assert retempered[label]["files"] == manifest["files"], label
    only_k = fresh("targets.k=6", "targets.width=6")
    assert only_k["fingerprint"] != retempered["k6"]["fingerprint"]
    ids = NeighbourStore.open(str(source)).ids()
    assert (np.sort(ids, axis=1) != np.sort(NeighbourStore.open(str(tmp_path / "k6")).ids(), axis=1)).any(), \
        "with 6 candidates some rows keep other neighbours than the 6 nearest of 8"


def test_a_keep_rule_on_real_distributions_and_retemper_under_it(datastore, tmp_path):
    """A floor and a mass with no width (the cap is k) on the tiny datastore's real distributions: rows keep
    different numbers of tokens, every kept token passes the floor, most probable first, the kept mass stops
    at the first token that reaches the mass, the remainder is exactly what is not kept, and no row keeps more
    than k. retemper under the same rule equals a fresh run, fingerprint included; the rule's params are in
    the fingerprint."""
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys", "index"):
        os.symlink(datastore["art"] / name, art / name)
    floor, mass = 0.02, 0.9
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "targets.width=null",
            "--set", f"targets.min_prob={floor}", "--set", f"targets.mass={mass}"]
    assert main(["targets", *args, *datastore["beam"]]) == 0
    source = art / "targets" / "train"
    ruled, unruled = DistributionStore.open(str(source)), DistributionStore.open(str(datastore["art"] / "targets" /
                                                                                     "train"))
    assert ruled.width == K
    tokens, probs, truncated = ruled.tokens(), ruled.probs().astype(np.float64), ruled.truncated()
    full_tokens, full_probs = unruled.tokens(), unruled.probs().astype(np.float64)  # width k: every token
    kept = (tokens >= 0).sum(axis=1)
    assert len(set(kept.tolist())) > 2 and kept.max() <= K
    for row in range(len(tokens)):
        n = kept[row]
        assert (tokens[row, n:] == -1).all() and (probs[row, n:] == 0).all()
        assert (probs[row, :n] >= floor * (1 - 1e-6)).all() and (np.diff(probs[row, :n]) <= 0).all()
        np.testing.assert_array_equal(tokens[row, :n], full_tokens[row, :n])  # the same ranking, cut sooner
        cumulative = np.cumsum(probs[row, :n])
        assert (cumulative[:-1] < mass).all()
        next_p = full_probs[row, n] if n < K else 0.0
        assert cumulative[-1] >= mass - 1e-6 or next_p < floor * (1 + 1e-6)
        assert truncated[row] == pytest.approx(1 - probs[row, :n].sum(), abs=1e-6)
    assert verify(str(source)) == []
    retempered = tmp_path / "T2"
    assert main(["retemper", str(source), "--temperature", "2", "--out", str(retempered)]) == 0
    shutil.rmtree(art / "targets")
    assert main(["targets", *args, "--set", "targets.temperature=2", *datastore["beam"]]) == 0
    fresh, again = (open_artifact(str(path), "targets").manifest for path in (source, retempered))
    assert again["fingerprint"] == fresh["fingerprint"] and again["files"] == fresh["files"]
    assert fresh["params"]["min_prob"] == floor and fresh["params"]["mass"] == mass
    assert open_artifact(str(datastore["art"] / "targets" / "train")).params["min_prob"] is None


def test_retemper_refuses_bad_values(datastore, tmp_path, capsys):
    source = str(datastore["art"] / "targets" / "train")
    assert main(["retemper", source, "--temperature", "0", "--out", str(tmp_path / "a")]) == 1
    assert "--temperature: must be a positive finite number" in capsys.readouterr().err
    assert main(["retemper", source, "--temperature", "2", "--k", str(K + 1), "--out", str(tmp_path / "b")]) == 1
    assert f"--k: {K + 1} must be between 1 and the stored k ({K})" in capsys.readouterr().err
    # A smaller k than the stored width needs a width within it, as a fresh run does (never lowered silently).
    assert main(["retemper", source, "--temperature", "2", "--k", "6", "--out", str(tmp_path / "c")]) == 1
    assert f"--width: {WIDTH} must be between 1 and k (6), as targets.width must" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_explain_prints_query_and_neighbours(datastore, capsys):
    assert main(["explain", str(datastore["art"] / "targets" / "train"), "--row", "40", "--context", "8"]) == 0
    out = capsys.readouterr().out
    ids = NeighbourStore.open(str(datastore["art"] / "targets" / "train")).ids(40, 41)[0]
    assert out.startswith(f"train row 40  (k={K}, T={T:g})")
    assert "query context: " in out and "next token:" in out and "distribution: " in out
    for rank, neighbour in enumerate(ids, 1):
        assert f"#{rank:<3} id {neighbour}  distance " in out
    assert main(["explain", str(datastore["art"] / "targets" / "train"), "--row", "999999"]) == 1


def test_sigkill_mid_targets_then_rerun_is_byte_identical(datastore, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys", "index"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}"]
    markers = art / "targets" / "train" / "_shards"
    total = json.loads((datastore["art"] / "targets" / "train" / "_manifest.json").read_text())["shards"]["count"]
    done = kill_after_first_shard(["targets", *args], markers)
    assert 0 < done < total, f"kill landed outside the run ({done}/{total})"
    finished = rerun(["targets", *args])
    assert finished.returncode == 0, finished.stderr
    skipped = int(re.search(r"targets: train: \d+ rows in \d+ shards; (\d+) shards already done \(skipped\)",
                            finished.stderr).group(1))
    assert done <= skipped < total, finished.stderr[-3000:]
    for split in ("train", "validation"):
        mine = json.loads((art / "targets" / split / "_manifest.json").read_text())["files"]
        reference = json.loads((datastore["art"] / "targets" / split / "_manifest.json").read_text())["files"]
        assert mine == reference


def test_query_dimension_must_match_the_index(datastore, tmp_path, capsys):
    """Validation keys from another model (d=48) against a d=32 index are refused, naming both key stores."""
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(datastore["art"] / "tokens", other / "tokens")
    texts = [p.read_text() for p in sorted((datastore["root"] / "corpus" / "train").glob("*.txt"))]
    wide = make_gpt2(tmp_path / "wide", texts, n_embd=48)
    assert main(["encode", *datastore["args"], "--set", f"artifacts_dir={other}", "--set", f"encode.model={wide}",
                 *datastore["beam"]]) == 0
    art = tmp_path / "art"
    (art / "keys").mkdir(parents=True)
    for name in ("tokens", "index"):
        os.symlink(datastore["art"] / name, art / name)
    os.symlink(datastore["art"] / "keys" / "train", art / "keys" / "train")
    os.symlink(other / "keys" / "validation", art / "keys" / "validation")
    capsys.readouterr()
    assert main(["targets", *datastore["args"], "--set", f"artifacts_dir={art}", *datastore["beam"]]) == 1
    err = capsys.readouterr().err
    assert "its inputs disagree on keys/validation: " in err and str(art / "index") in err
    assert not (art / "targets").exists()  # refused before any split started


def test_query_blocks_and_optional_neighbours(chain, tmp_path, capsys):
    """Blocks of 100 queries give the same distributions as the default blocks; without neighbours the
    artifact holds only its distributions, verifies, and retemper/explain say what they need."""
    from chain import stage_args

    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys", "index"):
        (art / name).symlink_to(chain["art"] / name)
    args = stage_args(chain["root"], art, **{"targets.keep_neighbours": "false", "targets.query_block_rows": 100})
    assert main(["targets", *args, "--", "--direct_running_mode=in_memory"]) == 0
    for split in ("train", "validation"):
        ours, theirs = art / "targets" / split, chain["art"] / "targets" / split
        assert verify(str(ours)) == [] and not (ours / "neighbours.zarr").exists()
        mine, reference = DistributionStore.open(str(ours)), DistributionStore.open(str(theirs))
        for column in ("tokens", "probs", "truncated"):
            assert np.array_equal(getattr(mine, column)(), getattr(reference, column)()), (split, column)
    assert NeighbourStore.open(str(chain["art"] / "targets" / "train")).ids().dtype == np.int32
    capsys.readouterr()
    assert main(["retemper", str(art / "targets" / "train"), "--temperature", "2"]) == 1
    assert "retemper needs the stored neighbours" in capsys.readouterr().err
    assert main(["explain", str(art / "targets" / "validation"), "--row", "0"]) == 1
    assert "targets.keep_neighbours: false" in capsys.readouterr().err


def test_unmerged_ivf_shards_and_pq_distances_are_working_configurations(datastore, tmp_path):
    """IVF with ``index.merge: none`` (the only path on object stores: shards' lists stacked at search time)
    finds the same neighbours as the merged on-disk index; ``index.exact_keys: false`` with
    ``targets.exact_distances: false`` stores PQ distances in ascending order and verifies."""
    ivf = ["--set", "index.factory=IVF16,PQ8", "--set", "index.nprobe=4", "--set", "index.train_points_per_list=39",
           "--set", "index.exact_keys=false", "--set", "targets.exact_distances=false"]
    runs = {}
    for merge in ("none", "ondisk"):
        art = tmp_path / merge
        art.mkdir()
        for name in ("tokens", "keys"):
            os.symlink(datastore["art"] / name, art / name)
        args = [*datastore["args"], "--set", f"artifacts_dir={art}", *ivf, "--set", f"index.merge={merge}"]
        for stage in ("index", "targets"):
            assert main([stage, *args, *datastore["beam"]]) == 0, (merge, stage)
        index = open_artifact(str(art / "index"), "index").manifest
        assert index["stats"]["merge"] == merge and "keys.npy" not in index["files"]
        runs[merge] = art / "targets" / "train"
        assert verify(str(runs[merge])) == []
    unmerged, merged = (NeighbourStore.open(str(runs[name])) for name in ("none", "ondisk"))
    np.testing.assert_array_equal(unmerged.ids(), merged.ids())
    np.testing.assert_array_equal(unmerged.dists(), merged.dists())
    dists = unmerged.dists()
    assert np.all(np.diff(np.where(np.isfinite(dists), dists, np.inf), axis=1) >= 0), "PQ distances ascending"
    probs = DistributionStore.open(str(runs["none"]))
    np.testing.assert_allclose(probs.probs().sum(axis=1) + probs.truncated(), 1.0, atol=1e-5)


@pytest.mark.parametrize("factory", ["exact", "IVF16,PQ8x4"])
def test_other_execution_settings_give_byte_identical_targets(datastore, tmp_path, monkeypatch, factory):
    """Targets rebuilt with other query blocks (3 queries, 1 at a chunk's end), workers and threads are the same
    bytes, on the exact index and on IVF-PQ (merged on disk). FAISS is set as it runs at a large model
    dimension (BLAS products for blocks of queries), and the stored distances are FAISS's own
    (``exact_distances: false``), so any rounding that depended on the block or the threads would show."""
    import faiss

    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 0)
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "keys") if factory != "exact" else ("tokens", "keys", "index"):
        os.symlink(datastore["art"] / name, art / name)
    args = [*datastore["args"], "--set", f"artifacts_dir={art}", "--set", "targets.exact_distances=false"]
    if factory != "exact":
        args += ["--set", f"index.factory={factory}", "--set", "index.nprobe=4", "--set",
                 "index.train_points_per_list=39"]
        assert main(["index", *args, *datastore["beam"]]) == 0
    assert main(["targets", *args, *datastore["beam"]]) == 0
    reference = {split: json.loads((art / "targets" / split / "_manifest.json").read_text())
                 for split in ("train", "validation")}
    shutil.rmtree(art / "targets")
    other = ["--set", "targets.query_block_rows=3", "--set", "runtime.num_workers=1",
             "--set", "runtime.threads_per_worker=2", "--set", "index.threads=2"]
    assert main(["targets", *args, *other, *datastore["beam"]]) == 0
    for split, manifest in reference.items():
        rebuilt = json.loads((art / "targets" / split / "_manifest.json").read_text())
        assert rebuilt["fingerprint"] == manifest["fingerprint"] and rebuilt["files"] == manifest["files"], split
