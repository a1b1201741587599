"""The MLP memory: residual feed-forward blocks mapping a decoder hidden state to vocabulary logits.

Each block is LayerNorm -> up-projection (``hidden_mult`` x width) -> activation -> down-projection,
added to its input; a final LayerNorm and an LM head follow. The blocks' width is the input's (the
decoder's hidden size) unless ``width`` asks for more: a linear projection then widens the input first,
and the head maps the wider state to logits, so the output is no longer limited to rank d. The head is
the memory's own, or the decoder's LM head copied in, either frozen or trained further
(``lm_head: frozen | tied | own``).
A standard Hugging Face model: ``MemoryConfig`` / ``MLPMemory`` are a ``PretrainedConfig`` /
``PreTrainedModel`` pair registered with the Auto classes (model type ``memforge-mlp-memory``), saved with
``save_pretrained`` (``config.json`` + ``model.safetensors``); once this module is imported,
``AutoModel.from_pretrained(artifacts/memory/model)`` loads it.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

MODEL_TYPE = "memforge-mlp-memory"
_ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU}


class MemoryConfig(PretrainedConfig):
    """Shape of an MLP memory and what it reads (travels inside its directory): ``input_layer`` and
    ``representation`` of the decoder whose sha256 fingerprint is ``decoder``."""

    model_type = MODEL_TYPE

    def __init__(self, input_dim: int = 768, vocab_size: int = 50257, depth: int = 4, hidden_mult: int = 4,
                 activation: str = "gelu", lm_head: str = "frozen", width: int | None = None,
                 input_layer: int | None = None, representation: str | None = None, decoder: str | None = None,
                 **kwargs):
        self.input_dim, self.vocab_size, self.depth = input_dim, vocab_size, depth
        self.hidden_mult, self.activation, self.lm_head = hidden_mult, activation, lm_head
        self.width = width or input_dim
        # what it reads: the decoder (sha256 of its config and weights), the representation and its block
        self.input_layer, self.representation, self.decoder = input_layer, representation, decoder
        super().__init__(**kwargs)

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


class MLPMemory(PreTrainedModel):
    """Hidden state [.., d] -> logits [.., vocab]."""

    config_class = MemoryConfig
    base_model_prefix = "memory"

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        width = config.width
        self.project = torch.nn.Linear(config.input_dim, width) if width != config.input_dim else None
        self.blocks = torch.nn.ModuleList(_Block(width, width * config.hidden_mult, config.activation)
                                          for _ in range(config.depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """PyTorch's own initialisation of each layer, as built (seeded by ``memory.seed``)."""

    def use_decoder_head(self, weight: torch.Tensor) -> None:
        """Start from the decoder's LM head [vocab, d]; frozen unless ``lm_head`` is ``tied``."""
        if weight.shape != self.head.weight.shape:
            raise ValueError(f"decoder LM head {tuple(weight.shape)} does not fit the memory "
                             f"{tuple(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(weight)
        self.head.weight.requires_grad_(self.config.lm_head == "tied")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            hidden = self.project(hidden)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


AutoConfig.register(MODEL_TYPE, MemoryConfig, exist_ok=True)
AutoModel.register(MemoryConfig, MLPMemory, exist_ok=True)
