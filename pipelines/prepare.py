"""``memforge prepare``: read the corpus, tokenize it in parallel (Beam), write the token store.

Output ``<artifacts_dir>/tokens``: ``tokenizer/`` (HF directory), and per split
``<split>/part-NNNNN.parquet`` (one part per work shard of input files) plus
``<split>/datastore_plan.json``, the shard plan of the split's datastore rows for ``encode``.

Each split is one token stream: documents in input order, each followed by the tokenizer's
end-of-text token. Datastore row ``i`` is stream position ``i``: its key is the state after
reading tokens ``0..i`` and its value is token ``i + 1``, so every token with context is in
the datastore exactly once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict

import apache_beam as beam
import numpy as np

from pipelines import worker_errors
from pipelines.corpus import CorpusError, SourceFile, document_split, read_documents, source_files
from pipelines.progress import ShardProgress
from pipelines.runner import pipeline
from pipelines.tokenizer import load_tokenizer, train_tokenizer
from storage import fs
from storage.artifact import ArtifactBuild
from storage.params import CorpusParams, Params
from storage.shards import Shard, ShardMarkers, ShardPlan
from storage.stores import PartOffsets, TokenStore
from storage.zarr_rows import shard_geometry

log = logging.getLogger("memforge")
SPLITS = ("train", "validation")
TOKENIZER_DIR = "tokenizer"
DATASTORE_PLAN = "datastore_plan.json"
_DOC_ID_SHIFT = 32


def tokens_uri(params: Params) -> str:
    return fs.join(params.artifacts_dir, "tokens")


def _sources(files: list[SourceFile]) -> dict:
    listing = hashlib.sha256(json.dumps([(f.name, f.size, f.split) for f in files]).encode()).hexdigest()
    return {"files": len(files), "bytes": sum(f.size for f in files), "listing_sha256": listing}


def corpus_sources(params: Params) -> dict:
    """What the corpus files are right now (count, bytes, listing hash): prepare's input from outside
    the artifacts, part of its fingerprint and of the Prefect cache key."""
    return _sources(source_files(params.corpus))


def _stage_params(params: Params, files: list[SourceFile]) -> dict:
    return {
        "corpus": params.section("corpus"),
        "sources": _sources(files),
        "tokenizer": {"from": params.encode.model or params.decoder.init, "vocab_size": params.decoder.vocab_size,
                      "trust_remote_code": params.encode.trust_remote_code},
        "datastore": {"chunk_rows": params.encode.chunk_rows, "shard_chunks": params.encode.shard_chunks},
    }


def _train_texts(files: list[SourceFile], corpus: CorpusParams):
    for file in files:
        for index, text in read_documents(file, corpus):
            if text and text.strip() and document_split(file, index, corpus.validation_fraction) == "train":
                yield text


def _write_tokenizer(params: Params, files: list[SourceFile], uri: str) -> None:
    """Copy the configured tokenizer into the artifact, or train one on the train split."""
    with tempfile.TemporaryDirectory() as scratch:
        source = params.encode.model or params.decoder.init
        if source:
            load_tokenizer(source, params.encode.trust_remote_code).save_pretrained(scratch)
        else:
            log.info("prepare: training a byte-level BPE tokenizer (vocab %d) on the train split",
                     params.decoder.vocab_size)
            train_tokenizer(_train_texts(files, params.corpus), params.decoder.vocab_size, scratch)
        fs.upload_dir(scratch, uri)


def _shard_plan(files: list[SourceFile], shard_bytes: int) -> ShardPlan:
    sizes, current, used = [], 0, 0
    for file in files:
        if current and used + file.size > shard_bytes:
            sizes.append(current)
            current, used = 0, 0
        current, used = current + 1, used + file.size
    return ShardPlan.from_sizes(sizes + [current])


class TokenizeShard(beam.DoFn):
    """One work shard: read its files, tokenize documents, write one Parquet part per split, mark done."""

    def __init__(self, root: str, corpus: dict, trust_remote_code: bool):
        self.root, self.corpus, self.trust_remote_code = root, corpus, trust_remote_code

    def setup(self) -> None:
        self.params = CorpusParams(**self.corpus)
        self.scratch = tempfile.TemporaryDirectory()
        self.tokenizer = load_tokenizer(fs.local_dir(fs.join(self.root, TOKENIZER_DIR), self.scratch.name),
                                        self.trust_remote_code)
        self.markers = ShardMarkers(self.root)

    def teardown(self) -> None:
        self.scratch.cleanup()

    def process(self, element: dict):
        shard = Shard(**element["shard"])
        if self.markers.is_done(shard):  # a retried bundle: the shard is already durable
            return
        started = time.perf_counter()
        try:
            columns, stats = self._tokenize([SourceFile(**f) for f in element["files"]])
        except CorpusError as exc:
            worker_errors.report(self.root, shard, exc)
            return
        files = {}
        for split in SPLITS:
            files.update(TokenStore(self.root, split).write_shard(shard, *columns[split]))
        stats["seconds"] = time.perf_counter() - started
        self.markers.mark_done(shard, files, stats)
        yield shard.name

    def _tokenize(self, files: list[SourceFile]):
        eos = self.tokenizer.eos_token_id
        parts = {split: ([], [], []) for split in SPLITS}
        stats = {"skipped_documents": 0, "empty_documents": 0, "documents": {s: 0 for s in SPLITS}}
        for file in files:
            for index, text in read_documents(file, self.params):
                if text is None:
                    stats["skipped_documents"] += 1
                    continue
                if not text.strip():
                    stats["empty_documents"] += 1
                    continue
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if eos is not None:
                    ids = ids + [eos]
                split = document_split(file, index, self.params.validation_fraction)
                tokens, docs, positions = parts[split]
                tokens.append(np.asarray(ids, np.int32))
                docs.append(np.full(len(ids), (file.index << _DOC_ID_SHIFT) + index, np.int64))
                positions.append(np.arange(len(ids), dtype=np.int32))
                stats["documents"][split] += 1
        columns = {}
        for split, (tokens, docs, positions) in parts.items():
            columns[split] = [np.concatenate(c) if c else np.zeros(0, d)
                              for c, d in zip((tokens, docs, positions), (np.int32, np.int64, np.int32))]
            stats[f"{split}_tokens"] = int(len(columns[split][0]))
        stats["rows"] = sum(stats[f"{s}_tokens"] for s in SPLITS)
        return columns, stats


def prepare(params: Params, *, rebuild: bool = False, beam_args: list[str] = ()) -> str:
    """Run the prepare stage; returns the token artifact's location."""
    root = tokens_uri(params)
    files = source_files(params.corpus)
    build = ArtifactBuild.begin(root, "tokens", _stage_params(params, files), fmt="parquet", rebuild=rebuild)
    if build.up_to_date:
        log.info("prepare: %s is up to date (fingerprint %s)", root, build.fingerprint[:12])
        return root
    tokenizer_uri = fs.join(root, TOKENIZER_DIR)
    if not fs.exists(fs.join(root, "_plan.json")):  # the plan is written only once the tokenizer is complete
        _write_tokenizer(params, files, tokenizer_uri)
    plan = build.plan(_shard_plan(files, params.corpus.shard_bytes))
    pending = build.pending(plan)
    log.info("prepare: %d files (%d bytes) in %d shards; %d already done, %d to run",
             len(files), sum(f.size for f in files), len(plan.shards), len(plan.shards) - len(pending), len(pending))
    worker_errors.clear(root)
    if pending:
        elements = [{"shard": asdict(s), "files": [asdict(f) for f in files[s.start:s.stop]]} for s in pending]
        beam_pipeline, runner = pipeline(list(beam_args), params.encode.num_workers)
        with ShardProgress("prepare", root, pending, unit="tokens", total=0):
            with beam_pipeline as p:
                (p | "shards" >> beam.Create(elements) | beam.Reshuffle()
                   | "tokenize" >> beam.ParDo(TokenizeShard(root, params.section("corpus"),
                                                            params.encode.trust_remote_code)))
        worker_errors.raise_reported(root, CorpusError)
    else:
        runner = None
    return _publish(build, plan, params, runner)


