"""The MLP memory: residual feed-forward blocks mapping a decoder hidden state to vocabulary logits.

Each block is LayerNorm -> up-projection (``hidden_mult`` x width) -> activation -> down-projection,
added to its input; a final LayerNorm and an LM head follow. The head is the memory's own, or the
decoder's LM head copied in, either frozen or trained further (``lm_head: frozen | tied | own``).
Saved as a Hugging Face-style directory: ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU}


@dataclass(frozen=True)
class MemoryConfig:
    """Shape of an MLP memory (travels inside its directory)."""

    input_dim: int
    vocab_size: int
    depth: int = 4
    hidden_mult: int = 4
    activation: str = "gelu"
    lm_head: str = "frozen"

    def build(self) -> "MLPMemory":
        return MLPMemory(self)


class _Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class MLPMemory(torch.nn.Module):
    """Hidden state [.., d] -> logits [.., vocab]."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        width = config.input_dim
        self.blocks = torch.nn.ModuleList(_Block(width, width * config.hidden_mult, config.activation)
                                          for _ in range(config.depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, config.vocab_size, bias=False)

    def use_decoder_head(self, weight: torch.Tensor) -> None:
        """Start from the decoder's LM head [vocab, d]; frozen unless ``lm_head`` is ``tied``."""
        if weight.shape != self.head.weight.shape:
            raise ValueError(f"decoder LM head {tuple(weight.shape)} does not fit the memory "
                             f"{tuple(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(weight)
        self.head.weight.requires_grad_(self.config.lm_head == "tied")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG), "w") as handle:
            json.dump({"model_type": "memforge-mlp-memory", **asdict(self.config)}, handle, indent=2, sort_keys=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, WEIGHTS))

    @classmethod
    def load(cls, directory: str) -> "MLPMemory":
        with open(os.path.join(directory, CONFIG)) as handle:
            config = json.load(handle)
        config.pop("model_type", None)
        memory = cls(MemoryConfig(**config))
        memory.load_state_dict(load_file(os.path.join(directory, WEIGHTS)))
        return memory.eval()
