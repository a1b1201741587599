"""Bad values and wrong targets are refused up front with a named error, and nothing is written:
params a stage cannot honour, retemper's own inputs or another kind of artifact as its --out."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memforge.flows.cli import main
from memforge.flows.stages import stage
from memforge.pipelines import executor
from memforge.pipelines.encoder import EncoderError, load_encoder
from memforge.pipelines.named_decoder import decoder_path
from memforge.storage.artifact import ArtifactBuild
from memforge.storage.errors import ArtifactError
from memforge.storage.params import load_params
from memforge.storage.stores import KeyStore
from memforge.storage.verify import verify

from chain import overrides, reseal, stage_args, write_object_npy
from tiny_lm import WORDS, make_gpt2

pytestmark = pytest.mark.stage


def refused(args: list[str], capsys, *expected: str) -> str:
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err, err
    for part in expected:
        assert part in err, err
    return err


def linked(chain, tmp_path, names):
    art = tmp_path / "art"
    art.mkdir()
    for name in names:
        (art / name).symlink_to(chain["art"] / name)
    return art


def test_decoder_block_size_beyond_the_training_tokens(chain, tmp_path, capsys):
    art = linked(chain, tmp_path, ("tokens",))
    refused(["train-decoder", *stage_args(chain["root"], art, **{"decoder.block_size": 100000})], capsys,
            "decoder.block_size: 100000 needs at least 100001 training tokens")
    assert not (art / "decoder").exists()


@pytest.mark.parametrize("settings, message", [
    ({"index.factory": "IVF4096,Flat"}, "index.factory: IVF4096,Flat has 4096 inverted lists, more than the"),
    ({"index.factory": "IVF4,Flat", "index.nprobe": 8}, "index.nprobe: 8 exceeds the 4 lists of IVF4,Flat"),
])
def test_index_params_the_datastore_cannot_honour(chain, tmp_path, capsys, settings, message):
    art = linked(chain, tmp_path, ("keys",))
    refused(["index", *stage_args(chain["root"], art, **settings)], capsys, message)
    assert not (art / "index").exists()


def test_targets_refuses_an_object_dtype_values_npy(chain, tmp_path, capsys):
    """#35 fault 3 end to end: the index's values.npy rewritten as an object (pickle) array and every checksum
    re-sealed; ``memforge targets`` stops before any worker starts, with one line naming the file, exit 1."""
    art = linked(chain, tmp_path, ("keys", "tokens"))
    shutil.copytree(chain["art"] / "index", art / "index")
    values = art / "index" / "values.npy"
    write_object_npy(values, len(np.load(values, mmap_mode="r")))
    reseal(art / "index")
    refused(["targets", *stage_args(chain["root"], art)], capsys,
            "targets reads index: ", "index: values.npy: dtype object holds Python objects")
    assert not (art / "targets").exists()


def test_lambda_grid_outside_zero_one(chain, capsys):
    refused(["evaluate", *chain["args"], "--set", "evaluate.lambda_grid=[0.5, 1.5]"], capsys,
            "evaluate.lambda_grid.1: Input should be less than or equal to 1")


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "nan"], "--temperature: must be a positive finite number, got nan"),
    (["--temperature", "2", "--k", "0"], "--k: 0 must be between 1 and the stored k"),
])
def test_retemper_bad_values(chain, tmp_path, capsys, extra, message):
    refused(["retemper", str(chain["art"] / "targets" / "train"), *extra, "--out", str(tmp_path / "out")], capsys,
            message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, message", [
    ("targets/train", "which retemper reads"),
    ("index", "which retemper reads"),
    ("targets", "which retemper reads"),
    ("memory", "holds a memory artifact, not targets"),
])
def test_retemper_out_never_replaces_its_inputs_or_another_kind(chain, capsys, out, message):
    source = chain["art"] / "targets" / "train"
    refused(["retemper", str(source), "--temperature", "2", "--out", str(chain["art"] / out), "--rebuild"], capsys,
            message)
    for name in ("targets/train", "index", "memory"):
        assert verify(str(chain["art"] / name)) == [], name


def test_damaged_bookkeeping_is_named_and_ls_never_crashes(tmp_path, capsys):
    """A torn plan, shard marker or manifest: `ls` lists the artifact as damaged with the reason, and a rerun
    fails with an error naming the file instead of a bare JSONDecodeError."""
    import toy_stage

    published, interrupted = tmp_path / "art" / "published", tmp_path / "art" / "interrupted"
    toy_stage.run(str(published), seed=1, rows=256)
    build = ArtifactBuild.begin(str(interrupted), "keys", {"seed": 1, "rows": 256})  # one shard, then stopped
    store = KeyStore.create(build.uri, 256, dim=toy_stage.DIM, chunk_rows=toy_stage.CHUNK_ROWS,
                            shard_chunks=toy_stage.SHARD_CHUNKS)
    first = build.plan(store.rows.plan()).shards[0]
    build.markers.mark_done(first, store.write_shard(first, *toy_stage.shard_data(1, first.id, first.rows)))
    build.release()
    (published / "_manifest.json").write_text('{"schema_version": 2, "kind"')
    (interrupted / "_plan.json").write_text("{")
    capsys.readouterr()
    assert main(["ls", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert "damaged: " in out and "_manifest.json" in out and "_plan.json" in out
    with pytest.raises(ArtifactError, match=r"_plan.json: damaged, not valid JSON"):
        toy_stage.run(str(interrupted), seed=1, rows=256)
    assert main(["verify", str(published)]) == 1
    assert "_manifest.json: manifest is not valid JSON" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["torn", "another shard's"])
def test_a_damaged_shard_marker_makes_its_shard_pending_again(tmp_path, capsys, caplog, damage):
    """A torn marker (cut short) or one that names another shard's rows: `ls` shows it, the rerun redoes that
    shard (and only it) and publishes what an uninterrupted build publishes."""
    import toy_stage

    clean, interrupted = tmp_path / "clean", tmp_path / "art" / "interrupted"
    toy_stage.run(str(clean), seed=1, rows=256)
    build = ArtifactBuild.begin(str(interrupted), "keys", {"seed": 1, "rows": 256})  # two shards, then stopped
    store = KeyStore.create(build.uri, 256, dim=toy_stage.DIM, chunk_rows=toy_stage.CHUNK_ROWS,
                            shard_chunks=toy_stage.SHARD_CHUNKS)
    first, second = build.plan(store.rows.plan()).shards[:2]
    for shard in (first, second):
        build.markers.mark_done(shard, store.write_shard(shard, *toy_stage.shard_data(1, shard.id, shard.rows)))
    build.release()
    marker = interrupted / "_shards" / f"{first.name}.json"
    if damage == "torn":
        marker.write_bytes(marker.read_bytes()[:40])
    else:
        marker.write_bytes((interrupted / "_shards" / f"{second.name}.json").read_bytes())
    capsys.readouterr()
    assert main(["ls", str(tmp_path / "art")]) == 0
    assert "(1/2 shards done, 1 damaged marker(s) redone on rerun)" in capsys.readouterr().out
    with caplog.at_level("WARNING", logger="memforge"):
        result = toy_stage.run(str(interrupted), seed=1, rows=256)
    assert (result["skipped"], result["written"]) == (1, 1)
    assert f"_shards/{first.name}.json: damaged" in caplog.text
    assert json.loads((interrupted / "_manifest.json").read_text())["content_digest"] == \
        json.loads((clean / "_manifest.json").read_text())["content_digest"]


def test_serve_without_a_server_says_how_to_start_one(chain, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    refused(["serve", *chain["args"]], capsys, "serve needs a Prefect server", "prefect server start")


def test_the_trained_decoder_is_read_in_place_without_a_scratch_copy(chain, tmp_path, monkeypatch):
    """No mkdtemp directory is left behind for a local decoder (it used to be one per run)."""
    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(a) or str(tmp_path))
    params = load_params(chain["root"] / "params.yaml", overrides(chain["args"]))
    ctx = executor.context(stage("encode"), params)
    assert decoder_path(ctx) == str(chain["art"] / "decoder" / "model") and made == []


class _Payload:
    """Code in a pickled checkpoint: it must never run."""

    def __reduce__(self):
        return (print, ("PAYLOAD EXECUTED",))


def test_a_pickled_checkpoint_with_code_is_refused_and_never_run(tmp_path, capsys):
    model = make_gpt2(tmp_path / "model", [" ".join(WORDS)] * 5)
    os.remove(model / "model.safetensors")
    torch.save({"transformer.wte.weight": _Payload()}, model / "pytorch_model.bin")
    capsys.readouterr()
    with pytest.raises(EncoderError, match="pickled checkpoint holds more than tensors"):
        load_encoder(str(model))
    assert "PAYLOAD EXECUTED" not in capsys.readouterr().out


def test_an_input_missing_a_recorded_file_is_refused(chain, tmp_path, capsys):
    """A deleted Zarr shard of keys/train would read as all-zero keys: index --rebuild refuses instead."""
    art = tmp_path / "art"
    art.mkdir()
    shutil.copytree(chain["art"] / "keys", art / "keys")
    shard = sorted((art / "keys" / "train" / "datastore.zarr" / "keys").rglob("c/*/*"))[1]
    shard.unlink()
    refused(["index", *stage_args(chain["root"], art), "--rebuild"], capsys,
            f"{shard.relative_to(art / 'keys' / 'train')} recorded in its manifest is missing")
    assert not (art / "index").exists()


def test_an_input_whose_bytes_changed_or_manifest_was_edited_is_refused(chain, tmp_path, capsys):
    """Same size, other bytes (a flipped byte in one key chunk); then a hand-edited param in a manifest."""
    art = tmp_path / "art"
    art.mkdir()
    shutil.copytree(chain["art"] / "keys", art / "keys")
    chunk = sorted((art / "keys" / "train" / "datastore.zarr" / "keys").rglob("c/*/*"))[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    refused(["index", *stage_args(chain["root"], art)], capsys,
            f"{chunk.relative_to(art / 'keys' / 'train')}: checksum mismatch")
    assert not (art / "index").exists()
    shutil.rmtree(art / "keys")
    shutil.copytree(chain["art"] / "keys", art / "keys")
    manifest = art / "keys" / "validation" / "_manifest.json"
    record = json.loads(manifest.read_text())
    record["params"]["layer"] = 0 if record["params"].get("layer") else 1
    manifest.write_text(json.dumps(record))
    refused(["index", *stage_args(chain["root"], art)], capsys, "keys/validation", "the manifest was edited")
    assert not (art / "index").exists()


def test_the_default_input_check_rehashes_a_bounded_random_sample(chain, monkeypatch):
    import random

    from memforge.storage import intact
    from memforge.storage.artifact import open_artifact

    keys = open_artifact(str(chain["art"] / "keys" / "train"))
    sizes = {p.relative_to(keys.uri).as_posix(): p.stat().st_size for p in Path(keys.uri).rglob("*") if p.is_file()}
    monkeypatch.setattr(intact, "SAMPLE_BYTES", sorted(sizes.values())[-1])
    picks = [intact._sample(keys, random.Random(seed)) for seed in range(6)]
    for picked in picks:
        assert sum(sizes[rel] for rel in picked) <= intact.SAMPLE_BYTES and picked
    assert len({tuple(sorted(p)) for p in picks}) > 1, "each run samples afresh"
    assert intact.check_intact(keys, "full") is keys and intact.check_intact(keys, "off") is keys


@pytest.mark.parametrize("store", ["DistributionStore", "NeighbourStore"])
def test_disk_full_is_a_named_error_and_the_rerun_resumes(chain, tmp_path, capsys, monkeypatch, store):
    """ENOSPC from the third shard write (Beam re-raises a worker's OSError without its errno)."""
    import errno

    from memforge.storage import stores

    art = linked(chain, tmp_path, ("tokens", "keys", "index"))
    Store = getattr(stores, store)
    write_shard, calls = Store.write_shard, []

    def full_after_two(self, shard, *arrays):
        calls.append(shard.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", f"{self.rows.uri}/probs/c/{shard.name}")
        return write_shard(self, shard, *arrays)

    monkeypatch.setattr(Store, "write_shard", full_after_two)
    args = ["targets", *stage_args(chain["root"], art), "--", "--direct_running_mode=in_memory"]
    err = refused(args, capsys, f"{art / 'targets' / 'train'}", "no space left on its filesystem (",
                  " GiB free of ", "while targets wrote it", "nothing was published")
    assert "Errno 28" in err
    assert not (art / "targets" / "train" / "_manifest.json").exists()
    assert not list((art / "targets").rglob("_lease.json"))
    monkeypatch.setattr(Store, "write_shard", write_shard)
    capsys.readouterr()
    assert main(args) == 0
    assert verify(str(art / "targets" / "train")) == [] and verify(str(art / "targets" / "validation")) == []


def test_faiss_cannot_train_the_factory_on_its_sample(chain, tmp_path, capsys):
    """PQ codebooks of 2^10 centroids from 4 lists x 39 points: FAISS's error, named by key."""
    art = linked(chain, tmp_path, ("keys",))
    refused(["index", *stage_args(chain["root"], art, **{"index.factory": "IVF4,PQ8x10",
                                                        "index.nprobe": 4})], capsys,
            "index.factory: FAISS cannot train IVF4,PQ8x10 on 156 sampled keys", "index.train_points_per_list")
    assert not list((art / "index").glob("_manifest.json")) and not (art / "index" / "_lease.json").exists()


def test_out_of_memory_is_named_with_the_params_that_size_batches(chain, tmp_path, capsys, monkeypatch):
    import memforge.training.memory

    def allocation_fails(*_args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(memforge.training.memory, "memory_loss_sums", allocation_fails)
    art = linked(chain, tmp_path, ("tokens", "decoder", "keys", "index", "targets"))
    refused(["train-memory", *stage_args(chain["root"], art)], capsys,
            "train-memory ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower "
            "memory.batch_size (content: another artifact), encode.batch_size (execution)")
    assert not (art / "memory" / "_manifest.json").exists() and not (art / "memory" / "_lease.json").exists()
