"""The decoder that params name: the trained decoder when ``encode.model`` is null, else that model.

Never whatever happens to be on disk: a trained decoder left from an earlier run is not used when
``encode.model`` names another model.
"""
from __future__ import annotations

from memforge.pipelines import model_source
from memforge.storage import local_cache


def external_decoder(params, fingerprint: str) -> dict:
    """``{"decoder": fingerprint}`` when the decoder is a model outside the artifacts (its identity must enter
    the fingerprint), else nothing (the decoder artifact is an input)."""
    return {"decoder": fingerprint} if params.encode.model else {}


def decoder_inputs(params) -> tuple[str, ...]:
    """The decoder's input role when it is an artifact of the chain, else none."""
    return () if params.encode.model else ("decoder",)


def decoder_uri(ctx) -> tuple[str, str]:
    """(URL of the decoder's model directory, a key identifying its content): ``encode.model`` (a local
    path or any fsspec URL) or the trained decoder artifact's model."""
    if ctx.params.encode.model:
        model_source.require(ctx.params.encode.model, "encode.model")
        return ctx.params.encode.model, local_cache.listing_key(ctx.params.encode.model)
    return ctx.inputs["decoder"].path("model"), ctx.inputs["decoder"].content_digest


def decoder_path(ctx) -> str:
    """A local directory with the decoder's model: in place when local, else this process's copy (fetched
    once, removed at exit)."""
    return local_cache.local_path(*decoder_uri(ctx))
