"""``memforge encode``: hidden-state keys and next-token values for each split (Beam).

One Beam element per shard of the datastore plan that ``prepare`` wrote. Windows follow the
reference sliding-window evaluation: window ``w`` starts at ``w * stride`` and is at most
``block_size`` tokens long; it contributes only the targets past its overlap with window
``w - 1`` (window 0 contributes all of its targets). Datastore row ``i`` has value
``token[i + 1]`` and key = the captured representation at position ``i`` of the window that
owns target ``i + 1``.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass

import apache_beam as beam
import numpy as np

from pipelines import worker_errors
from pipelines.prepare import DATASTORE_PLAN, SPLITS, tokens_uri
from pipelines.progress import ShardProgress
from pipelines.runner import pipeline
from storage import fs
from storage.artifact import Artifact, ArtifactBuild, open_artifact
from storage.errors import MemforgeError
from storage.params import Params
from storage.shards import Shard, ShardMarkers, ShardPlan
from storage.stores import KeyStore, PartOffsets, TokenStore
from storage.zarr_rows import shard_geometry

log = logging.getLogger("memforge")


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the split stream, contributing targets ``[first, stop)``."""

    begin: int
    end: int
    first: int
    stop: int


def windows_for_rows(start: int, stop: int, n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """The windows that own the targets of datastore rows ``[start, stop)`` (targets ``start+1 .. stop``)."""
    first_target, stop_target = start + 1, stop + 1

    def owner(target: int) -> int:
        return 0 if target < block_size else (target - block_size) // stride + 1

    windows = []
    for w in range(owner(first_target), owner(stop_target - 1) + 1):
        begin = w * stride
        end = min(begin + block_size, n_tokens)
        own_first = 1 if w == 0 else begin + block_size - stride
        windows.append(Window(begin, end, max(own_first, first_target), min(end, stop_target)))
    return windows


def window_batches(windows: list[Window], batch_size: int):
    """Windows grouped by length (so a batch stacks into one tensor), ``batch_size`` at a time."""
    by_length: dict[int, list[Window]] = {}
    for window in windows:
        by_length.setdefault(window.end - window.begin, []).append(window)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def keys_uri(params: Params, split: str) -> str:
    return fs.join(params.artifacts_dir, "keys", split)


def decoder_uri(params: Params) -> str:
    return fs.join(params.artifacts_dir, "decoder")


class EncodeShard(beam.DoFn):
    """Encode one datastore shard of one split: windows -> hooked forward passes -> key store region."""

    def __init__(self, spec: dict):
        self.spec = spec

    def setup(self) -> None:
        import torch

        from pipelines.encoder import RepresentationCapture, load_encoder

        spec = self.spec
        torch.set_num_threads(spec["threads"])
        self.model = load_encoder(spec["model_path"], spec["trust_remote_code"])
        self.capture = RepresentationCapture(self.model, spec["representation"], spec["layer"])
        self.splits = {
            split: (TokenStore(spec["tokens_uri"], split), PartOffsets.from_json(info["parts"]),
                    KeyStore.open(info["keys_uri"], writable=True), ShardMarkers(info["keys_uri"]))
            for split, info in spec["splits"].items()
        }

    def process(self, element: dict):
        split, shard = element["split"], Shard(**element["shard"])
        reader, offsets, store, markers = self.splits[split]
        if markers.is_done(shard):  # a retried bundle: the shard is already durable
            return
        started = time.perf_counter()
        keys, vals, window_tokens = self.encode_rows(reader, offsets, shard.start, shard.stop)
        try:
            files = store.write_shard(shard, keys, vals)
        except MemforgeError as exc:
            worker_errors.report(store.rows.root, shard, exc)
            return
        markers.mark_done(shard, files, {"rows": shard.rows, "window_tokens": window_tokens,
                                         "seconds": time.perf_counter() - started})
        yield shard.name

    def encode_rows(self, reader: TokenStore, offsets: PartOffsets, start: int, stop: int):
        spec = self.spec
        return encode_rows(self.model, self.capture, reader, offsets, start, stop, spec["block_size"],
                           spec["stride"], spec["batch_size"], spec["hidden_size"])


def encode_rows(model, capture, reader: TokenStore, offsets: PartOffsets, start: int, stop: int, block_size: int,
                stride: int, batch_size: int, hidden: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Keys (float32 [rows, hidden]), values (int32) and window tokens read, for datastore rows
    ``[start, stop)``: the windows that own those targets, batched by length, through ``capture``."""
    import torch

    windows = windows_for_rows(start, stop, offsets.total_rows, block_size, stride)
    base = windows[0].begin
    tokens = reader.read_rows(offsets, base, windows[-1].end)
    keys = np.empty((stop - start, hidden), np.float32)
    with torch.inference_mode():
        for batch in window_batches(windows, batch_size):
            ids = np.stack([tokens[w.begin - base:w.end - base] for w in batch]).astype(np.int64)
            states = capture(model, torch.from_numpy(ids)).float().numpy()
            for row, w in zip(states, batch):
                keys[w.first - 1 - start:w.stop - 1 - start] = row[w.first - 1 - w.begin:w.stop - 1 - w.begin]
    vals = tokens[start + 1 - base:stop + 1 - base]
    return keys, vals, sum(w.end - w.begin for w in windows)


def _encoder_source(params: Params, tokens: Artifact) -> tuple[str, dict[str, Artifact]]:
    inputs = {"tokens": tokens}
    if params.encode.model:
        return params.encode.model, inputs
    uri = decoder_uri(params)
    try:
        decoder = open_artifact(uri, "decoder")
    except MemforgeError as exc:
        raise MemforgeError(f"encode.model is null, so the trained decoder is the encoder, but: {exc}; "
                            "run `memforge train-decoder` or set encode.model to a local HF model directory") from None
    inputs["decoder"] = decoder
    return fs.local_dir(decoder.path("model"), tempfile.mkdtemp()), inputs


def encoder_spec(params: Params, model_path: str) -> dict:
    """Check the encoder against the params; return what workers need to run it."""
    from pipelines.encoder import EncoderError, RepresentationCapture, hidden_size, load_encoder, \
        max_positions, model_fingerprint

    model = load_encoder(model_path, params.encode.trust_remote_code)
    limit = max_positions(model)
    if limit is not None and params.encode.block_size > limit:
        raise EncoderError(f"encode.block_size: {params.encode.block_size} exceeds the maximum positions "
                           f"({limit}) of the model at {model_path}")
    RepresentationCapture(model, params.encode.representation, params.encode.layer).handle.remove()
    return {
        "model_path": model_path, "model_fingerprint": model_fingerprint(model_path),
        "model_class": type(model).__name__, "vocab_size": int(model.config.vocab_size),
        "hidden_size": hidden_size(model), "max_positions": limit,
        "trust_remote_code": params.encode.trust_remote_code, "representation": params.encode.representation,
        "layer": params.encode.layer, "block_size": params.encode.block_size, "stride": params.encode.stride,
        "batch_size": params.encode.batch_size, "threads": params.encode.threads_per_worker,
    }


def _datastore_plan(tokens: Artifact, split: str, params: Params) -> ShardPlan:
    """The split's datastore plan from prepare; it must match the key store's Zarr shard geometry."""
    uri = tokens.path(split, DATASTORE_PLAN)
    plan = ShardPlan.from_json(fs.read_json(uri))
    _, unit = shard_geometry(plan.total_rows, params.encode.chunk_rows, params.encode.shard_chunks)
    if plan != ShardPlan.even(plan.total_rows, unit):
        raise MemforgeError(f"{uri}: planned for other chunk sizes than encode.chunk_rows="
                            f"{params.encode.chunk_rows} / encode.shard_chunks={params.encode.shard_chunks}; "
                            "rerun `memforge prepare` with these values")
    return plan


def encode(params: Params, *, rebuild: bool = False, beam_args: list[str] = ()) -> str:
    """Run the encode stage for both splits; returns the keys directory."""
    tokens = open_artifact(tokens_uri(params), "tokens")
    model_path, inputs = _encoder_source(params, tokens)
    spec = encoder_spec(params, model_path)
    if tokens.manifest["counts"]["vocab_size"] > spec["vocab_size"]:
        raise MemforgeError(f"{model_path}: model vocabulary ({spec['vocab_size']}) is smaller than the token "
                            f"store's tokenizer ({tokens.manifest['counts']['vocab_size']}); "
                            "prepare the corpus with this model's tokenizer")
    spec.update(tokens_uri=tokens.uri, splits={})
    section = {**params.section("encode"), "model": {k: spec[k] for k in (
        "model_fingerprint", "model_class", "hidden_size", "max_positions")}}
    plans = {split: _datastore_plan(tokens, split, params) for split in SPLITS}
    builds, pending = {}, []
    for split, plan in plans.items():
        uri = keys_uri(params, split)
        build = ArtifactBuild.begin(uri, "keys", {**section, "split": split}, inputs, fmt="zarr-v3", rebuild=rebuild)
        if build.up_to_date:
            log.info("encode: %s is up to date (fingerprint %s)", uri, build.fingerprint[:12])
            continue
        store = KeyStore.create(uri, plan.total_rows, spec["hidden_size"], params.encode.dtype,
                                params.encode.chunk_rows, params.encode.shard_chunks)
        build.plan(plan)
        todo = build.pending(plan)
        log.info("encode: %s: %d rows in %d shards; %d shards already done (skipped), %d to run",
                 split, plan.total_rows, len(plan.shards), len(plan.shards) - len(todo), len(todo))
        worker_errors.clear(uri)
        builds[split] = (build, store, plan)
        spec["splits"][split] = {"keys_uri": uri, "parts": tokens.manifest["stats"]["splits"][split]["parts"]}
        pending += [{"split": split, "shard": asdict(s)} for s in todo]
    runner = None
    if pending:
        beam_pipeline, runner = pipeline(list(beam_args), params.encode.num_workers)
        watchers = [ShardProgress(f"encode {split}", build.uri,
                                  [Shard(**e["shard"]) for e in pending if e["split"] == split], unit="tokens")
                    for split, (build, _, _) in builds.items()]
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for watcher in watchers:
                stack.enter_context(watcher)
            with beam_pipeline as p:
                (p | "shards" >> beam.Create(pending) | beam.Reshuffle()
                   | "encode" >> beam.ParDo(EncodeShard(spec)))
        rows = sum(Shard(**e["shard"]).rows for e in pending)
        log.info("encode: %s rows in %.1f s (%s tokens/s) on %s", f"{rows:,}", time.perf_counter() - started,
                 f"{rows / (time.perf_counter() - started):,.0f}", runner)
        for split, (build, _, _) in builds.items():
            worker_errors.raise_reported(build.uri)
    for split, (build, store, plan) in builds.items():
        build.publish(
            counts={"rows": plan.total_rows, "vocab_size": tokens.manifest["counts"]["vocab_size"],
                    "tokens": plan.total_rows + 1},
            arrays=store.rows.describe(),
            stats={"key_dtype": params.encode.dtype, "hidden_size": spec["hidden_size"],
                   "layer": params.encode.layer, "representation": params.encode.representation,
                   "block_size": params.encode.block_size, "stride": params.encode.stride,
                   "model_fingerprint": spec["model_fingerprint"]},
            beam_runner=runner,
        )
        log.info("encode: published %s (%s rows)", build.uri, f"{plan.total_rows:,}")
    return fs.join(params.artifacts_dir, "keys")
