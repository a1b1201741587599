"""A decoder and its MLP memory as one Hugging Face causal LM: what ``export`` publishes.

The forward pass runs the decoder, keeps the memory's input (the representation ``memory_input`` at
``memory_layer``) with a forward hook on the way, runs the memory on the positions whose logits are kept,
and returns the mixture log(λ·p_mem + (1−λ)·p_dec) as logits, p_mem = softmax(memory logits / τ): the rule
``evaluate`` scores. The logits are normalised log-probabilities, so ``generate()`` (greedy, sampling, beams)
and lm-evaluation-harness use the mixture as they would any model's logits; the decoder's KV cache carries
the context, so each generation step runs the decoder and the memory on the new positions only.

Standalone (torch, transformers): ``export`` ships this file, ``memory_lm_config.py``, ``mlp_memory.py`` and
``representation.py`` in the model directory (``auto_map``), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it without memforge; with memforge
installed, ``import memforge`` registers it (``memforge.hf_registry``), and no remote code is needed.
"""
from __future__ import annotations

import inspect
import math

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .memory_lm_config import MemoryLMConfig
from .mlp_memory import MemoryConfig, MLPMemory
from .representation import RepresentationCapture


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

    def __init__(self, config: MemoryLMConfig, decoder: PreTrainedModel | None = None, memory: MLPMemory | None = None):
        """Built from ``config`` (weights to load), or around an existing ``decoder`` and ``memory`` (shared)."""
        super().__init__(config)
        self.decoder = decoder if decoder is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.memory = memory if memory is not None else MLPMemory(MemoryConfig(**config.memory_config))
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
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """The decoder's forward (same arguments, same cache); ``logits`` are the mixture's log-probabilities at
        the kept positions (all, or the last ``logits_to_keep``), and the memory runs on those positions only."""
        self._capture.value = None
        trim = {"logits_to_keep": logits_to_keep} if self._trims_logits else {}
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache, **trim, **kwargs)
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


AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)
