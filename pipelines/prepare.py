"""``memforge prepare``: read the corpus, tokenize it in parallel (Beam), write the token store.

Output ``<artifacts_dir>/tokens``: ``tokenizer/`` (HF directory), and per split (train, validation,
test) ``<split>/part-NNNNN.parquet`` (one part per work shard: a group of small files, or one byte range of a
file larger than ``corpus.shard_bytes``, see ``ranges``). The test split (``corpus.test``) is only ever scored
by evaluate: nothing encodes it. It knows nothing of the key store's chunks: ``encode`` plans its own shards
from the token counts.

Each split is one token stream: documents in input order, each followed by the tokenizer's
end-of-text token. Datastore row ``i`` is stream position ``i``: its key is the state after
reading tokens ``0..i`` and its value is token ``i + 1``, so every token with context is in
the datastore exactly once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import asdict

from memforge.pipelines import model_source
from memforge.pipelines.corpus import CorpusError, SourceFile, SourceFiles, source_files
from memforge.pipelines.range_tokens import RangeTokens
from memforge.pipelines.ranges import FileRange, file_ranges
from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.pipelines.tokenizer import TokenIds, load_tokenizer, train_tokenizer
from memforge.pipelines.tokenizer_sample import sample_texts
from memforge.storage import fs, local_cache
from memforge.storage.params import CorpusParams
from memforge.storage.paths import TOKEN_SPLITS
from memforge.storage.shards import Shard, ShardPlan, load_plan
from memforge.storage.stores import TOKENIZER_DIR, PartOffsets, TokenStore

log = logging.getLogger("memforge")


def _sources(files: list[SourceFile]) -> dict:
    """The corpus as it is now: file count, bytes, and a sha256 over every file's name, split and content
    (every byte is read: ~1 s per GB on a local disk), so a file edited in place is always seen."""
    listing = [(f.name, f.size, f.split, fs.file_checksum(f.uri)) for f in files]
    content = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"files": len(files), "bytes": sum(f.size for f in files), "content_sha256": content}


def _named_tokenizer(params):
    """The tokenizer of ``encode.model`` or ``decoder.init`` (a local directory or any fsspec URL), or None when
    neither is set (prepare trains one)."""
    for key, source in (("encode.model", params.encode.model), ("decoder.init", params.decoder.init)):
        if source:
            model_source.require(source, key)
            return load_tokenizer(local_cache.local_path(source, local_cache.listing_key(source)),
                                  params.runtime.trust_remote_code)
    return None


def _write_tokenizer(params, named, files: list[SourceFile], uri: str) -> None:
    """Copy the named tokenizer (``_named_tokenizer``) into the artifact, or train one on a sample of the train
    split."""
    with tempfile.TemporaryDirectory() as scratch:
        if named is not None:
            named.save_pretrained(scratch)
        else:
            log.info("prepare: training a byte-level BPE tokenizer (vocab %d) on the train split",
                     params.decoder.vocab_size)
            train_tokenizer(sample_texts(files, corpus_params(params)), params.decoder.vocab_size, scratch)
        fs.upload_dir(scratch, uri)


def _shard_plan(ranges: list[FileRange], shard_bytes: int) -> ShardPlan:
    """Consecutive ranges grouped into work shards of at most ``shard_bytes`` (a larger range alone)."""
    sizes, current, used = [], 0, 0
    for piece in ranges:
        if current and used + piece.stop - piece.start > shard_bytes:
            sizes.append(current)
            current, used = 0, 0
        current, used = current + 1, used + piece.stop - piece.start
    return ShardPlan.from_sizes(sizes + [current])


class TokenizeShards(ShardWorker):
    """One work shard: read its file ranges, tokenize documents, write one Parquet part per split."""

    def __init__(self, root: str, corpus: dict, trust_remote_code: bool, files: list[dict], ranges: list[list]):
        self.root, self.corpus, self.trust_remote_code = root, corpus, trust_remote_code
        self.files, self.ranges = files, ranges

    def setup(self) -> None:
        self.params = CorpusParams(**self.corpus)
        self.scratch = tempfile.TemporaryDirectory()
        self.token_ids = TokenIds.load(fs.local_dir(fs.join(self.root, TOKENIZER_DIR), self.scratch.name),
                                       self.trust_remote_code)

    def teardown(self) -> None:
        self.scratch.cleanup()

    def process(self, role: str, uri: str, shard: Shard):
        tokens = RangeTokens(self.token_ids, self.params)
        for file_index, start, stop in self.ranges[shard.start:shard.stop]:
            tokens.read(SourceFile(**self.files[file_index]), start, stop)
        columns, stats = tokens.columns()
        files = {}
        for split in TOKEN_SPLITS:
            files.update(TokenStore(self.root, split).write_shard(shard, *columns[split]))
        return files, stats


def corpus_params(params) -> CorpusParams:
    """The corpus section (every key read through the stage's params view)."""
    return CorpusParams(**{key.split(".", 1)[1]: params.value(key) for key in Prepare.content + Prepare.layout
                           if key.startswith("corpus.")})


class Prepare(Stage):
    """Read and tokenize the corpus into the token store (Beam): one element per group of input files."""

    name = "prepare"
    summary = "read and tokenize the corpus into the token store (Beam)"
    outputs = ("tokens",)
    format = "parquet"
    content = ("corpus.train", "corpus.validation", "corpus.test", "corpus.validation_fraction", "corpus.format",
               "corpus.text_field", "corpus.on_decode_error", "corpus.max_bytes", "corpus.document_separator",
               "corpus.tokenizer_sample_bytes", "decoder.init", "decoder.vocab_size", "encode.model")
    layout = ("corpus.shard_bytes",)
    execution = ("runtime.num_workers", "runtime.trust_remote_code")
    sharded = True
    progress_unit = "tokens"
    progress_rows_known = False

    def files(self, ctx: Context) -> SourceFiles:
        if "files" not in ctx.scratch:
            ctx.scratch["files"] = source_files(corpus_params(ctx.params))
        return ctx.scratch["files"]

    def check(self, ctx: Context) -> None:
        """A split whose files hold no bytes at all, or a named tokenizer that cannot load, is refused before
        anything is written or run."""
        for key, splits in (("corpus.train", (None, "train")), ("corpus.validation", ("validation",)),
                            ("corpus.test", ("test",))):
            files = [f for f in self.files(ctx) if f.split in splits]
            if files and not any(f.size for f in files):
                names = ", ".join(f.uri for f in files[:3]) + (", ..." if len(files) > 3 else "")
                raise CorpusError(f"{key}: its {len(files)} file(s) are empty (0 bytes): {names}")
        ctx.scratch["named_tokenizer"] = _named_tokenizer(ctx.params)  # refused here, before anything is written

    def external(self, ctx: Context) -> dict:
        """What the corpus files are right now (count, bytes, content hash)."""
        if "sources" not in ctx.scratch:
            ctx.scratch["sources"] = _sources(self.files(ctx))
        return ctx.scratch["sources"]

    def artifact_params(self, ctx: Context, role: str) -> dict:
        return {**ctx.params.values(self.content), "sources": self.external(ctx)}

    def before_plan(self, ctx: Context, role: str, build) -> None:
        _write_tokenizer(ctx.params, ctx.scratch["named_tokenizer"], self.files(ctx), fs.join(build.uri, TOKENIZER_DIR))

    def ranges(self, ctx: Context, role: str) -> list[FileRange]:
        """The byte ranges the files are read in (the tokenizer in the artifact checks a stream's cuts)."""
        if "ranges" not in ctx.scratch:
            params = corpus_params(ctx.params)
            with tempfile.TemporaryDirectory() as scratch:
                tokenizer = functools.cache(lambda: TokenIds.load(
                    fs.local_dir(fs.join(ctx.uri(role), TOKENIZER_DIR), scratch), ctx.params.runtime.trust_remote_code))
                ctx.scratch["ranges"] = [r for f in self.files(ctx) for r in file_ranges(f, params, tokenizer)]
        return ctx.scratch["ranges"]

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        files, ranges = self.files(ctx), self.ranges(ctx, role)
        log.info("prepare: %d files (%s bytes) in %d ranges", len(files), f"{sum(f.taken for f in files):,}",
                 len(ranges))
        return _shard_plan(ranges, ctx.params.corpus.shard_bytes)

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        return TokenizeShards(roles["tokens"], corpus_params(ctx.params).model_dump(mode="json"),
                              ctx.params.runtime.trust_remote_code, [asdict(f) for f in self.files(ctx)],
                              [[r.file, r.start, r.stop] for r in self.ranges(ctx, "tokens")])

    def finalize(self, ctx: Context, role: str, build) -> Published:
        root = build.uri
        plan = load_plan(root)
        markers = [build.markers.read(s) for s in plan.shards]
        with tempfile.TemporaryDirectory() as scratch:
            vocab_size = len(load_tokenizer(fs.local_dir(fs.join(root, TOKENIZER_DIR), scratch)))
        splits, counts = {}, {"vocab_size": vocab_size}
        has_test = any(f.split == "test" for f in self.files(ctx))
        for split in TOKEN_SPLITS:
            offsets = PartOffsets.from_counts([(m_shard.name, m["stats"][f"{split}_tokens"])
                                               for m_shard, m in zip(plan.shards, markers)])
            documents = sum(m["stats"]["documents"][split] for m in markers)
            if offsets.total_rows < 2 and (split != "test" or has_test):
                what = {"train": "corpus.train", "validation": "the validation split", "test": "corpus.test"}[split]
                hint = {"train": "all documents are empty or whitespace-only",
                        "validation": "set corpus.validation or raise corpus.validation_fraction",
                        "test": "its documents are empty or whitespace-only"}[split]
                raise CorpusError(f"{what}: fewer than 2 tokens ({documents} non-empty documents): {hint}")
            splits[split] = {"tokens": offsets.total_rows, "documents": documents, "parts": offsets.to_json()}
            if split != "test":  # the test split is scored only: it has no datastore rows
                splits[split]["datastore_rows"] = offsets.total_rows - 1
            counts[f"{split}_tokens"] = offsets.total_rows
        counts["rows"] = counts["train_tokens"]
        stats = {
            "splits": splits,
            "skipped_documents": sum(m["stats"]["skipped_documents"] for m in markers),
            "empty_documents": sum(m["stats"]["empty_documents"] for m in markers),
            "capped": self.files(ctx).capped,  # what corpus.max_bytes left out, per split key
            "compressed_files": dict(Counter(f.compression for f in self.files(ctx) if f.compression)),
        }
        log.info("prepare: %s: %s train / %s validation / %s test tokens, vocab %d", root,
                 f"{counts['train_tokens']:,}", f"{counts['validation_tokens']:,}", f"{counts['test_tokens']:,}",
                 vocab_size)
        return Published(counts=counts, stats=stats)
