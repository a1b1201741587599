"""Compressed corpora (gzip, zstd, bz2: the norm for dumps) are read through fsspec's compression: the tokens
are those of the same files uncompressed, and the tokens manifest says how many files were compressed."""
from __future__ import annotations

import bz2
import gzip
import json

import numpy as np
import pytest
import zstandard

from memforge.flows.cli import main
from memforge.storage.artifact import open_artifact
from memforge.storage.stores import TokenStore

from tiny_lm import WORDS, make_gpt2

pytestmark = pytest.mark.stage

COMPRESS = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress}


def _tokens(art, split):
    tokens = open_artifact(str(art / "tokens"), "tokens")
    parts = tokens.manifest["stats"]["splits"][split]["parts"]
    store = TokenStore(tokens.uri, split)
    return tokens, np.concatenate([store.read_shard(name).column("token").to_numpy() for name, _, _ in parts])


def _prepare(tmp_path, model, name, train, validation) -> int:
    return main(["prepare", "--set", f"artifacts_dir={tmp_path / name}", "--set", f"encode.model={model}",
                 "--set", f"corpus.train={json.dumps(train)}", "--set", f"corpus.validation={json.dumps(validation)}",
                 "--set", "runtime.num_workers=1", "--", "--direct_running_mode=in_memory"])


def test_gzip_zstd_and_bz2_files_give_the_tokens_of_the_plain_files(tmp_path):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    rng = np.random.default_rng(0)
    texts = []
    for i, suffix in enumerate(COMPRESS):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, 30))}) for _ in range(40)]
        texts += [json.loads(line)["text"] for line in lines]
        data = ("\n".join(lines) + "\n").encode()
        (plain / f"part{i}.jsonl").write_bytes(data)
        (packed / f"part{i}.jsonl{suffix}").write_bytes(COMPRESS[suffix](data))
    stream = ("= Heading =\n" + "\n".join(texts[:20]) + "\n").encode()
    (plain / "valid.txt").write_bytes(stream)
    (packed / "valid.txt.gz").write_bytes(gzip.compress(stream))
    model = make_gpt2(tmp_path / "model", texts)

    assert _prepare(tmp_path, model, "plain", [str(plain / "*.jsonl")], [str(plain / "valid.txt")]) == 0
    assert _prepare(tmp_path, model, "packed", [str(packed / "*.jsonl.*")], [str(packed / "valid.txt.gz")]) == 0
    for split in ("train", "validation"):
        _, expected = _tokens(tmp_path / "plain", split)
        manifest, found = _tokens(tmp_path / "packed", split)
        assert len(expected) > 500 and np.array_equal(found, expected), split
    assert manifest.manifest["stats"]["compressed_files"] == {"gzip": 2, "zstd": 1, "bz2": 1}
    assert manifest.manifest["stats"]["splits"]["train"]["documents"] == 120


def test_a_file_that_does_not_decompress_is_named(tmp_path, capsys):
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all\n")
    assert main(["prepare", "--set", f"artifacts_dir={tmp_path / 'art'}",
                 "--set", f"corpus.train=[{tmp_path / 'broken.jsonl.gz'}]"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'broken.jsonl.gz'}: cannot read it as gzip" in err
    assert not (tmp_path / "art").exists()
