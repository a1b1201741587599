"""The tokenizer: loaded from a local HF directory, or trained (byte-level BPE) on the train split."""
from __future__ import annotations

import os
from typing import Iterable

from memforge.storage.errors import MemforgeError

END_OF_TEXT = "<|endoftext|>"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)``; a path that holds no tokenizer is a clear error."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise MemforgeError(f"{path}: tokenizer directory does not exist" if not os.path.exists(path)
                            else f"{path}: is a file, expected a Hugging Face tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MemforgeError(f"{path}: cannot load a tokenizer: {exc}") from None
    tokenizer.model_max_length = 2**62  # documents are packed into windows later; silence length warnings
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )
    tokenizer.save_pretrained(out_dir)


def check_same_tokenizer(model_path: str, store_tokenizer, what: str, trust_remote_code: bool = False,
                         named: str | None = None) -> None:
    """Refuse a model whose tokenizer is not the token store's (same vocabulary: every token, every id); the
    error names the model as ``named`` (how the params name it, e.g. a URL), else by ``model_path``."""
    if load_tokenizer(model_path, trust_remote_code).get_vocab() != store_tokenizer.get_vocab():
        raise MemforgeError(f"{what}: {named or model_path}: its tokenizer differs from the token store's; "
                            "run prepare with this model's tokenizer (decoder.init or encode.model)")
