"""prepare on large files: documents inside a text file, byte ranges tokenized as the whole file, the bounded
tokenizer sample, corpus.max_bytes with ranges."""
import json
import re
import shutil
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from memforge.flows.cli import main
from memforge.pipelines import documents
from memforge.pipelines.corpus import source_files
from memforge.pipelines.cuts import joins_cleanly, stream_cut
from memforge.pipelines.ranges import file_ranges
from memforge.pipelines.tokenizer import TokenIds, train_tokenizer
from memforge.pipelines.tokenizer_sample import PIECE, sample_texts
from memforge.storage.artifact import open_artifact
from memforge.storage.errors import ParamsError
from memforge.storage.params import CorpusParams, load_params
from memforge.storage.stores import PartOffsets, TokenStore

from tiny_lm import WORDS, make_gpt2

HEADING = r"^(?= = [^=])"  # WikiText's article headings, kept with their article


def wiki_text(articles: int, seed: int, lines: int = 10) -> str:
    """WikiText-like text: ' = Title = ' headings, 1 to ``lines`` lines of words, blank lines, lines that start
    with spaces."""
    rng = np.random.default_rng(seed)
    parts = [" \n"]
    for a in range(articles):
        parts.append(f" = Article {a} = \n \n")
        for _ in range(rng.integers(1, lines)):
            indent = "  " if rng.random() < 0.2 else " "
            parts.append(indent + " ".join(rng.choice(WORDS, rng.integers(0, 14))) + " \n" * rng.integers(1, 3))
    return "".join(parts)


def prepare(tmp_path, name: str, corpus: str, *settings: str, split: str = "train") -> dict:
    """Run ``memforge prepare`` on ``corpus`` (and a small validation file) in this process: the train split's
    token ids and doc ids of ``split``, its part count, the manifest's stats and the tokenizer's directory.
    With corpus.validation_fraction among ``settings``, the validation split is drawn from ``corpus``."""
    (tmp_path / "p.yaml").write_text("{}\n")
    (tmp_path / "valid.txt").write_text(wiki_text(3, seed=99))
    art = tmp_path / name
    args = ["prepare", "--params", str(tmp_path / "p.yaml"), "--set", f"artifacts_dir={art}",
            "--set", f"corpus.train=[{corpus}]", "--set", "decoder.vocab_size=300"]
    if not any(s.startswith("corpus.validation_fraction") for s in settings):
        args += ["--set", f"corpus.validation=[{tmp_path / 'valid.txt'}]"]
    for setting in settings:
        args += ["--set", setting]
    assert main(args + ["--", "--direct_running_mode=in_memory"]) == 0
    tokens = open_artifact(str(art / "tokens"), "tokens")
    offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"][split]["parts"])
    store = TokenStore.open(tokens.uri, split)
    return {"tokens": store.read_rows(offsets, 0, offsets.total_rows),
            "docs": store.read_rows(offsets, 0, offsets.total_rows, column="doc"),
            "parts": len(offsets.parts), "stats": tokens.manifest["stats"], "tokenizer": art / "tokens" / "tokenizer"}


def expected(tokenizer, text: str, separator: str | None) -> tuple[list[int], list[int]]:
    """Token ids and doc ids of each document tokenized whole (documents keyed by their byte offset)."""
    pieces = [(0, text)] if separator is None else []
    if separator is not None:
        start = 0
        for match in re.finditer(separator, text, re.MULTILINE):
            pieces.append((start, text[start:match.start()]))
            start = match.end()
        pieces.append((start, text[start:]))
    ids, docs = [], []
    for start, document in pieces:
        if document.strip():
            doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids += doc_ids
            docs += [len(text[:start].encode())] * len(doc_ids)
    return ids, docs


