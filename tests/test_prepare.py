"""prepare: corpus sources (default stdlib corpus, fsspec URLs), deterministic splits, the token store."""
import sysconfig
from uuid import uuid4

import fsspec
import numpy as np
import pytest
from transformers import AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines.corpus import DEMO_MAX_BYTES, document_split, source_files
from memforge.storage.artifact import open_artifact
from memforge.storage.params import CorpusParams
from memforge.storage.stores import PartOffsets, TokenStore
from memforge.storage.verify import verify

from tiny_lm import WORDS

pytestmark = pytest.mark.stage


def test_default_corpus_is_the_standard_library_capped_in_sorted_order():
    params = CorpusParams()
    files = source_files(params)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert files and all(f.uri.startswith(stdlib) and f.uri.endswith(".py") for f in files)
    assert [f.uri for f in files] == sorted(f.uri for f in files)
    assert sum(f.taken for f in files) <= DEMO_MAX_BYTES  # max_bytes auto: the demo's own cap
    assert [f.name for f in files] == [f.uri[len(stdlib) + 1:] for f in files]  # machine-independent names


def test_site_packages_placeholder_names_the_installed_packages():
    files = source_files(CorpusParams(train=["{site_packages}/*.dist-info/METADATA"], max_bytes=200_000))
    purelib = sysconfig.get_paths()["purelib"]
    assert files and all(f.uri.startswith(purelib) and f.uri.endswith("/METADATA") for f in files)
    assert sum(f.taken for f in files) <= 200_000


def test_split_by_document_depends_on_names_not_locations(tmp_path):
    for where in ("a", "b"):
        for i in range(40):
            (tmp_path / where / "sub").mkdir(parents=True, exist_ok=True)
            (tmp_path / where / "sub" / f"{i:02d}.txt").write_text(f"document {i}")
    splits = [[document_split(f, 0, 0.25) for f in source_files(CorpusParams(train=[str(tmp_path / w / "*/*.txt")]))]
              for w in ("a", "b")]
    assert splits[0] == splits[1]
    assert 0 < splits[0].count("validation") < 40


