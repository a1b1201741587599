"""kNN-LM inside ``generate()``: a ``transformers.LogitsProcessor`` that searches the datastore at every step.

At each step the decoder's query representation at the last position (the keys' representation and layer,
kept by a forward hook during the decoder's own forward, so nothing runs twice) is searched for its k
neighbours; their distances are exact when the datastore has exact keys (the index's candidates re-ranked,
as ``evaluate`` does), else the index's own. p_kNN = softmax(−d/T) over the neighbours found, summed per
next token, and the step's scores become log(λ·p_kNN + (1−λ)·p_dec): the kNN-LM mixture ``evaluate``
scores. The search runs on FAISS's CPU, one search per step for the whole batch; ``nprobe`` is the
searcher's. Tokens an earlier processor ruled out (score −inf: ``min_new_tokens``, bad words) stay out.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor

from memforge.pipelines.datastore_rows import DatastoreRows
from memforge.training.memory_lm import mix_log_probs
from memforge.training.representation import RepresentationCapture


def knn_distribution(dists: np.ndarray, values: np.ndarray, temperature: float, vocab_size: int) -> torch.Tensor:
    """p_kNN [queries, vocab_size] (float64): softmax(−dists / T) over the neighbours found (value ≥ 0), summed
    per value."""
    found = values >= 0
    logits = np.where(found, -dists.astype(np.float64), -np.inf) / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    p_knn = torch.zeros(len(values), vocab_size, dtype=torch.float64)
    return p_knn.scatter_add_(1, torch.from_numpy(np.maximum(values, 0)), torch.from_numpy(weights))


class KNNLMLogitsProcessor(LogitsProcessor):
    """Scores → log(λ·p_kNN + (1−λ)·softmax(scores)), p_kNN from the ``k`` neighbours ``searcher.search`` finds
    for the query ``query_at`` = (representation, layer) of ``decoder``; ``rows`` maps them to next tokens (and
    exact distances). Registers its hook on ``decoder`` when made; use it as a context manager (or call
    ``remove``) so the hook goes when generation ends."""

    def __init__(self, decoder: torch.nn.Module, searcher, rows: DatastoreRows, query_at: tuple[str, int], k: int,
                 lam: float, temperature: float):
        self.searcher, self.rows, self.k, self.lam, self.temperature = searcher, rows, k, lam, temperature
        self.exact = rows.keys is not None
        self.capture = RepresentationCapture(decoder, *query_at, stop=False)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        query = np.ascontiguousarray(self.capture.value[:, -1].float().cpu().numpy())
        dists, _, values = self.rows.neighbours(query, *self.searcher.search(query, self.k), self.exact,
                                                ordered=False)
        log_p_knn = knn_distribution(dists, values, self.temperature, scores.shape[-1]).log().to(scores.device)
        return mix_log_probs(scores, log_p_knn, self.lam, 1.0).masked_fill(scores == -torch.inf, -torch.inf)

    def remove(self) -> None:
        """Remove the hook from the decoder."""
        self.capture.handle.remove()

    def __enter__(self) -> KNNLMLogitsProcessor:
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()
