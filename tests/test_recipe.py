"""The WikiText-103 / GPT-2 recipe (examples/wikitext103-gpt2.yaml) in miniature: three files in WikiText's
layout, one per split, a tiny GPT-2 saved with save_pretrained, the recipe's own keys with sizes shrunk, run
with `memforge run`. λ and T are chosen on all of validation and reported on all of test, and no test token is
in the datastore, the targets or the memory's training rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from memforge.flows.cli import main
from memforge.storage.artifact import open_artifact
from memforge.storage.params import load_params
from memforge.storage.stores import KeyStore, TokenStore

from tiny_lm import make_gpt2, write_wikitext

pytestmark = pytest.mark.stage

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "wikitext103-gpt2.yaml"
MINIATURE = {"encode.block_size": 32, "encode.stride": 16, "encode.chunk_rows": 64, "encode.shard_chunks": 2,
             "index.factory": "IVF8,PQ8x4", "index.nprobe": 4, "targets.k": 8, "targets.width": 8,
             "memory.batch_size": 64, "memory.max_steps": 6, "memory.warmup_steps": 1,
             "memory.checkpoint_every": 6, "memory.nproc_per_node": 2,  # the Prefect task starts two ranks
             "evaluate.k": 8, "evaluate.nprobe": 4, "flow.retry_delay_s": 0}


def stream(tokens, split: str) -> np.ndarray:
    parts = tokens.manifest["stats"]["splits"][split]["parts"]
    return np.concatenate([TokenStore(tokens.uri, split).read_shard(name).column("token").to_numpy()
                           for name, _, _ in parts])


def test_the_recipe_chooses_on_validation_and_reports_on_test(tmp_path, capsys):
    data = tmp_path / "data" / "wikitext-103"
    files = {split: write_wikitext(data / f"wiki.{name}.tokens", articles, 120, seed)
             for split, name, articles, seed in (("train", "train", 12, 1), ("validation", "valid", 2, 2),
                                                 ("test", "test", 2, 3))}
    model = make_gpt2(tmp_path / "models" / "gpt2", [files["train"].read_text()])
    settings = {"artifacts_dir": tmp_path / "art", "encode.model": model, **MINIATURE,
                **{f"corpus.{split}": f"[{path}]" for split, path in files.items()}}
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    recipe = load_params(RECIPE, [])
    assert (recipe.encode.block_size, recipe.encode.stride, recipe.targets.k, recipe.index.nprobe) == (1024, 512,
                                                                                                         1024, 32)
    assert main(["run", "--params", str(RECIPE), *args, "--", "--direct_running_mode=in_memory"]) == 0
    printed = capsys.readouterr().out
    art = tmp_path / "art"
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    tokens = open_artifact(str(art / "tokens"), "tokens")
    tokenizer = AutoTokenizer.from_pretrained(model)
    for split, path in files.items():  # each split holds its file's tokens, whole (one stream), and nothing else
        expected = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert stream(tokens, split).tolist() == expected, split
    splits = tokens.manifest["stats"]["splits"]
    assert metrics["protocol"] == {"name": "test split",
                                   "dev": {"split": "validation", "rows": splits["validation"]["tokens"] - 1},
                                   "test": {"split": "test", "rows": splits["test"]["tokens"] - 1}}
    # The datastore is the train split: its values are the train stream's next tokens, row for row, so no
    # validation or test token is searched; the targets and the memory's rows are the same rows.
    datastore = KeyStore.open(str(art / "keys" / "train"))
    assert np.array_equal(datastore.vals(), stream(tokens, "train")[1:])
    for role in ("index", "targets/train"):
        assert open_artifact(str(art / role)).manifest["counts"]["rows"] == splits["train"]["tokens"] - 1, role
    assert open_artifact(str(art / "memory"), "memory").manifest["stats"]["world_size"] == 2
    memory_inputs = {i["role"]: i["uri"] for i in open_artifact(str(art / "memory"), "memory").manifest["inputs"]}
    print("memory inputs:", memory_inputs)
    assert memory_inputs["targets"].endswith("targets/train")
    assert "valid perplexity | test perplexity |" in printed
    for label, name in (("decoder", "decoder"), ("kNN-LM", "knnlm"), ("decoder + memory", "decoder+memory")):
        row = next(line for line in printed.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {metrics['dev_perplexity'][name]:.2f} | {metrics['perplexity'][name]:.2f} |" in row
    assert (art / "eval" / "report.md").read_text() in printed
