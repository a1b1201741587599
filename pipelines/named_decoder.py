"""The decoder that params name: the trained decoder when ``encode.model`` is null, else that model.

Never whatever happens to be on disk: a trained decoder left from an earlier run is not used when
``encode.model`` names another model.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile

from storage import fs


def external_decoder(params, fingerprint: str) -> dict:
    """``{"decoder": fingerprint}`` when the decoder is a model outside the artifacts (its identity must enter
    the fingerprint), else nothing (the decoder artifact is an input)."""
    return {"decoder": fingerprint} if params.encode.model else {}


def decoder_inputs(params) -> tuple[str, ...]:
    """The decoder's input role when it is an artifact of the chain, else none."""
    return () if params.encode.model else ("decoder",)


def decoder_path(ctx) -> str:
    """The decoder's local model directory: the artifact's own on local storage, else a copy in a scratch
    directory removed when the process exits."""
    if ctx.params.encode.model:
        return ctx.params.encode.model
    model = ctx.inputs["decoder"].path("model")
    if fs.is_local(model):
        return fs.normalize(model)
    scratch = tempfile.mkdtemp(prefix="memforge-decoder-")
    atexit.register(shutil.rmtree, scratch, True)
    return fs.local_dir(model, scratch)
