"""The decoder that params name: the trained decoder when ``encode.model`` is null, else that model.

Never whatever happens to be on disk: a trained decoder left from an earlier run is not used when
``encode.model`` names another model.
"""
from __future__ import annotations

import tempfile

from storage import fs


def external_decoder(params) -> dict:
    """The named model's fingerprint (content of what a stage depends on) when it is not an artifact."""
    from pipelines.encoder import model_fingerprint

    return {"decoder": model_fingerprint(params.encode.model)} if params.encode.model else {}


def decoder_inputs(params) -> tuple[str, ...]:
    """The decoder's input role when it is an artifact of the chain, else none."""
    return () if params.encode.model else ("decoder",)


def decoder_path(ctx) -> str:
    """The decoder's local model directory."""
    if ctx.params.encode.model:
        return ctx.params.encode.model
    return fs.local_dir(ctx.inputs["decoder"].path("model"), tempfile.mkdtemp())
