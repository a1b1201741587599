"""``memforge encode``: hidden-state keys and next-token values for each split (Beam).

One Beam element per shard of each split's key store. Encode plans its own shards from the token
store's row counts and its layout params (Zarr chunk and shard sizes); windows and keys follow
``pipelines.windows``. The encoder is ``encode.model`` when set, else the trained decoder.
"""
from __future__ import annotations

import logging
import tempfile

from memforge.pipelines.named_decoder import decoder_inputs, decoder_uri
from memforge.pipelines.stage import Context, Published, ShardWorker, Stage
from memforge.pipelines.tokenizer import check_same_tokenizer, load_tokenizer
from memforge.pipelines.windows import encode_rows
from memforge.storage import fs, local_cache
from memforge.storage.errors import MemforgeError
from memforge.storage.paths import split_roles
from memforge.storage.shards import Shard, ShardPlan
from memforge.storage.stores import TOKENIZER_DIR, KeyStore, PartOffsets, TokenStore
from memforge.storage.zarr_rows import shard_geometry

log = logging.getLogger("memforge")


class EncodeShards(ShardWorker):
    """Encode one datastore shard of one split: windows -> hooked forward passes -> key store region."""

    def __init__(self, spec: dict):
        self.spec = spec

    def setup(self) -> None:
        import threading

        import torch

        from memforge.pipelines import devices, worker_cache
        from memforge.pipelines.encoder import RepresentationCapture, load_encoder

        spec = self.spec
        torch.set_num_threads(spec["threads"])
        self.device = devices.claim(spec["device"])
        self.device_name = devices.describe(self.device)
        self.autocast = lambda: devices.autocast(self.device, spec["precision"])

        def load():  # from the model's URL: a worker needs nothing on the driver's disk
            path = local_cache.local_path(spec["model_uri"], spec["model_key"])
            model = load_encoder(path, spec["trust_remote_code"]).to(self.device)
            return model, RepresentationCapture(model, spec["representation"], spec["layer"])

        # once per process and thread (a capture holds the last forward pass's representation)
        self.model, self.capture = worker_cache.cached(
            ("encoder", spec["model_fingerprint"], str(self.device), spec["representation"], spec["layer"],
             threading.get_ident()), load)
        self.cast_to = "float16" if spec["key_dtype"] == "float16" else "float32"  # bfloat16: rounded by the store
        self.splits = {
            role: (TokenStore(spec["tokens_uri"], info["split"]), PartOffsets.from_json(info["parts"]),
                   KeyStore.open(info["keys_uri"], writable=True))
            for role, info in spec["splits"].items()
        }

    def process(self, role: str, uri: str, shard: Shard):
        spec = self.spec
        reader, offsets, store = self.splits[role]
        with self.autocast():  # a no-op context for fp32
            keys, vals, window_tokens = encode_rows(self.model, self.capture, reader, offsets, shard.start,
                                                    shard.stop, spec["block_size"], spec["stride"],
                                                    spec["batch_size"], spec["hidden_size"], self.cast_to)
        return store.write_shard(shard, keys, vals), {"window_tokens": window_tokens, "device": self.device_name}


def encoder_spec(params, model_uri: str, model_key: str) -> dict:
    """Check the encoder against the params; return what workers need to run it (its URL, not a path)."""
    from memforge.pipelines import devices
    from memforge.pipelines.encoder import (
        EncoderError,
        RepresentationCapture,
        hidden_size,
        load_encoder,
        max_positions,
        model_fingerprint,
    )

    device = devices.resolve(params.encode.device, "encode.device")  # before any work: a missing GPU is named
    model_path = local_cache.local_path(model_uri, model_key)
    model = load_encoder(model_path, params.runtime.trust_remote_code)
    limit = max_positions(model)
    if limit is not None and params.encode.block_size > limit:
        raise EncoderError(f"encode.block_size: {params.encode.block_size} exceeds the maximum positions "
                           f"({limit}) of the model at {model_uri}")
    RepresentationCapture(model, params.encode.representation, params.encode.layer).handle.remove()
    return {
        "model_uri": model_uri, "model_key": model_key, "model_fingerprint": model_fingerprint(model_path),
        "model_class": type(model).__name__, "vocab_size": int(model.config.vocab_size),
        "hidden_size": hidden_size(model), "max_positions": limit,
        "trust_remote_code": params.runtime.trust_remote_code, "representation": params.encode.representation,
        "layer": params.encode.layer, "block_size": params.encode.block_size, "stride": params.encode.stride,
        "batch_size": params.encode.batch_size, "threads": params.runtime.threads_per_worker,
        "device": device, "precision": params.encode.precision, "key_dtype": params.encode.dtype,
    }


