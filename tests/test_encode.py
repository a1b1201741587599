"""prepare + encode on a small real-text corpus with a tiny local GPT-2: row counts, value
alignment, keys against a plain Hugging Face forward pass, crash-resume, PortableRunner."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines.windows import windows_for_rows
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import KeyStore
from memforge.storage.verify import verify

from crash import kill_after_first_shard, rerun
from tiny_lm import make_gpt2, write_corpus

pytestmark = pytest.mark.stage

BLOCK, STRIDE = 32, 12


def stage_args(art: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    """--set overrides shared by every run in this module (explicit train/validation files)."""
    settings = {
        "artifacts_dir": str(art), "encode.model": str(model),
        "corpus.train": f"[{corpus}/train/*.txt]", "corpus.validation": f"[{corpus}/validation/*.txt]",
        "encode.block_size": BLOCK, "encode.stride": STRIDE, "encode.chunk_rows": 16, "encode.shard_chunks": 2,
        "encode.batch_size": 4, "runtime.num_workers": 2,
    }
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, a tiny GPT-2 with its own tokenizer, and one uninterrupted prepare + encode (Beam in this process:
    the tests below run the worker pools and compare with it)."""
    root = tmp_path_factory.mktemp("encode")
    train = write_corpus(root / "corpus" / "train", 12, 150, seed=1)
    validation = write_corpus(root / "corpus" / "validation", 3, 100, seed=2)
    model = make_gpt2(root / "model", [p.read_text() for p in train])
    (root / "params.yaml").write_text("{}\n")
    art = root / "art"
    base = ["--params", str(root / "params.yaml"), *stage_args(art, model, root / "corpus")]
    in_process = ["--", "--direct_running_mode=in_memory"]
    assert main(["prepare", *base, *in_process]) == 0
    assert main(["encode", *base, *in_process]) == 0
    return {"root": root, "model": model, "art": art, "args": base, "train": train, "validation": validation}


def stream(tokenizer, paths: list[Path]) -> np.ndarray:
    """Independent token stream of a split: each document's ids followed by end-of-text."""
    ids = []
    for path in sorted(paths):
        ids += tokenizer(path.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids)


def test_rows_are_tokens_with_context_and_values_are_next_tokens(setup):
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    for split in ("train", "validation"):
        expected = stream(tokenizer, setup[split])
        keys = open_artifact(str(setup["art"] / "keys" / split), "keys")
        assert keys.manifest["counts"]["rows"] == len(expected) - 1
        store = KeyStore.open(keys.uri)
        np.testing.assert_array_equal(store.vals(), expected[1:])
        assert store.keys().dtype == np.float16 and store.keys().shape == (len(expected) - 1, 32)
        assert verify(keys.uri) == []
        stats = keys.manifest["stats"]
        assert stats["block_size"] == BLOCK and stats["stride"] == STRIDE and stats["representation"] == "ffn_input"
        assert len(stats["model_fingerprint"]) == 64 and keys.manifest["inputs"][0]["role"] == "tokens"


def reference_key(model, tokens: np.ndarray, row: int, representation: str, layer: int = -1) -> np.ndarray:
    """Key of datastore row ``row`` by the reference sliding-window loop and a plain HF forward pass."""
    target = row + 1
    begin, prev_end = 0, 0
    while True:
        end = min(begin + BLOCK, len(tokens))
        if prev_end <= target < end:
            break
        prev_end, begin = end, begin + STRIDE
    ids = torch.tensor(tokens[begin:end][None])
    captured = {}
    block = model.transformer.h[layer]
    if representation == "ffn_input":
        handle = block.mlp.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
        with torch.no_grad():
            model(ids)
        handle.remove()
        state = captured["x"]
    else:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        state = hidden[-1] if representation == "final" else hidden[layer % len(model.transformer.h) + 1]
    return state[0, target - 1 - begin].numpy()


def test_keys_match_a_plain_forward_pass(setup):
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    for split in ("train", "validation"):
        tokens = stream(tokenizer, setup[split])
        store = KeyStore.open(str(setup["art"] / "keys" / split))
        rows = sorted({0, 1, BLOCK - 2, BLOCK - 1, BLOCK, 63, 64, 65, len(tokens) - 2}
                      | set(np.random.default_rng(0).integers(0, len(tokens) - 1, 20).tolist()))
        for row in rows:
            expected = reference_key(model, tokens, row, "ffn_input")
            np.testing.assert_allclose(store.keys(row, row + 1)[0].astype(np.float32), expected,
                                       rtol=2e-3, atol=2e-3, err_msg=f"{split} row {row}")


@pytest.mark.parametrize("representation, layer, dtype", [("block_output", 0, "float32"), ("final", -1, "bfloat16")])
def test_other_representations_and_dtypes(setup, tmp_path, representation, layer, dtype):
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    args = [*setup["args"], "--set", f"artifacts_dir={art}", "--set", f"encode.representation={representation}",
            "--set", f"encode.layer={layer}", "--set", f"encode.dtype={dtype}", "--set", "runtime.num_workers=1"]
    assert main(["encode", *args]) == 0
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    tokens = stream(AutoTokenizer.from_pretrained(setup["model"]), setup["validation"])
    store = KeyStore.open(str(art / "keys" / "validation"))
    assert store.key_dtype == dtype
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    for row in (0, 5, BLOCK + 3, len(tokens) - 2):
        expected = reference_key(model, tokens, row, representation, layer)
        np.testing.assert_allclose(store.keys(row, row + 1)[0], expected, rtol=tolerance, atol=tolerance)


