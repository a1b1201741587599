"""export on the tiny chain: one Hugging Face model directory of decoder + memory that scores exactly as
evaluate's decoder + memory column, generates with the decoder's KV cache, and loads where memforge is not
installed (its modelling code ships inside)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines.encoder import load_encoder, model_fingerprint
from memforge.storage.artifact import open_artifact
from memforge.training.evaluate import Scorer
from memforge.training.lm_eval import perplexity
from memforge.training.token_stream import TokenStream

pytestmark = pytest.mark.stage

GRID = "evaluate.lambda_grid=[0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 0.95]"  # test_evaluate's: one evaluate per worker


@pytest.fixture(scope="module")
def exported(chain):
    assert main(["evaluate", *chain["args"], "--set", GRID, "--replace-outdated"]) == 0
    assert main(["export", *chain["args"], "--set", GRID, "--replace-outdated"]) == 0
    return chain["art"] / "export" / "model"


def test_the_exported_model_scores_each_token_as_evaluate_did(chain, exported):
    art = chain["art"]
    model = AutoModelForCausalLM.from_pretrained(exported)  # `import memforge` registered it: no remote code
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    config = model.config
    assert (config.lam, config.memory_temperature) == (metrics["memory_lambda"], metrics["memory_temperature"])
    assert (config.memory_input, config.memory_layer) == ("ffn_input", -1)
    assert config.provenance["decoder"] == open_artifact(str(art / "decoder")).fingerprint
    assert config.provenance["memory"] == open_artifact(str(art / "memory")).fingerprint
    assert config.provenance["evaluate"] == open_artifact(str(art / "eval")).fingerprint
    assert config.provenance["mixing_from"] == {"lam": "evaluate", "memory_temperature": "evaluate"}
    memory_config = json.loads((art / "memory" / "model" / "config.json").read_text())  # the memory names its input
    assert (memory_config["input_layer"], memory_config["representation"]) == (-1, "ffn_input")
    assert memory_config["decoder"] == config.provenance["decoder_weights"] == model_fingerprint(
        str(art / "decoder" / "model"))

    tokens, queries = open_artifact(str(art / "tokens")), open_artifact(str(art / "keys" / "validation"))
    stats = queries.manifest["stats"]
    scorer = Scorer(model, TokenStream(tokens, "validation"), queries.manifest["counts"]["rows"],
                    stats["block_size"], stats["stride"], batch_size=3)
    mine = scorer.run([], None)  # the model's own log p(target): its logits are the mixture
    table = pq.read_table(art / "eval" / "token_log_probs.parquet").to_pandas()
    np.testing.assert_allclose(mine, table["decoder+memory"].to_numpy(), rtol=0, atol=1e-5)
    test_side = (table["split"] == "test").to_numpy()
    assert round(perplexity(mine[test_side]), 4) == metrics["perplexity"]["decoder+memory"]
    assert main(["verify", str(art / "export")]) == 0


def test_generate_is_seeded_uses_the_cache_and_at_lambda_zero_is_the_decoder(chain, exported):
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token  # the demo's byte-level BPE has none
    prompt = tokenizer(["alpha beta gamma", "omega psi"], return_tensors="pt", padding=True)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(**prompt, max_new_tokens=12, do_sample=True, top_k=0)

    assert torch.equal(sample(3), sample(3))
    greedy = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    grown = prompt["input_ids"]
    for _ in range(12):  # the same steps without a cache: every position recomputed, left pads not counted
        mask = torch.cat([prompt["attention_mask"], torch.ones(2, grown.shape[1] - prompt["input_ids"].shape[1],
                                                                dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=grown, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        grown = torch.cat([grown, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, grown)

    assert main(["export", *chain["args"], "--set", GRID, "--set", "export.lam=0", "--replace-outdated"]) == 0
    at_zero = AutoModelForCausalLM.from_pretrained(exported)
    assert at_zero.config.lam == 0.0 and at_zero.config.provenance["mixing_from"]["lam"] == "params"
    decoder = load_encoder(str(chain["art"] / "decoder" / "model"))
    assert torch.equal(at_zero.generate(**prompt, max_new_tokens=16, do_sample=False),
                       decoder.generate(**prompt, max_new_tokens=16, do_sample=False))


LOAD_WITHOUT_MEMFORGE = """
import importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("memforge") is None, "memforge is importable"
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps({"type": type(model).__module__, "logits": model(ids).logits.tolist()}))
"""


def test_the_directory_loads_in_a_virtual_environment_without_memforge(exported, tmp_path):
    """A fresh venv that sees torch, transformers and safetensors (links to this environment's packages, the
    memforge install and every .pth hook left out) loads a copy of the directory moved elsewhere."""
    copy = shutil.copytree(exported, tmp_path / "moved" / "my-model")
    packages = tmp_path / "packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "memforge" not in entry.name and entry.suffix != ".pth":
            (packages / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "shared.pth").write_text(f"{packages}\n")
    ids = [[3, 17, 42, 5, 9, 11]]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([venv / "bin" / "python", "-c", LOAD_WITHOUT_MEMFORGE, str(copy), json.dumps(ids)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["type"].startswith("transformers_modules.")
    model = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        here = model(torch.tensor(ids)).logits
    np.testing.assert_allclose(np.array(loaded["logits"]), here.numpy(), rtol=0, atol=1e-6)
