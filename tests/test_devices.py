"""Devices and numeric formats: ``auto`` is the CPU on a machine without CUDA and every manifest says
which device ran; a GPU asked for that is not there fails before any work, naming the key; the numeric
format is content; worker processes claim GPUs of their own (FAISS's builds and GPUs: test_faiss_build)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memforge.flows.cli import main
from memforge.flows.stages import run_stage
from memforge.pipelines import devices
from memforge.storage.params import load_params
from memforge.storage.stores import KeyStore

from chain import overrides

pytestmark = [pytest.mark.stage,
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")]


def manifest(path) -> dict:
    return json.loads((path / "_manifest.json").read_text())


def linked(chain, art, names):
    art.mkdir()
    for name in names:
        (art / name).symlink_to(chain["art"] / name)
    return art


def test_auto_resolves_to_the_cpu_and_every_manifest_records_the_device(chain):
    art = chain["art"]
    assert devices.resolve("auto", "encode.device") == "cpu"
    for split in ("train", "validation"):
        keys = manifest(art / "keys" / split)
        assert keys["stats"]["devices"] == ["cpu"] and keys["stats"]["precision"] == "fp32"
        assert keys["execution"]["encode.device"] == "auto"  # the setting, as provenance
        assert "device" not in json.dumps(keys["params"])  # and never in what the fingerprint hashes
        assert manifest(art / "targets" / split)["stats"]["search_device"] == "cpu"
    assert manifest(art / "decoder")["stats"]["device"] == "cpu"
    assert manifest(art / "memory")["stats"]["device"] == "cpu"
    assert manifest(art / "index")["stats"]["train_device"] == "cpu"


@pytest.mark.parametrize("stage, key, inputs, output", [
    ("train-decoder", "decoder.device", ("tokens",), "decoder"),
    ("encode", "encode.device", ("tokens", "decoder"), "keys"),
    ("index", "index.device", ("tokens", "decoder", "keys"), "index"),
    ("train-memory", "memory.device", ("tokens", "decoder", "keys", "index", "targets"), "memory"),
    ("evaluate", "evaluate.device", ("tokens", "decoder", "keys", "index", "targets", "memory"), "eval"),
])
def test_a_cuda_device_without_cuda_fails_before_any_work_naming_the_key(chain, tmp_path, capsys, stage, key,
                                                                          inputs, output):
    art = linked(chain, tmp_path / "art", inputs)
    args = [*chain["args"], "--set", f"artifacts_dir={art}", "--set", f"{key}=cuda:1"]
    assert main([stage, *args]) == 1
    error = capsys.readouterr().err
    assert key in error and "no CUDA device" in error, error
    assert not (art / output).exists()  # nothing begun: no lease, no plan, no half-written output


def test_the_numeric_format_is_content_and_bf16_keys_stay_within_its_rounding(chain, tmp_path):
    art = linked(chain, tmp_path / "art", ("tokens", "decoder"))
    params = load_params(chain["root"] / "params.yaml", overrides(chain["args"]))
    params = params.model_copy(update={"artifacts_dir": str(art),
                                       "encode": params.encode.model_copy(update={"precision": "bf16"})})
    run_stage("encode", params, beam_args=("--direct_running_mode=in_memory",))
    fp32, bf16 = manifest(chain["art"] / "keys" / "train"), manifest(art / "keys" / "train")
    assert bf16["fingerprint"] != fp32["fingerprint"] and bf16["params"]["precision"] == "bf16"
    exact = np.asarray(KeyStore.open(str(chain["art"] / "keys" / "train")).keys(0, 512), np.float32)
    autocast = np.asarray(KeyStore.open(str(art / "keys" / "train")).keys(0, 512), np.float32)
    scale = np.abs(exact).max()
    assert 0 < np.abs(autocast - exact).max() < 0.05 * scale  # bf16 has 8 bits of mantissa: ~0.4 % per op


def test_worker_processes_claim_gpus_of_their_own_then_share_them(tmp_path):
    claims = [devices.claim_gpu(3, str(tmp_path)) for _ in range(3)]  # each call is a new lock holder
    assert claims == [0, 1, 2]
    assert devices.claim_gpu(3, str(tmp_path)) in (0, 1, 2)  # more workers than GPUs: they share
