"""Where a causal LM's keys come from: its transformer blocks, and a forward hook that keeps one
representation of them (FFN input, block output or final hidden state) during the model's own forward.

Standalone (torch only): ``export`` ships this file inside the Hugging Face model directory, so the exported
model captures the memory's input exactly as ``encode`` captured the keys.
"""
from __future__ import annotations

import torch

BLOCK_LISTS = ("h", "layers", "blocks", "decoder.layers", "encoder.layers")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm")
REPRESENTATIONS = ("ffn_input", "block_output", "final")


class RepresentationError(ValueError):
    """The model has no such representation (layer out of range, no feed-forward sublayer or final norm)."""


def attribute(module: torch.nn.Module, dotted: str):
    """``module.a.b.c`` for ``dotted`` "a.b.c", or None where a part is missing."""
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (GPT-2's ``h``, Llama's and Qwen's ``layers``, ...)."""
    base = model.base_model
    for name in BLOCK_LISTS:
        found = attribute(base, name)
        if isinstance(found, torch.nn.ModuleList) and len(found):
            return found
    raise RepresentationError(f"{type(model).__name__}: cannot find its list of transformer blocks")


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
            raise RepresentationError(f"encode.layer: {layer} is out of range for a model with {len(blocks)} blocks")
        block = blocks[layer]
        if representation == "ffn_input":
            ffn = next((getattr(block, n) for n in FFN_NAMES if isinstance(getattr(block, n, None), torch.nn.Module)),
                       None)
            if ffn is None:
                raise RepresentationError(f"{type(block).__name__}: cannot find the feed-forward sublayer")
            self.handle = ffn.register_forward_pre_hook(self._keep_input)
        elif representation == "block_output":
            self.handle = block.register_forward_hook(self._keep_output)
        elif representation == "final":
            norm = next((attribute(model.base_model, n) for n in FINAL_NORMS
                         if attribute(model.base_model, n) is not None), None)
            if norm is None:
                raise RepresentationError(f"{type(model).__name__}: cannot find the final norm for representation "
                                          "'final'")
            self.handle = norm.register_forward_hook(self._keep_output)
        else:
            raise RepresentationError(f"representation: {representation!r} is not one of {', '.join(REPRESENTATIONS)}")

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
            raise RepresentationError(f"{type(model).__name__}: the representation hook did not fire")
        return self.value
