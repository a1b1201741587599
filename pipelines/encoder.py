"""The encoder LM: loading it from a local directory, fingerprinting it, and capturing one
representation (FFN input, block output or final hidden state) with a forward hook."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from memforge.storage.errors import MemforgeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BLOCK_LISTS = ("h", "layers", "blocks", "decoder.layers", "encoder.layers")
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm")


class EncoderError(MemforgeError):
    """The encoder model cannot be used as configured; the message names the path or setting."""


def model_fingerprint(path: str) -> str:
    """sha256 over the model's config and weight files (name + content), in name order."""
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in root.iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def load_encoder(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in eval mode; bad paths and non-causal models are clear errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise EncoderError(f"{path}: encoder model directory does not exist" if not os.path.exists(path)
                           else f"{path}: is a file, expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise EncoderError(f"{path}: the model needs its own code to load, which memforge runs only with "
                               "runtime.trust_remote_code=true (set it only for code you trust)") from None
        raise EncoderError(f"{path}: not a Hugging Face model directory: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
    except pickle.UnpicklingError:  # torch's weights_only load refused code in a pickled checkpoint
        raise EncoderError(f"{path}: its pickled checkpoint holds more than tensors, and memforge never unpickles "
                           "code; convert the weights to safetensors from a trusted copy") from None
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot load as a causal LM ({type(config).__name__}): {exc}") from None
    retie_output_embeddings(model, path)
    return model.eval()


def retie_output_embeddings(model: torch.nn.Module, path: str) -> None:
    """Tie the LM head to the input embeddings when the config says so and loading left it unset.

    transformers 5 occasionally leaves a tied ``lm_head.weight`` (absent from the checkpoint) on the
    meta device when another model was loaded earlier in the process; no parameter may stay there.
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and head is not None and head.weight.device.type == "meta":
        head.weight = embeddings.weight
    unloaded = [name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if unloaded:
        raise EncoderError(f"{path}: weights missing from the checkpoint: {', '.join(unloaded)}")


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest context the model's position embeddings allow, when its config says."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_size(model: torch.nn.Module) -> int:
    config = model.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if not size:
        raise EncoderError(f"{type(config).__name__}: cannot tell the hidden size from the config")
    return int(size)


def _attribute(module: torch.nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.base_model
    for name in _BLOCK_LISTS:
        found = _attribute(base, name)
        if isinstance(found, torch.nn.ModuleList) and len(found):
            return found
    raise EncoderError(f"{type(model).__name__}: cannot find its list of transformer blocks")


class _Captured(Exception):
    """Raised by the hook once the representation is kept: the rest of the forward pass is not needed."""


class RepresentationCapture:
    """Registers a hook that keeps the configured representation of the last forward pass.

    ``ffn_input``: input of block ``layer``'s feed-forward sublayer (kNN-LM's choice);
    ``block_output``: output of block ``layer``; ``final``: output of the final norm.
    The forward pass stops as soon as the representation is captured, so the layers after it
    (for the default, the last feed-forward sublayer and the final norm) are never computed;
    with ``stop=False`` it runs on (to the logits, when the caller runs the whole model).
    """

    def __init__(self, model: torch.nn.Module, representation: str, layer: int, stop: bool = True):
        self.value: torch.Tensor | None = None
        self.stop = stop
        blocks = transformer_blocks(model)
        if not -len(blocks) <= layer < len(blocks):
            raise EncoderError(f"encode.layer: {layer} is out of range for a model with {len(blocks)} blocks")
        block = blocks[layer]
        if representation == "ffn_input":
            ffn = next((getattr(block, n) for n in _FFN_NAMES if isinstance(getattr(block, n, None), torch.nn.Module)),
                       None)
            if ffn is None:
                raise EncoderError(f"{type(block).__name__}: cannot find the feed-forward sublayer")
            self.handle = ffn.register_forward_pre_hook(self._keep_input)
        elif representation == "block_output":
            self.handle = block.register_forward_hook(self._keep_output)
        else:
            norm = next((_attribute(model.base_model, n) for n in _FINAL_NORMS if _attribute(model.base_model, n)
                         is not None), None)
            if norm is None:
                raise EncoderError(f"{type(model).__name__}: cannot find the final norm for representation 'final'")
            self.handle = norm.register_forward_hook(self._keep_output)

    def _keep_input(self, _module, args):
        self.value = args[0]
        if self.stop:
            raise _Captured

    def _keep_output(self, _module, _args, output):
        self.value = output[0] if isinstance(output, tuple) else output
        if self.stop:
            raise _Captured

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the base model (no LM head) on ``input_ids`` [B, T] up to the hook; return the captured [B, T, d]."""
        self.value = None
        try:
            model.base_model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        if self.value is None:
            raise EncoderError(f"{type(model).__name__}: the representation hook did not fire")
        return self.value
