"""The decoder and its memory as one Hugging Face causal LM (``training.memory_lm``): composed in memory from the
two models, and written as a model directory that loads with ``AutoModelForCausalLM.from_pretrained``,
its modelling code inside (``auto_map``), so memforge need not be installed where it is used."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from memforge.training import memory_lm, memory_lm_config, mlp_memory, representation
from memforge.training.memory_lm import MemoryLMForCausalLM
from memforge.training.memory_lm_config import MemoryLMConfig
from memforge.training.mlp_memory import MLPMemory

# the modelling code the directory ships: memory_lm.py imports the other three relatively
CODE_FILES = tuple(Path(module.__file__) for module in (memory_lm, memory_lm_config, mlp_memory, representation))
AUTO_MAP = {"AutoConfig": "memory_lm_config.MemoryLMConfig", "AutoModelForCausalLM": "memory_lm.MemoryLMForCausalLM"}


def compose(decoder: torch.nn.Module, memory: MLPMemory, lam: float, memory_temperature: float,
            memory_input: str, memory_layer: int, provenance: dict | None = None) -> MemoryLMForCausalLM:
    """Decoder + memory as one model (eval mode, on the decoder's device and dtype) made of the two modules
    themselves: no weight is copied, so a large decoder is held once."""
    config = MemoryLMConfig(text_config=decoder.config, memory_config=memory.config.to_dict(), lam=lam,
                            memory_temperature=memory_temperature, memory_input=memory_input,
                            memory_layer=memory_layer, provenance=provenance or {}, auto_map=dict(AUTO_MAP))
    model = MemoryLMForCausalLM(config, decoder=decoder, memory=memory)
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
