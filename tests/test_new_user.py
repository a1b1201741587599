"""What a new user meets with their own data and models: defaults that shape data say what they did, and
combinations that cannot mean what they say are refused before anything is written."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from memforge.flows.cli import main
from memforge.pipelines.corpus import DEMO_MAX_BYTES, source_files
from memforge.storage.params import CorpusParams

from chain import stage_args


@pytest.mark.unit
def test_a_corpus_of_your_own_is_read_whole_and_only_the_demo_is_capped(tmp_path, caplog):
    """Five JSONL files of 630 KB each and default params: every byte of every file is read (the demo's 1 MB
    cap once took the first file only); the demo corpus keeps its cap, and an explicit cap says what it cut."""
    line = b'{"text": "' + b"alpha beta gamma delta " * 40 + b'"}\n'
    for i in range(5):
        (tmp_path / f"part{i}.jsonl").write_bytes(line * (630_000 // len(line)))
    files = source_files(CorpusParams(train=[str(tmp_path / "*.jsonl")]))
    assert [f.taken for f in files] == [f.size for f in files] and len(files) == 5 and files.capped == {}

    demo = source_files(CorpusParams())
    assert sum(f.taken for f in demo) <= DEMO_MAX_BYTES and demo.capped["corpus.train"]["max_bytes"] == DEMO_MAX_BYTES

    with caplog.at_level(logging.WARNING, logger="memforge"):
        capped = source_files(CorpusParams(train=[str(tmp_path / "*.jsonl")], max_bytes=1_000_000))
    assert len(capped) == 2 and capped.capped["corpus.train"]["left_out_files"] == 3
    assert "corpus.max_bytes (1,000,000 bytes) reached" in caplog.text


@pytest.mark.unit
def test_encode_model_and_decoder_init_together_are_refused_naming_both(tmp_path, capsys):
    code = main(["prepare", "--set", f"artifacts_dir={tmp_path / 'art'}", "--set", "encode.model=/models/a",
                 "--set", "decoder.init=/models/b"])
    err = capsys.readouterr().err
    assert code == 1 and "encode.model (/models/a) and decoder.init (/models/b) are both set" in err
    assert not (tmp_path / "art").exists()


@pytest.mark.unit
@pytest.mark.parametrize("key", ["encode.model", "decoder.init"])
def test_a_hub_id_is_named_as_one_with_how_to_fetch_it_and_nothing_is_written(tmp_path, capsys, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", "--set", f"artifacts_dir={tmp_path / 'art'}", "--set", f"{key}=Qwen/Qwen2.5-0.5B"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"{key}: 'Qwen/Qwen2.5-0.5B' is not a local directory" in err and "looks like a Hugging Face Hub id" in err
    assert "hf download Qwen/Qwen2.5-0.5B --local-dir models/Qwen2.5-0.5B" in err
    assert not (tmp_path / "art").exists()  # no incomplete tokens artifact that asks to be resumed
    code = main(["prepare", "--set", f"artifacts_dir={tmp_path / 'art'}", "--set", f"{key}=./models/mine"])
    assert code == 1 and "no such directory" in capsys.readouterr().err


@pytest.mark.stage
def test_keeping_the_neighbours_beside_the_same_distributions_outdates_nothing_downstream(chain, tmp_path):
    """The chain kept its targets' neighbours; targets without them hold byte-identical distributions, so their
    content digest is the same and the memory trained on them stays up to date (it is not retrained)."""
    art = tmp_path / "art"
    art.mkdir()
    for name in ("tokens", "decoder", "keys", "index"):
        (art / name).symlink_to(chain["art"] / name)
    shutil.copytree(chain["art"] / "memory", art / "memory")
    manifest = lambda role: json.loads((art / role / "_manifest.json").read_text())  # noqa: E731
    before = manifest("memory")
    args = stage_args(chain["root"], art, **{"targets.keep_neighbours": "false"})
    assert main(["targets", *args, "--replace-outdated"]) == 0
    kept = json.loads((chain["art"] / "targets" / "train" / "_manifest.json").read_text())
    assert kept["content_excludes"] == ["neighbours.zarr/"] and "content_excludes" not in manifest("targets/train")
    assert manifest("targets/train")["fingerprint"] != kept["fingerprint"]  # keep_neighbours is content: rebuilt
    assert manifest("targets/train")["content_digest"] == kept["content_digest"]  # ... into the same distributions
    assert main(["train-memory", *args]) == 0  # no --replace-outdated needed: the memory is up to date
    assert manifest("memory")["run"] == before["run"]
    assert main(["verify", str(chain["art"] / "targets" / "train")]) == 0


@pytest.mark.unit
def test_a_choice_at_the_edge_of_its_grid_is_a_warning_naming_the_grid():
    """λ 0.95 at the top of the default grid, τ 1.5 at its grid's top: both named with the key to widen; λ 0 (the
    decoder alone) is a bound, not an edge, and a one-value grid is no choice."""
    from types import SimpleNamespace

    from memforge.storage.params import EvaluateParams
    from memforge.training.evaluate import grid_edge_warnings

    config = EvaluateParams(temperature_grid=[4.0])
    choice = SimpleNamespace(knn_lambda=0.0, memory_lambda=0.95, temperature=4.0, memory_temperature=1.5)
    warnings = grid_edge_warnings(choice, config)
    assert warnings == [
        "the memory's λ 0.95 is at the top of evaluate.lambda_grid (0 to 0.95): the best value may lie beyond it; "
        "widen evaluate.lambda_grid",
        "the memory's τ 1.5 is at the top of evaluate.memory_temperature_grid (0.8 to 1.5): the best value may lie "
        "beyond it; widen evaluate.memory_temperature_grid"]
    assert grid_edge_warnings(SimpleNamespace(knn_lambda=0.3, memory_lambda=0.5, temperature=4.0,
                                              memory_temperature=1.0), config) == []