def test_windows_cover_every_target_once():
    for n_tokens in (2, 5, 31, 32, 33, 100, 257):
        owned = []
        for start in range(0, n_tokens - 1, 7):
            stop = min(start + 7, n_tokens - 1)
            for w in windows_for_rows(start, stop, n_tokens, BLOCK, STRIDE):
                assert w.end - w.begin <= BLOCK and w.begin <= w.first - 1 and w.stop <= w.end
                assert w.first - w.begin >= min(w.first, BLOCK - STRIDE)  # context of at least the overlap
                owned += range(w.first, w.stop)
        assert owned == list(range(1, n_tokens))


def manifest_files(art: Path, split: str) -> dict:
    return json.loads((art / "keys" / split / "_manifest.json").read_text())["files"]


def test_sigkill_mid_encode_then_rerun_is_byte_identical(setup, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    args = [*setup["args"], "--set", f"artifacts_dir={art}"]
    markers = art / "keys" / "train" / "_shards"
    total = json.loads((setup["art"] / "keys" / "train" / "_manifest.json").read_text())["shards"]["count"]
    done = kill_after_first_shard(["encode", *args], markers)
    assert 0 < done < total, f"kill landed outside the run ({done}/{total} shards)"
    assert not (art / "keys" / "train" / "_manifest.json").exists()

    finished = rerun(["encode", *args, "--", "--direct_running_mode=in_memory"])  # Beam in the rerun's process
    assert finished.returncode == 0, finished.stderr
    skipped = int(finished.stderr.split("encode: train: ")[1].split(" shards already done (skipped)")[0].split("; ")[1])
    assert skipped >= done
    for split in ("train", "validation"):
        assert manifest_files(art, split) == manifest_files(setup["art"], split)
        assert verify(str(art / "keys" / split)) == []


def test_interrupted_build_with_another_layout_restarts_its_plan(setup, tmp_path):
    """Layout params (chunk and shard sizes) are not content: an interrupted build rerun with another
    layout starts its plan over in the new layout (never mixing two) and holds the same keys."""
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    args = [*setup["args"], "--set", f"artifacts_dir={art}"]
    done = kill_after_first_shard(["encode", *args], art / "keys" / "train" / "_shards")
    assert done > 0 and not (art / "keys" / "train" / "_manifest.json").exists()

    in_process = ["--", "--direct_running_mode=in_memory"]  # the reruns' Beam runs in their own process
    finished = rerun(["encode", *args, "--set", "encode.chunk_rows=32", "--set", "encode.shard_chunks=4", *in_process])
    assert finished.returncode == 0, finished.stderr
    assert "planned for another layout" in finished.stderr
    assert "; 0 shards already done" in finished.stderr.split("encode: train: ")[1]
    for split in ("train", "validation"):
        rebuilt, original = KeyStore.open(str(art / "keys" / split)), KeyStore.open(str(setup["art"] / "keys" / split))
        assert rebuilt.rows.array("keys").chunks[0] == 32 and rebuilt.rows.unit_rows() == 128
        np.testing.assert_array_equal(rebuilt.keys(), original.keys())
        np.testing.assert_array_equal(rebuilt.vals(), original.vals())
        assert verify(str(art / "keys" / split)) == []
        layout = json.loads((art / "keys" / split / "_plan.json").read_text())["layout"]
        assert layout == {"encode.chunk_rows": 32, "encode.shard_chunks": 4}
    # Finished, it stays up to date whatever layout is asked for next.
    again = rerun(["encode", *args, *in_process])
    assert again.returncode == 0 and again.stderr.count("is up to date") == 2


def test_a_model_of_another_tokenizer_is_refused(setup, tmp_path, capsys):
    """A larger vocabulary is not enough: the token ids must mean the same tokens to the encoder."""
    other = make_gpt2(tmp_path / "other", [p.read_text() for p in setup["train"]], vocab_size=400)
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    capsys.readouterr()
    assert main(["encode", *setup["args"], "--set", f"artifacts_dir={art}", "--set", f"encode.model={other}"]) == 1
    err = capsys.readouterr().err
    assert f"encode.model: {other}: its tokenizer differs from the token store's" in err
    assert not (art / "keys").exists() or not any((art / "keys").rglob("_manifest.json"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_portable_runner_output_equals_default_runner(setup, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    port = free_port()
    service = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        code = main(["encode", *setup["args"], "--set", f"artifacts_dir={art}", "--",
                     "--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=LOOPBACK"])
        assert code == 0
    finally:
        service.terminate()
        service.wait(timeout=30)
    for split in ("train", "validation"):
        manifest = json.loads((art / "keys" / split / "_manifest.json").read_text())
        assert manifest["environment"]["beam_runner"] == "PortableRunner"
        assert manifest["files"] == manifest_files(setup["art"], split)


def test_rerun_is_up_to_date(setup, capsys, caplog):
    with caplog.at_level("INFO", logger="memforge"):
        assert main(["encode", *setup["args"]]) == 0
    assert "is up to date" in caplog.text


def test_other_batch_size_workers_and_threads_give_byte_identical_keys(setup, tmp_path):
    """Keys encoded one window at a time, by one worker on 2 threads, are the bytes of the module's run (4
    windows per forward pass, 2 workers on 1 thread): a window's forward pass does not depend on its batch."""
    art = tmp_path / "art"
    art.mkdir()
    os.symlink(setup["art"] / "tokens", art / "tokens")
    assert main(["encode", *setup["args"], "--set", f"artifacts_dir={art}", "--set", "encode.batch_size=1",
                 "--set", "runtime.num_workers=1", "--set", "runtime.threads_per_worker=2"]) == 0
    for split in ("train", "validation"):
        assert manifest_files(art, split) == manifest_files(setup["art"], split), split
