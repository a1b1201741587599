"""Part ``storage``: bytes per token on disk of the token store and the key store."""
from __future__ import annotations

from memforge.bench.measure import Note, store_bytes
from memforge.bench.workspace import Workspace
from memforge.storage import fs
from memforge.storage.artifact import open_artifact

SCALE = 4  # x the bench's 1 MB of text, encoded by the tiny model

NOTES = {
    "tokens_bytes_per_token": Note(f"token store's Parquet bytes ÷ tokens (both splits) of {SCALE} MB of text"),
    "keys_bytes_per_token": Note("train key store's bytes on disk (Zarr keys fp16 + values int32, compressed) ÷ "
                                 "its rows, tiny model"),
    "keys_raw_bytes_per_token": Note("the same uncompressed: 2·d + 4 (an fp16 key and an int32 value)"),
}


def bench_storage(ws: Workspace) -> dict:
    """Bytes per token on disk: token store (Parquet) and key store (Zarr keys + values)."""
    params = ws.params(SCALE, "tiny")
    tokens = open_artifact(fs.join(params.artifacts_dir, "tokens"))
    n_tokens = tokens.manifest["counts"]["train_tokens"] + tokens.manifest["counts"]["validation_tokens"]
    keys = fs.join(params.artifacts_dir, "keys", "train")
    if not fs.exists(fs.join(keys, "_manifest.json")):
        from memforge.flows.stages import run_stage

        run_stage("encode", params)
    manifest = open_artifact(keys).manifest
    rows, dim = manifest["counts"]["rows"], manifest["stats"]["hidden_size"]
    return {
        "tokens_bytes_per_token": round(store_bytes(tokens.uri, (".parquet",)) / n_tokens, 3),
        "keys_bytes_per_token": round(store_bytes(keys) / rows, 2),
        "keys_raw_bytes_per_token": 2 * dim + 4,
    }
