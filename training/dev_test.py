"""The deterministic dev/test split of the validation rows, by document.

Interpolation weights and the kNN-LM temperature are chosen on dev and reported on test, so that no
figure is scored on the tokens it was tuned on. Whole documents go to one side: documents, in an
order drawn from the seed, fill dev until it holds ``dev_fraction`` of the rows; the rest is test.
"""
from __future__ import annotations

import numpy as np

from memforge.storage.errors import MemforgeError


def split_by_document(docs: np.ndarray, dev_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over rows (True: dev) given each row's document id; both sides hold at least one
    document."""
    documents, sizes = np.unique(docs, return_counts=True)
    if len(documents) < 2:
        raise MemforgeError(f"evaluate.dev_fraction: the validation split holds {len(documents)} document(s); "
                            "choosing on dev and reporting on test needs at least 2 (add validation documents)")
    order = np.random.default_rng(seed).permutation(len(documents))
    filled = np.cumsum(sizes[order])
    wanted = dev_fraction * len(docs)
    count = int(np.searchsorted(filled, wanted)) + 1  # the document that reaches the target share joins dev
    if count > 1 and wanted - filled[count - 2] < filled[count - 1] - wanted:
        count -= 1  # ... unless stopping before it lands nearer the target
    count = min(max(count, 1), len(documents) - 1)
    return np.isin(docs, documents[order[:count]])
