"""The configuration of the exported decoder + memory model (``training.memory_lm``), apart from the model so
that registering it with ``AutoConfig`` costs no model import.

Standalone (transformers only): ``export`` ships it in the model directory beside ``memory_lm.py``.
"""
from __future__ import annotations

import importlib

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "memforge-memory-lm"
MEMORY_KEYS = ("input_dim", "vocab_size", "depth", "hidden_mult", "activation", "lm_head", "width")


class MemoryLMConfig(PretrainedConfig):
    """The decoder's config (``text_config``), the memory's shape (``memory_config``), the mixing rule (``lam``,
    the memory's temperature ``memory_temperature``), where the memory reads the decoder (``memory_input``,
    ``memory_layer``), and ``provenance``: the fingerprints of the artifacts it was exported from."""

    model_type = MODEL_TYPE

    def __init__(self, text_config: dict | PretrainedConfig | None = None, memory_config: dict | None = None,
                 lam: float = 0.25, memory_temperature: float = 1.0, memory_input: str = "ffn_input",
                 memory_layer: int = -1, provenance: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.memory_config = {key: value for key, value in (memory_config or {}).items() if key in MEMORY_KEYS}
        self.lam, self.memory_temperature = float(lam), float(memory_temperature)
        self.memory_input, self.memory_layer = memory_input, int(memory_layer)
        self.provenance = provenance or {}
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam: {lam} is not a probability in [0, 1]")
        if not self.memory_temperature > 0:
            raise ValueError(f"memory_temperature: {memory_temperature} must be positive")
        super().__init__(**kwargs)
        if text_config is not None:  # generation stops and pads as the decoder does
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(self, name, None) is None:
                    setattr(self, name, getattr(text_config, name, None))
            self.vocab_size = text_config.vocab_size
        if __name__.startswith("memforge."):  # memforge's copy: its model class registers on first use
            importlib.import_module(".memory_lm", __package__)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(out.get("text_config"), PretrainedConfig):
            out["text_config"] = out["text_config"].to_dict()
        return out

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.text_config


AutoConfig.register(MODEL_TYPE, MemoryLMConfig, exist_ok=True)