@pytest.mark.stage
@pytest.mark.parametrize("separator, sub_block", [(None, 2048), (HEADING, 2048), (r"\n\s*\n", 2048), (HEADING, 300)])
def test_a_large_text_file_in_ranges_is_tokenized_as_the_whole_file(tmp_path, monkeypatch, separator, sub_block):
    """A 60 KB file in ~8 KB ranges (sub-blocks of ~2 KB; of 300 characters: articles longer than a sub-block are
    cut inside), with a trained BPE tokenizer and with a GPT-2 model's: the same token ids and doc ids as each
    document tokenized whole, and as one big shard."""
    monkeypatch.setattr(documents, "SUB_BLOCK", sub_block)
    text = wiki_text(200, seed=3) if sub_block > 1000 else wiki_text(40, seed=3, lines=60)
    corpus = tmp_path / "wiki.train.tokens"
    corpus.write_text(text)
    model = make_gpt2(tmp_path / "gpt2", [wiki_text(50, seed=4)])
    sep = [f"corpus.document_separator={json.dumps(separator)}"] if separator else []
    for tokenizer_settings in ([], [f"encode.model={model}"]):
        settings = [*sep, *tokenizer_settings, "corpus.max_bytes=1000000"]
        ranged = prepare(tmp_path, "ranged", corpus, *settings, "corpus.shard_bytes=8000")
        whole = prepare(tmp_path, "whole", corpus, *settings, "corpus.shard_bytes=1000000")
        tokenizer = AutoTokenizer.from_pretrained(ranged["tokenizer"])
        ids, docs = expected(tokenizer, text, separator)
        assert ranged["parts"] >= 5 and whole["parts"] == 1
        np.testing.assert_array_equal(ranged["tokens"], ids)
        np.testing.assert_array_equal(ranged["docs"], docs)  # file 0: the document's byte offset
        np.testing.assert_array_equal(whole["tokens"], ids)
        np.testing.assert_array_equal(whole["docs"], docs)
        assert ranged["stats"] == whole["stats"] | {"splits": ranged["stats"]["splits"]}
        assert ranged["stats"]["splits"]["train"]["documents"] == len(set(docs))
        for art in ("ranged", "whole"):
            shutil.rmtree(tmp_path / art)


@pytest.mark.stage
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_the_split_of_each_document_does_not_depend_on_the_ranges(tmp_path, suffix):
    """Without corpus.validation, documents are drawn into validation by a hash of (file, byte offset): the same
    documents land in each split whatever corpus.shard_bytes cuts the file into."""
    text = wiki_text(300, seed=8)
    corpus = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        corpus.write_text("".join(json.dumps({"text": article}) + "\n" for article in re.split(HEADING, text, 0, re.M)))
    else:
        corpus.write_text(text)
    settings = ["corpus.validation_fraction=0.3", "corpus.max_bytes=1000000",
                f"corpus.document_separator={json.dumps(HEADING)}"]
    for split in ("train", "validation"):
        ranged = prepare(tmp_path, "ranged", corpus, *settings, "corpus.shard_bytes=5000", split=split)
        whole = prepare(tmp_path, "whole", corpus, *settings, "corpus.shard_bytes=1000000", split=split)
        assert ranged["parts"] >= 5 and whole["parts"] == 1
        np.testing.assert_array_equal(ranged["tokens"], whole["tokens"])
        np.testing.assert_array_equal(ranged["docs"], whole["docs"])
        assert len(np.unique(ranged["docs"])) > 40
        for art in ("ranged", "whole"):
            shutil.rmtree(tmp_path / art)


@pytest.mark.unit
def test_a_stream_is_never_cut_where_the_tokenizer_joins_the_two_sides(tmp_path):
    """GPT-2's pre-tokenizer reads "\\n  b" as "\\n " + " b", its pieces as "\\n" and " " + " b": where "\\n " is
    one token, such a line end is no cut; a file whose every line starts with two spaces has none and stays one
    range (logged)."""
    indented = tmp_path / "indented.txt"
    indented.write_text("".join(f"  {' '.join(WORDS[i % 20:i % 20 + 5])}\n" for i in range(3000)))
    train_tokenizer([indented.read_text()], 300, str(tmp_path / "tok"))
    tokenizer = TokenIds.load(str(tmp_path / "tok"))
    text = "alpha beta\n  gamma delta\nepsilon zeta\n"
    assert not joins_cleanly(tokenizer, text, text.index("  gamma"))
    assert joins_cleanly(tokenizer, text, text.index("epsilon"))
    assert stream_cut(tokenizer, text, 1, len(text)) == text.index("epsilon")
    params = CorpusParams(train=[str(indented)], shard_bytes=10_000, max_bytes=10**9)
    file = source_files(params)[0]
    assert [(r.start, r.stop) for r in file_ranges(file, params, lambda: tokenizer)] == [(0, file.size)]


