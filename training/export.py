"""``memforge export``'s work: the decoder named by params and the memory artifact composed at the mixing rule
(``training.compose``) and written as one Hugging Face model directory, ``<artifacts_dir>/export/model``."""
from __future__ import annotations

import logging
import tempfile

from memforge.pipelines.encoder import load_encoder
from memforge.pipelines.stage import Published
from memforge.pipelines.tokenizer import load_tokenizer
from memforge.storage import fs
from memforge.storage.stores import TOKENIZER_DIR
from memforge.training.compose import compose, save_model
from memforge.training.mlp_memory import MLPMemory

MODEL_DIR = "model"
log = logging.getLogger("memforge")


def export(params, decoder_path: str, decoder_fingerprint: str, inputs: dict, mixing: dict, uri: str) -> Published:
    """Compose the decoder at ``decoder_path`` and the memory artifact with ``mixing`` (λ, τ and where each came
    from) and write the model directory with the token store's tokenizer into ``<uri>/model``."""
    memory_artifact, tokens = inputs["memory"], inputs["tokens"]
    decoder = load_encoder(decoder_path, params.runtime.trust_remote_code)
    with tempfile.TemporaryDirectory() as memory_dir, tempfile.TemporaryDirectory() as tokenizer_dir:
        memory = MLPMemory.from_pretrained(fs.local_dir(memory_artifact.path("model"), memory_dir))
        tokenizer = load_tokenizer(fs.local_dir(tokens.path(TOKENIZER_DIR), tokenizer_dir),
                                   params.runtime.trust_remote_code)
    trained = memory_artifact.manifest["params"]
    provenance = {"decoder": inputs["decoder"].fingerprint if "decoder" in inputs else decoder_fingerprint,
                  "decoder_weights": decoder_fingerprint, "memory": memory_artifact.fingerprint,
                  "evaluate": inputs["eval"].fingerprint,
                  "mixing_from": {key: mixing[f"{key}_from"] for key in ("lam", "memory_temperature")}}
    model = compose(decoder, memory, mixing["lam"], mixing["memory_temperature"], trained["representation"],
                    trained["input_layer"], provenance)
    with tempfile.TemporaryDirectory() as scratch:
        save_model(model, tokenizer, scratch)
        fs.upload_dir(scratch, fs.join(uri, MODEL_DIR))
    log.info("export: decoder + memory (λ %g from %s, τ %g from %s) in %s", mixing["lam"], mixing["lam_from"],
             mixing["memory_temperature"], mixing["memory_temperature_from"], fs.join(uri, MODEL_DIR))
    return Published(counts={"parameters": sum(p.numel() for p in model.parameters())},
                     stats={**mixing, "memory_input": trained["representation"], "memory_layer": trained["input_layer"],
                            "decoder_type": decoder.config.model_type, "provenance": provenance})
