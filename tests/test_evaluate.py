"""evaluate on the tiny chain: kNN-LM and decoder + memory log-probabilities equal a brute-force reference
written here; λ and T are chosen on dev and every reported perplexity is on test; metrics, per-token
log-probabilities and plots are written and verified."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel

from memforge.flows.cli import main
from memforge.pipelines.encoder import load_encoder
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import KeyStore, TokenStore
from memforge.storage.verify import verify
from memforge.training.mlp_memory import MODEL_TYPE  # importing it registers the memory with the Auto classes

from chain import rewrite_manifest, stage_args

pytestmark = pytest.mark.stage

K = 8


@pytest.fixture(scope="module")
def evaluated(chain):
    grid = "evaluate.lambda_grid=[0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 0.95]"
    assert main(["evaluate", *chain["args"], "--set", grid]) == 0
    return chain["art"] / "eval"


def reference_log_probs(art, block_size=32, stride=16) -> tuple[np.ndarray, ...]:
    """(kNN-LM, decoder + memory, memory alone) log-probabilities of every validation row, and its nearest
    neighbour's squared distance, computed here in float64:
    the model run on each row's context (the window that owns the row), the FFN input of the last block
    as query and memory input; kNN-LM: log(λ p_kNN + (1-λ) p_dec) with exact distances to every datastore
    key and softmax(-d/T) over the k nearest; memory: log(λ_m p_mem + (1-λ_m) p_dec) with p_mem the
    softmax of the memory's logits / τ; λ, T, λ_m and τ those evaluate chose; memory alone: τ 1."""
    model = load_encoder(str(art / "decoder" / "model"))
    memory = AutoModel.from_pretrained(str(art / "memory" / "model")).double()  # the standard loader
    assert memory.config.model_type == MODEL_TYPE
    chosen = json.loads((art / "eval" / "metrics.json").read_text())
    knn_lambda, T, memory_lambda = chosen["knn_lambda"], chosen["temperature"], chosen["memory_lambda"]
    tau = chosen["memory_temperature"]
    captured = {}
    model.transformer.h[-1].mlp.register_forward_pre_hook(lambda _m, args: captured.update(q=args[0]))
    tokens = open_artifact(str(art / "tokens"), "tokens")
    parts = tokens.manifest["stats"]["splits"]["validation"]["parts"]
    stream = np.concatenate([TokenStore(tokens.uri, "validation").read_shard(name).column("token").to_numpy()
                             for name, _, _ in parts]).astype(np.int64)
    datastore = KeyStore.open(str(art / "keys" / "train"))
    keys, values = datastore.keys().astype(np.float64), datastore.vals().astype(np.int64)
    knnlm, with_memory, alone, nearest_distance = [], [], [], []
    for row in range(len(stream) - 1):
        target = row + 1
        window = 0 if target < block_size else (target - block_size) // stride + 1
        begin = window * stride
        with torch.no_grad():
            logits = model(torch.from_numpy(stream[begin:target])[None]).logits[0, -1].double()
            p_dec = torch.softmax(logits, -1)[stream[target]].item()
            memory_logits = memory(captured["q"][0, -1].double())
            p_mem = torch.softmax(memory_logits / tau, -1)[stream[target]].item()
            alone.append(torch.log_softmax(memory_logits, -1)[stream[target]].item())
        query = captured["q"][0, -1].double().numpy()
        dists = ((keys - query) ** 2).sum(1)
        nearest = np.argsort(dists, kind="stable")[:K]
        nearest_distance.append(dists[nearest[0]])
        weights = np.exp(-(dists[nearest] - dists[nearest].min()) / T)
        p_knn = weights[values[nearest] == stream[target]].sum() / weights.sum()
        knnlm.append(np.log(knn_lambda * p_knn + (1 - knn_lambda) * p_dec))
        with_memory.append(np.log(memory_lambda * p_mem + (1 - memory_lambda) * p_dec))
    return np.array(knnlm), np.array(with_memory), np.array(alone), np.array(nearest_distance)