@pytest.mark.unit
def test_jsonl_ranges_and_max_bytes_with_separators(tmp_path):
    """JSONL is cut at line ends; corpus.max_bytes cuts the last file at a line end and no range passes it."""
    lines = [json.dumps({"text": " ".join(WORDS[i % 20:i % 20 + 4])}) + "\n" for i in range(2000)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(lines))
    params = CorpusParams(train=[str(jsonl)], shard_bytes=5_000, max_bytes=30_001)
    file = source_files(params)[0]
    ranges = file_ranges(file, params, lambda: None)
    data = jsonl.read_bytes()
    assert len(ranges) >= 5 and ranges[0].start == 0 and ranges[-1].stop == file.limit <= 30_001
    assert all(a.stop == b.start and data[a.stop - 1:a.stop] == b"\n" for a, b in zip(ranges, ranges[1:]))
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text(300, seed=5))
    params = CorpusParams(train=[str(text)], shard_bytes=3_000, max_bytes=20_000, document_separator=HEADING)
    file = source_files(params)[0]
    ranges = file_ranges(file, params, lambda: None)
    content = text.read_bytes()
    assert ranges[-1].stop == file.limit <= 20_000 and content[file.limit - 1:file.limit] == b"\n"
    assert all(content[r.start:r.start + 3] == b" = " for r in ranges[1:])  # each at an article heading


@pytest.mark.stage
def test_max_bytes_holds_with_ranges_and_a_separator(tmp_path):
    """The token store holds exactly the documents of the capped bytes, however many ranges read them."""
    corpus = tmp_path / "wiki.txt"
    corpus.write_text(wiki_text(300, seed=6))
    got = prepare(tmp_path, "art", corpus, f"corpus.document_separator={json.dumps(HEADING)}",
                  "corpus.shard_bytes=4000", "corpus.max_bytes=25000")
    cap = source_files(CorpusParams(train=[str(corpus)], max_bytes=25_000))[0].limit
    ids, docs = expected(AutoTokenizer.from_pretrained(got["tokenizer"]),
                         corpus.read_bytes()[:cap].decode(), HEADING)
    assert got["parts"] >= 4
    np.testing.assert_array_equal(got["tokens"], ids)
    np.testing.assert_array_equal(got["docs"], docs)


@pytest.mark.unit
def test_a_bad_document_separator_is_refused_naming_the_key(tmp_path):
    (tmp_path / "p.yaml").write_text("corpus:\n  document_separator: '^(?= = '\n")
    with pytest.raises(ParamsError, match=r"corpus\.document_separator: .*not a valid regular expression"):
        load_params(tmp_path / "p.yaml")


@pytest.mark.unit
def test_tokenizer_training_on_one_very_long_line_is_prompt_bounded_and_deterministic(tmp_path):
    """A 6 MB file with no line end: the sample comes in pieces of at most PIECE characters; training on it
    twice is fast and gives the same tokenizer; a smaller tokenizer_sample_bytes reads about that much."""
    line = tmp_path / "line.txt"
    line.write_text(" ".join(np.random.default_rng(7).choice(WORDS, 1_100_000)))
    params = CorpusParams(train=[str(line)], max_bytes=10**9)
    files = source_files(params)
    pieces = list(sample_texts(files, params))
    assert max(len(p) for p in pieces) <= PIECE and sum(len(p) for p in pieces) == line.stat().st_size
    started = time.perf_counter()
    for out in ("a", "b"):
        train_tokenizer(sample_texts(files, params), 300, str(tmp_path / out))
    assert time.perf_counter() - started < 60
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    bounded = CorpusParams(train=[str(line)], max_bytes=10**9, tokenizer_sample_bytes=2_000_000)
    assert 1_900_000 < sum(len(p) for p in sample_texts(files, bounded)) <= 2_000_000


@pytest.mark.stage
def test_the_prepare_bench_part_at_a_small_size(tmp_path, monkeypatch):
    """`memforge bench --only prepare` on a 1.5 MB file in 500 KB ranges (the bench runs 200 MB): both runs
    publish, every figure has its note, and the process tree's peak RSS is below 1.5 GB."""
    from memforge.bench import prepare as prepare_part
    from memforge.bench import report
    from memforge.bench import run as bench

    monkeypatch.setattr(prepare_part, "CORPUS_BYTES", 1_500_000)
    monkeypatch.setattr(prepare_part, "SHARD_BYTES", 500_000)
    runs = bench.run(only=["prepare"], workdir=str(tmp_path))
    figures = runs["prepare"].figures
    assert set(figures) == set(prepare_part.NOTES) and 1.4 < figures["prepare_corpus_mb"] <= 1.5
    assert figures["prepare_shards"] >= 3 and figures["prepare_train_tokens"] > 100_000
    assert 0 < figures["prepare_parallel_peak_rss_mb"] < 1536 and 0 < figures["prepare_serial_peak_rss_mb"] < 1536
    assert "| `prepare_speedup` |" in report.markdown(runs, bench.NOTES)
