"""Bad values and wrong targets are refused up front with a named error, and nothing is written:
params a stage cannot honour, retemper's own inputs or another kind of artifact as its --out."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from chain import overrides, stage_args
from flows.cli import main
from flows.stages import stage
from pipelines import executor
from pipelines.encoder import EncoderError, load_encoder
from pipelines.named_decoder import decoder_path
from storage.artifact import ArtifactBuild
from storage.errors import ArtifactError
from storage.params import load_params
from storage.stores import KeyStore
from storage.verify import verify
from tiny_lm import WORDS, make_gpt2


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
    (interrupted / "_plan.json").unlink()
    next((interrupted / "_shards").glob("*.json")).write_text("{")
    with pytest.raises(ArtifactError, match=r"_shards/00000.json: damaged, not valid JSON"):
        toy_stage.run(str(interrupted), seed=1, rows=256)
    assert not (interrupted / "_manifest.json").exists()
    assert main(["verify", str(published)]) == 1
    assert "_manifest.json: manifest is not valid JSON" in capsys.readouterr().out


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
