"""A decoder and its MLP memory as one Hugging Face causal LM: what ``export`` publishes.

The forward pass runs the decoder, keeps the memory's input (the representation ``memory_input`` at
``memory_layer``) with a forward hook on the way, runs the memory on the positions whose logits are kept,
and returns the mixture log(λ·p_mem + (1−λ)·p_dec) as logits, p_mem = softmax(memory logits / τ): the rule
``evaluate`` scores. The logits are normalised log-probabilities, so ``generate()`` (greedy, sampling, beams)
and lm-evaluation-harness use the mixture as they would any model's logits; the decoder's KV cache carries
the context, so each generation step runs the decoder and the memory on the new positions only.

Standalone (torch, transformers): ``export`` ships this file, ``mlp_memory.py`` and ``representation.py``
in the model directory (``auto_map``), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads it without memforge; ``import memforge`` registers it, and then no remote code is needed.
"""
from __future__ import annotations

import inspect
import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .mlp_memory import MemoryConfig, MLPMemory
from .representation import RepresentationCapture

MODEL_TYPE = "memforge-memory-lm"


class MemoryLMConfig(PretrainedConfig):
    """The decoder's config (``text_config``), the memory's (``memory_config``), the mixing rule (``lam``, the
    memory's temperature ``memory_temperature``), where the memory reads the decoder (``memory_input``,
    ``memory_layer``), and ``provenance``: the fingerprints of the artifacts it was exported from."""

    model_type = MODEL_TYPE

    def __init__(self, text_config: dict | PretrainedConfig | None = None,
                 memory_config: dict | PretrainedConfig | None = None, lam: float = 0.25,
                 memory_temperature: float = 1.0, memory_input: str = "ffn_input", memory_layer: int = -1,
                 provenance: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        if isinstance(memory_config, dict):
            memory_config = MemoryConfig(**{k: v for k, v in memory_config.items() if k != "model_type"})
        self.text_config, self.memory_config = text_config, memory_config
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

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("text_config", "memory_config"):
            if isinstance(out.get(name), PretrainedConfig):
                out[name] = out[name].to_dict()
        return out

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.text_config


def mix_log_probs(decoder_logits: torch.Tensor, memory_logits: torch.Tensor, lam: float,
                  memory_temperature: float) -> torch.Tensor:
    """log(λ·softmax(memory_logits / τ) + (1−λ)·softmax(decoder_logits)) in float32, in log space."""
    log_p_dec = torch.log_softmax(decoder_logits.float(), dim=-1)
    log_p_mem = torch.log_softmax(memory_logits.float() / memory_temperature, dim=-1)
    log_lam = math.log(lam) if lam > 0 else -math.inf
    log_rest = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(log_p_mem + log_lam, log_p_dec + log_rest)


class MemoryLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Decoder + MLP memory; logits are the log-probabilities of the λ-mixture."""

    config_class = MemoryLMConfig
    base_model_prefix = "decoder"
    _supports_cache_class = True

    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.decoder = AutoModelForCausalLM.from_config(config.text_config)
        self.memory = MLPMemory(config.memory_config)
        self._capture = RepresentationCapture(self.decoder, config.memory_input, config.memory_layer, stop=False)
        self._trims_logits = "logits_to_keep" in inspect.signature(self.decoder.forward).parameters
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from the exported checkpoint."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_output_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values=None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """The decoder's forward (same arguments, same cache); ``logits`` are the mixture's log-probabilities at
        the kept positions (all, or the last ``logits_to_keep``), and the memory runs on those positions only."""
        self._capture.value = None
        trim = {"logits_to_keep": logits_to_keep} if self._trims_logits else {}
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                           use_cache=use_cache, **trim, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        decoder_logits = out.logits if self._trims_logits else out.logits[:, keep]
        memory_input = self._capture.value[:, keep]
        self._capture.value = None
        logits = mix_log_probs(decoder_logits, self.memory(memory_input.to(self.memory.head.weight.dtype)),
                               self.config.lam, self.config.memory_temperature)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.nll_loss(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


AutoConfig.register(MODEL_TYPE, MemoryLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)