def test_log_probs_equal_a_brute_force_reference(evaluated, chain):
    table = pq.read_table(evaluated / "token_log_probs.parquet")
    knnlm, with_memory, alone, nearest_distance = reference_log_probs(chain["art"])
    assert table.num_rows == len(knnlm)
    np.testing.assert_allclose(table.column("nearest_distance").to_numpy(), nearest_distance, rtol=1e-4, atol=1e-5)
    for column, reference in (("knnlm", knnlm), ("decoder+memory", with_memory), ("memory_alone", alone)):
        difference = np.abs(table.column(column).to_numpy() - reference)
        print(f"{column} log-prob vs reference: max |diff| {difference.max():.2e} over {len(reference)} tokens")
        assert difference.max() < 1e-5, column


def test_choices_are_made_on_dev_and_reported_on_test(evaluated, chain, capsys):
    """Dev and test are whole documents; each model's λ (and kNN-LM's T) is the dev optimum of its grid; the
    reported perplexities are the test split's at those values; the gain recovered is computed from them."""
    metrics = json.loads((evaluated / "metrics.json").read_text())
    parquet = pq.read_table(evaluated / "token_log_probs.parquet")
    table = {name: parquet.column(name).to_numpy() for name in parquet.column_names}
    tokens = open_artifact(str(chain["art"] / "tokens"), "tokens")
    docs = np.concatenate([TokenStore(tokens.uri, "validation").read_shard(name).column("doc").to_numpy()
                           for name, _, _ in tokens.manifest["stats"]["splits"]["validation"]["parts"]])[1:]
    dev = np.array(table["split"].astype(str)) == "dev"
    assert dev.sum() == metrics["dev_rows"] > 0 and (~dev).sum() == metrics["test_rows"] > 0
    assert metrics["protocol"] == {"name": "validation by document", "dev_fraction": 0.5, "split_seed": 0,
                                   **{side: {"split": "validation", "rows": int(mask.sum()),
                                             "documents": len(set(docs[mask]))}
                                      for side, mask in (("dev", dev), ("test", ~dev))}}
    assert not set(docs[dev]) & set(docs[~dev]), "a document on both sides"
    sweep = json.loads((evaluated / "lambda.json").read_text())
    assert [point["lambda"] for point in sweep] == [0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 0.95]
    for name, chosen in (("knnlm", metrics["knn_lambda"]), ("decoder+memory", metrics["memory_lambda"])):
        best = min(sweep, key=lambda point: point[f"{name}_dev"])
        assert best["lambda"] == chosen, name
        assert best[f"{name}_test"] == pytest.approx(metrics["perplexity"][name], rel=1e-4)
    by_temperature = metrics["knnlm_dev_perplexity_by_temperature"]
    assert set(by_temperature) == {"2.0", "4.0"} and by_temperature[str(metrics["temperature"])] == min(
        by_temperature.values())
    by_temperature = metrics["memory_dev_perplexity_by_temperature"]  # the memory's τ, chosen with its λ
    assert set(by_temperature) == {"0.8", "0.9", "1.0", "1.1", "1.25", "1.5"}
    assert by_temperature[str(metrics["memory_temperature"])] == min(by_temperature.values())
    assert min(by_temperature.values()) == pytest.approx(metrics["dev_perplexity"]["decoder+memory"], rel=1e-4)
    def ppl(column, mask):
        return float(np.exp(-table[column][mask].mean()))
    assert set(metrics["perplexity"]) == set(metrics["tokens_per_second"]) | {"memory_alone"} == {
        "decoder", "knnlm", "decoder+memory", "memory_alone"}  # each model named for what it is
    for name in ("decoder", "knnlm", "decoder+memory", "memory_alone"):
        assert metrics["perplexity"][name] == pytest.approx(ppl(name, ~dev), rel=1e-4)
        assert metrics["dev_perplexity"][name] == pytest.approx(ppl(name, dev), rel=1e-4)
    test = metrics["perplexity"]
    assert metrics["memory_gain_recovered"] == pytest.approx(
        (test["decoder"] - test["decoder+memory"]) / (test["decoder"] - test["knnlm"]), abs=1e-3)
    assert sweep[0]["knnlm_test"] == sweep[0]["decoder+memory_test"] == pytest.approx(test["decoder"], rel=1e-3)
    edges = [w for w in metrics["warnings"] if "evaluate.lambda_grid" in w]  # a λ at the grid's top is named
    assert bool(edges) == (0.95 in (metrics["knn_lambda"], metrics["memory_lambda"]))
    assert all(value > 0 for value in metrics["tokens_per_second"].values())
    curves = json.loads((evaluated / "loss.json").read_text())
    assert {point["model"] for point in curves} == {"decoder", "memory"}
    assert all({"kl", "ce"} <= point.keys() for point in curves if point["model"] == "memory")
    for name in ("lambda.png", "loss.png"):
        assert (evaluated / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert verify(str(evaluated)) == []
    assert main(["ls", str(evaluated.parent)]) == 0
    listing = capsys.readouterr().out
    assert f"ppl decoder={test['decoder']:g}" in listing and "ppl=" in listing
    print("evaluate:", json.dumps(metrics["perplexity"]), json.dumps(metrics["tokens_per_second"]))


def test_evaluate_prints_the_papers_table(evaluated, chain, capsys):
    """`memforge evaluate` ends with report.md: per model its λ, temperature and both sides' perplexity."""
    grid = "evaluate.lambda_grid=[0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 0.95]"
    assert main(["evaluate", *chain["args"], "--set", grid]) == 0  # up to date: nothing is scored again
    printed = capsys.readouterr().out
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert (evaluated / "report.md").read_text() in printed
    assert "| dev (validation part) perplexity | test (validation part) perplexity |" in printed
    knnlm = next(line for line in printed.splitlines() if line.startswith("| kNN-LM |"))
    assert knnlm == (f"| kNN-LM | {metrics['knn_lambda']:g} | {metrics['temperature']:g} | "
                     f"{metrics['dev_perplexity']['knnlm']:.2f} | {metrics['perplexity']['knnlm']:.2f} |")
    assert f"k {K}, nprobe {metrics['nprobe']}" in printed and "ffn_input of layer -1 (the last block)" in printed


def test_evaluate_refuses_nprobe_beyond_nlist(chain, tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "decoder", "keys", "targets", "memory"):
        (art / name).symlink_to(chain["art"] / name)
    shutil.copytree(chain["art"] / "index", art / "index")  # the same index, as an IVF4 one would describe itself
    rewrite_manifest(art / "index", lambda manifest: manifest["stats"].update(nlist=4))
    capsys.readouterr()
    assert main(["evaluate", *stage_args(chain["root"], art, **{"evaluate.nprobe": 16})]) == 1
    assert "evaluate.nprobe: 16 exceeds the index's nlist (4)" in capsys.readouterr().err


@pytest.mark.parametrize("name, role, message", [
    ("memory", "decoder", "its inputs disagree on decoder: "),
    ("index", "recall_queries", "its inputs disagree on keys/validation: "),
])
def test_evaluate_refuses_a_memory_or_index_of_other_inputs(chain, tmp_path, capsys, name, role, message):
    """A memory trained on another decoder, an index of another datastore: refused, naming both."""
    art = tmp_path / "art"
    art.mkdir()
    for linked in ("tokens", "decoder", "keys", "targets", "memory", "index"):
        if linked == name:
            shutil.copytree(chain["art"] / linked, art / linked)
        else:
            (art / linked).symlink_to(chain["art"] / linked)
    rewrite_manifest(art / name, lambda data: next(i for i in data["inputs"] if i["role"] == role).update(
        content_digest="f" * 64))
    capsys.readouterr()
    assert main(["evaluate", *stage_args(chain["root"], art)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(art / name) in err
    assert not (art / "eval" / "_manifest.json").exists()
