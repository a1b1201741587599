"""The decoder and its memory as one Hugging Face causal LM (``training.memory_lm``): built in memory from the
two models, and written as a model directory that loads with ``AutoModelForCausalLM.from_pretrained``,
its modelling code inside (``auto_map``), so memforge need not be installed where it is used."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from memforge.pipelines.encoder import load_encoder
from memforge.pipelines.stage import Published
from memforge.pipelines.tokenizer import load_tokenizer
from memforge.storage import fs
from memforge.storage.stores import TOKENIZER_DIR
from memforge.training import memory_lm, memory_lm_config, mlp_memory, representation
from memforge.training.export_stage import MODEL_DIR
from memforge.training.memory_lm import MemoryLMForCausalLM
from memforge.training.memory_lm_config import MemoryLMConfig
from memforge.training.mlp_memory import MLPMemory

# the modelling code the directory ships: memory_lm.py imports the other three relatively
CODE_FILES = tuple(Path(module.__file__) for module in (memory_lm, memory_lm_config, mlp_memory, representation))
log = logging.getLogger("memforge")
AUTO_MAP = {"AutoConfig": "memory_lm_config.MemoryLMConfig", "AutoModelForCausalLM": "memory_lm.MemoryLMForCausalLM"}


def compose(decoder: torch.nn.Module, memory: MLPMemory, lam: float, memory_temperature: float,
            memory_input: str, memory_layer: int, provenance: dict | None = None) -> MemoryLMForCausalLM:
    """Decoder + memory as one model (eval mode, the decoder's device and dtype), sharing no tensor with the
    two models it copies."""
    config = MemoryLMConfig(text_config=decoder.config, memory_config=memory.config.to_dict(), lam=lam,
                            memory_temperature=memory_temperature, memory_input=memory_input,
                            memory_layer=memory_layer, provenance=provenance or {}, auto_map=dict(AUTO_MAP))
    model = MemoryLMForCausalLM(config)
    model.decoder.load_state_dict(decoder.state_dict())
    model.memory.load_state_dict(memory.state_dict())
    if getattr(decoder, "generation_config", None) is not None:
        model.generation_config = decoder.generation_config
    parameter = next(decoder.parameters())
    return model.to(device=parameter.device, dtype=parameter.dtype).eval()


def save_model(model: MemoryLMForCausalLM, tokenizer, directory: str | Path) -> None:
    """``model`` (weights as safetensors, config), ``tokenizer`` and the modelling code into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for source in CODE_FILES:
        shutil.copyfile(source, directory / source.name)


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
