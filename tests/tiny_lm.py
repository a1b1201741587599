"""Tiny local models and corpora for tests: nothing is downloaded; everything is saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memforge.pipelines.tokenizer import train_tokenizer

# Llama- and Qwen2-style: RMSNorm, rotary positions, a gated SiLU FFN and grouped KV heads; Qwen2 adds q/k/v
# biases, and its tiny model here ties the LM head to the input embeddings (as small Qwen2 models do), Llama's not.
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True})}

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


def write_wikitext(path: Path, n_articles: int, words_per_article: int, seed: int) -> Path:
    """One file in WikiText-103's layout (`` = Heading = `` lines, paragraphs, blank lines between) of
    pseudo-random Greek-letter articles (deterministic per seed)."""
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [""]
    for a in range(n_articles):
        picks = torch.randint(len(WORDS), (words_per_article,), generator=generator).tolist()
        lines += [f" = {WORDS[a % len(WORDS)].title()} {a} = ", ""]
        lines += [" " + " ".join(WORDS[i] for i in picks[j:j + 40]) + " . " for j in range(0, len(picks), 40)]
        lines.append("")
    path.write_text(" \n".join(lines) + "\n")
    return path


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


def make_family_lm(family: str, directory: Path, texts: list[str], vocab_size: int = 320, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with a random tiny model of ``family`` (a key of
    ``FAMILIES``: hidden 32, 2 blocks, 2 query heads sharing 1 KV head, FFN 64, 64 positions) in ``directory``.
    Weights are drawn with std 0.2 (not 0.02), so attention is far from uniform and a misplaced capture shows."""
    config_class, model_class, extra = FAMILIES[family]
    train_tokenizer(texts, vocab_size, str(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, max_position_embeddings=64, vocab_size=len(tokenizer),
                          initializer_range=0.2, bos_token_id=tokenizer.eos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **extra)
    model_class(config).save_pretrained(directory)
    return directory
