"""The tokenizer: loaded from a local HF directory, or trained (byte-level BPE) on the train split."""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

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


class TokenIds:
    """Token ids of texts as ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives them, and the
    end-of-text id. ``load`` reads a directory's ``tokenizer.json`` with the ``tokenizers`` library alone, so a
    Beam worker that only tokenizes does not import transformers and torch (hundreds of MB per process)."""

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], eos_token_id: int | None):
        self.encode, self.eos_token_id = encode, eos_token_id

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.encode(texts)

    @classmethod
    def of(cls, tokenizer) -> "TokenIds":
        """The ids a Hugging Face tokenizer gives."""
        return cls(lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)

    @classmethod
    def load(cls, path: str, trust_remote_code: bool = False) -> "TokenIds":
        """The tokenizer in directory ``path``: its ``tokenizer.json`` when it has one, else ``load_tokenizer``."""
        file, config = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        if not (os.path.isfile(file) and os.path.isfile(config)):
            return cls.of(load_tokenizer(path, trust_remote_code))
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(file)
        backend.no_truncation()
        backend.no_padding()
        with open(config, encoding="utf-8") as handle:
            eos = json.load(handle).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        return cls(lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)],
                   None if eos is None else backend.token_to_id(eos))


def check_same_tokenizer(model_path: str, store_tokenizer, what: str, trust_remote_code: bool = False,
                         named: str | None = None) -> None:
    """Refuse a model whose tokenizer is not the token store's (same vocabulary: every token, every id); the
    error names the model as ``named`` (how the params name it, e.g. a URL), else by ``model_path``."""
    if load_tokenizer(model_path, trust_remote_code).get_vocab() != store_tokenizer.get_vocab():
        raise MemforgeError(f"{what}: {named or model_path}: its tokenizer differs from the token store's; "
                            "run prepare with this model's tokenizer (decoder.init or encode.model)")