def test_prepare_reads_an_fsspec_url_corpus(tmp_path, capsys):
    """JSONL documents on memory://, tokenized with a freshly trained BPE tokenizer (in-process Beam runner)."""
    base = f"memory://corpus-{uuid4().hex}"
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, 40)) for _ in range(30)]
    memory = fsspec.filesystem("memory")
    memory.pipe_file(f"{base}/train.jsonl", "".join(f'{{"text": "{d}"}}\n' for d in docs[:25]).encode())
    memory.pipe_file(f"{base}/valid.jsonl", "".join(f'{{"text": "{d}"}}\n' for d in docs[25:]).encode())
    (tmp_path / "p.yaml").write_text("{}\n")
    art = tmp_path / "art"
    code = main(["prepare", "--params", str(tmp_path / "p.yaml"), "--set", f"artifacts_dir={art}",
                 "--set", f"corpus.train=[{base}/train*.jsonl]", "--set", f"corpus.validation=[{base}/valid.jsonl]",
                 "--set", "decoder.vocab_size=300",
                 "--", "--direct_running_mode=in_memory"])
    assert code == 0, capsys.readouterr().err
    tokens = open_artifact(str(art / "tokens"), "tokens")
    tokenizer = AutoTokenizer.from_pretrained(art / "tokens" / "tokenizer")
    assert tokens.manifest["counts"]["vocab_size"] == len(tokenizer) <= 300
    for split, texts in (("train", docs[:25]), ("validation", docs[25:])):
        expected = [i for t in texts
                    for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
        info = tokens.manifest["stats"]["splits"][split]
        offsets = PartOffsets.from_json(info["parts"])
        stream = TokenStore.open(tokens.uri, split).read_rows(offsets, 0, offsets.total_rows)
        np.testing.assert_array_equal(stream, expected)
        assert info["documents"] == len(texts) and info["datastore_rows"] == len(expected) - 1
        assert not (art / "tokens" / split / "datastore_plan.json").exists()  # encode plans its own shards
    assert verify(tokens.uri) == []


def test_a_corpus_file_edited_in_place_is_seen(tmp_path, capsys, caplog):
    """Same name, same size, other bytes: the tokens are no longer up to date."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(" ".join(WORDS[i:i + 20]) * 3)
    (tmp_path / "p.yaml").write_text("{}\n")
    args = ["prepare", "--params", str(tmp_path / "p.yaml"), "--set", f"artifacts_dir={tmp_path / 'art'}",
            "--set", f"corpus.train=[{corpus}/*.txt]", "--set", "corpus.validation_fraction=0.4",
            "--set", "decoder.vocab_size=300", "--", "--direct_running_mode=in_memory"]
    assert main(args) == 0
    with caplog.at_level("INFO", logger="memforge"):
        assert main(args) == 0
    assert "is up to date" in caplog.text
    text = (corpus / "1.txt").read_text()
    (corpus / "1.txt").write_text(text[::-1])  # same size, other content
    capsys.readouterr()
    assert main(args) == 1
    assert "a different tokens artifact is published here" in capsys.readouterr().err


def test_corpus_paths_directories_literal_brackets_and_a_budget_per_split(tmp_path):
    """A directory means its files; an existing path with "[v1]" in it is literal, not a glob; each split
    has its own corpus.max_bytes, so a validation set is never squeezed out by a large train set."""
    train, validation = tmp_path / "train", tmp_path / "valid [v1]"
    for i in range(4):
        (train / "sub").mkdir(parents=True, exist_ok=True)
        (train / "sub" / f"{i}.txt").write_text("x" * 400)
    validation.mkdir()
    (validation / "a.txt").write_text("y" * 300)
    literal = tmp_path / "notes[v1].txt"
    literal.write_text("z" * 10)
    files = source_files(CorpusParams(train=[str(train), str(literal)], validation=[str(validation / "a.txt")],
                                      max_bytes=1000))
    by_split = {split: [f.uri for f in files if f.split == split] for split in ("train", "validation")}
    assert by_split["train"] == [str(literal), str(train / "sub" / "0.txt"), str(train / "sub" / "1.txt")]
    assert by_split["validation"] == [str(validation / "a.txt")]  # 810 bytes of train did not use its budget
    dir_files = source_files(CorpusParams(train=[str(train)], max_bytes=10_000))
    assert [f.name for f in dir_files] == [f"sub/{i}.txt" for i in range(4)]


def test_corpus_file_names_that_are_not_utf8(tmp_path, capsys):
    """Linux file names are bytes: Latin-1 names are read, split by their bytes and hashed, never a coder error."""
    rng = np.random.default_rng(1)
    for directory, name, n_docs in (("train", b"caf\xe9.txt", 1), ("train", b"plain.txt", 1),
                                    ("validation", b"v\xff\xfe.txt", 1)):
        (tmp_path / directory).mkdir(exist_ok=True)
        text = " ".join(rng.choice(WORDS, 200))
        with open(bytes(tmp_path / directory) + b"/" + name, "wb") as handle:
            handle.write(text.encode())
    split = document_split(source_files(CorpusParams(train=[str(tmp_path / "train")]))[0], 0, 0.5)
    assert split in ("train", "validation")
    (tmp_path / "p.yaml").write_text("{}\n")
    art = tmp_path / "art"
    assert main(["prepare", "--params", str(tmp_path / "p.yaml"), "--set", f"artifacts_dir={art}",
                 "--set", f"corpus.train=[{tmp_path / 'train'}]",
                 "--set", f"corpus.validation=[{tmp_path / 'validation'}]",
                 "--set", "decoder.vocab_size=300", "--", "--direct_running_mode=in_memory"]) == 0
    tokens = open_artifact(str(art / "tokens"), "tokens")
    assert verify(str(art / "tokens")) == []
    assert tokens.manifest["counts"]["train_tokens"] > 300 and tokens.manifest["counts"]["validation_tokens"] > 100
