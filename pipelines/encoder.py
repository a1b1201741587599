"""The encoder LM: loading it from a local directory, fingerprinting it, and capturing one
representation (FFN input, block output or final hidden state) with a forward hook
(``training.representation``)."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from memforge.storage.errors import MemforgeError
from memforge.training import representation

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks; EncoderError when it has none memforge can find."""
    try:
        return representation.transformer_blocks(model)
    except representation.RepresentationError as exc:
        raise EncoderError(str(exc)) from None


class RepresentationCapture(representation.RepresentationCapture):
    """``training.representation.RepresentationCapture`` (the hook the exported model also uses), whose
    errors are EncoderErrors naming the setting."""

    def __init__(self, model: torch.nn.Module, representation_name: str, layer: int, stop: bool = True):
        try:
            super().__init__(model, representation_name, layer, stop)
        except representation.RepresentationError as exc:
            raise EncoderError(str(exc)) from None

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        try:
            return super().__call__(model, input_ids)
        except representation.RepresentationError as exc:
            raise EncoderError(str(exc)) from None