def _publish(build: ArtifactBuild, plan: ShardPlan, params: Params, runner: str | None) -> str:
    root = build.uri
    markers = [build.markers.read(s) for s in plan.shards]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = len(load_tokenizer(fs.local_dir(fs.join(root, TOKENIZER_DIR), scratch)))
    splits, counts = {}, {"vocab_size": vocab_size}
    for split in SPLITS:
        offsets = PartOffsets.from_counts([(m_shard.name, m["stats"][f"{split}_tokens"])
                                           for m_shard, m in zip(plan.shards, markers)])
        documents = sum(m["stats"]["documents"][split] for m in markers)
        if offsets.total_rows < 2:
            what = "corpus.train" if split == "train" else "the validation split"
            hint = ("all documents are empty or whitespace-only" if split == "train"
                    else "set corpus.validation or raise corpus.validation_fraction")
            raise CorpusError(f"{what}: fewer than 2 tokens ({documents} non-empty documents): {hint}")
        _, unit = shard_geometry(offsets.total_rows - 1, params.encode.chunk_rows, params.encode.shard_chunks)
        datastore = ShardPlan.even(offsets.total_rows - 1, unit)
        fs.write_json_atomic(fs.join(root, split, DATASTORE_PLAN), datastore.to_json())
        splits[split] = {"tokens": offsets.total_rows, "documents": documents, "datastore_rows": datastore.total_rows,
                         "datastore_shards": len(datastore.shards), "parts": offsets.to_json()}
        counts[f"{split}_tokens"] = offsets.total_rows
    counts["rows"] = counts["train_tokens"]
    stats = {
        "splits": splits,
        "skipped_documents": sum(m["stats"]["skipped_documents"] for m in markers),
        "empty_documents": sum(m["stats"]["empty_documents"] for m in markers),
    }
    build.publish(counts=counts, stats=stats, beam_runner=runner)
    log.info("prepare: published %s: %s train / %s validation tokens, vocab %d", root,
             f"{counts['train_tokens']:,}", f"{counts['validation_tokens']:,}", vocab_size)
    return root
