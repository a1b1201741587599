"""Perplexity of a causal LM over a token stream, and the unigram baseline it must beat."""
from __future__ import annotations

import math

import numpy as np
import torch

from memforge.training.token_stream import TokenStream


@torch.inference_mode()
def target_log_probs(model: torch.nn.Module, stream: TokenStream, block_size: int) -> np.ndarray:
    """log p(token_t | tokens_<t) under ``model`` (on its device) for every token of ``stream`` after the
    first, in order (blocks of ``block_size`` context tokens, each token predicted once)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for _, block in stream.blocks(block_size + 1):
        ids = torch.from_numpy(block)[None].to(device)
        out.append(log_probs_at(model(ids[:, :-1]).logits[0], ids[0, 1:]).cpu().numpy())
    return np.concatenate(out)


def log_probs_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] of each row of ``logits`` [rows, vocab] (float64): the target's
    logit minus the row's logsumexp, without materialising the normalised rows."""
    logits = logits.float()
    return (logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)).double()


def perplexity(log_probs: np.ndarray) -> float:
    """exp of the mean negative log-probability: inf when that overflows (a diverged model), NaN over no
    tokens or NaN log-probabilities (both recorded as null in manifests)."""
    if not len(log_probs):
        return math.nan
    try:
        return math.exp(-float(log_probs.mean()))
    except OverflowError:
        return math.inf


def unigram_log_probs(train: TokenStream, targets: TokenStream, vocab_size: int) -> np.ndarray:
    """log p(token) of every ``targets`` token after the first under add-one-smoothed train counts."""
    counts = train.counts(vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return log_p[targets.slice(1, targets.n_tokens)]
