"""Tiny local models and corpora for tests: nothing is downloaded; everything is saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from memforge.pipelines.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def write_corpus(directory: Path, n_docs: int, words_per_doc: int, seed: int, suffix: str = ".txt") -> list[Path]:
    """Plain-text documents of pseudo-random Greek-letter words (deterministic per seed)."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(n_docs):
        picks = torch.randint(len(WORDS), (words_per_doc,), generator=generator).tolist()
        lines = [" ".join(WORDS[i] for i in picks[j:j + 12]) for j in range(0, len(picks), 12)]
        path = directory / f"doc{d:03d}{suffix}"
        path.write_text(f"Document {d}.\n" + "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def make_gpt2(directory: Path, texts: list[str], vocab_size: int = 320, n_layer: int = 2, n_embd: int = 32,
              n_positions: int = 64, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with a random tiny GPT-2 in ``directory``."""
    train_tokenizer(texts, vocab_size, str(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=n_positions, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