class Encode(Stage):
    """Hidden-state keys and next-token values of both splits, one Beam pipeline."""

    name = "encode"
    summary = "hidden-state keys and next-token values for each split (Beam)"
    outputs = split_roles("keys")
    format = "zarr-v3"
    inputs = ("tokens", "decoder")
    content = ("encode.model", "encode.layer", "encode.representation", "encode.dtype", "encode.block_size",
               "encode.stride", "encode.precision")
    layout = ("encode.chunk_rows", "encode.shard_chunks")
    execution = ("encode.batch_size", "runtime.num_workers", "runtime.threads_per_worker", "runtime.trust_remote_code",
                 "encode.device")
    sharded = True
    progress_unit = "tokens"

    def input_roles(self, ctx: Context) -> tuple[str, ...]:
        return ("tokens",) + decoder_inputs(ctx.params)

    def check(self, ctx: Context) -> None:
        model_uri, model_key = decoder_uri(ctx)  # the encoder: encode.model, else the trained decoder
        spec = ctx.scratch["spec"] = encoder_spec(ctx.params, model_uri, model_key)
        tokens = ctx.inputs["tokens"]
        if tokens.manifest["counts"]["vocab_size"] > spec["vocab_size"]:
            raise MemforgeError(f"{model_uri}: model vocabulary ({spec['vocab_size']}) is smaller than the token "
                                f"store's tokenizer ({tokens.manifest['counts']['vocab_size']}); "
                                "prepare the corpus with this model's tokenizer")
        if ctx.params.encode.model:  # token ids mean nothing to a model of another tokenizer
            with tempfile.TemporaryDirectory() as scratch:
                store_tokenizer = load_tokenizer(fs.local_dir(tokens.path(TOKENIZER_DIR), scratch))
            check_same_tokenizer(local_cache.local_path(model_uri, model_key), store_tokenizer, "encode.model",
                                 ctx.params.runtime.trust_remote_code, named=model_uri)

    def artifact_params(self, ctx: Context, role: str) -> dict:
        spec = ctx.scratch["spec"]
        model = {k: spec[k] for k in ("model_fingerprint", "model_class", "hidden_size", "max_positions")}
        return {**ctx.params.values(self.content, strip="encode"), "model": model, "split": role.split("/")[1]}

    def plan(self, ctx: Context, role: str) -> ShardPlan:
        """Rows = the split's tokens - 1; shards = whole Zarr shards of the key store."""
        n_rows = ctx.inputs["tokens"].manifest["stats"]["splits"][role.split("/")[1]]["tokens"] - 1
        _, shard_rows = shard_geometry(n_rows, ctx.params.encode.chunk_rows, ctx.params.encode.shard_chunks)
        return ShardPlan.even(n_rows, shard_rows)

    def create(self, ctx: Context, role: str, plan: ShardPlan) -> None:
        KeyStore.create(ctx.uri(role), plan.total_rows, ctx.scratch["spec"]["hidden_size"], ctx.params.encode.dtype,
                        ctx.params.encode.chunk_rows, ctx.params.encode.shard_chunks)

    def worker(self, ctx: Context, roles: dict[str, str]) -> ShardWorker:
        tokens = ctx.inputs["tokens"]
        splits = {role: {"split": role.split("/")[1], "keys_uri": uri,
                         "parts": tokens.manifest["stats"]["splits"][role.split("/")[1]]["parts"]}
                  for role, uri in roles.items()}
        return EncodeShards({**ctx.scratch["spec"], "tokens_uri": tokens.uri, "splits": splits})

    def finalize(self, ctx: Context, role: str, build) -> Published:
        spec, n_rows = ctx.scratch["spec"], self.plan(ctx, role).total_rows
        store = KeyStore.open(build.uri, writable=True)
        return Published(
            counts={"rows": n_rows, "vocab_size": ctx.inputs["tokens"].manifest["counts"]["vocab_size"],
                    "tokens": n_rows + 1},
            arrays=store.rows.describe(),
            stats={"key_dtype": ctx.params.encode.dtype, "hidden_size": spec["hidden_size"],
                   "layer": ctx.params.encode.layer, "representation": ctx.params.encode.representation,
                   "block_size": ctx.params.encode.block_size, "stride": ctx.params.encode.stride,
                   "model_fingerprint": spec["model_fingerprint"], "precision": ctx.params.encode.precision,
                   # the devices that encoded its shards (a resumed build may have used several)
                   "devices": sorted({record["stats"].get("device", "cpu")
                                      for record in build.shard_records(self.plan(ctx, role))})},
        )
