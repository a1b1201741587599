"""Which scored rows choose the interpolation weights (dev) and which report (test).

Interpolation weights and the kNN-LM temperature are chosen on dev and reported on test, so that no
figure is scored on the tokens it was tuned on. With a test split (``corpus.test``) dev is the whole
validation split and test the whole test split, the papers' protocol. Without one the validation split
is divided: by document when it holds at least two (documents, in an order drawn from the seed, fill
dev until it holds ``dev_fraction`` of the rows; the rest is test), else into two contiguous spans of
its one token stream (dev the first ``dev_fraction`` of the rows).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

log = logging.getLogger("memforge")


class Sides(NamedTuple):
    """The dev/test protocol: its name (``test split``, ``validation by document``, ``validation by span``),
    the token split each side is scored on, and the dev mask over the scored rows (dev rows first in the test
    split protocol)."""
    protocol: str
    dev_split: str
    test_split: str
    is_dev: np.ndarray

    def describe(self, docs: np.ndarray | None = None) -> dict:
        """The protocol as metrics.json records it: name, and per side its split and rows (and documents)."""
        sides = {}
        for side, split, mask in (("dev", self.dev_split, self.is_dev), ("test", self.test_split, ~self.is_dev)):
            sides[side] = {"split": split, "rows": int(mask.sum())}
            if docs is not None:
                sides[side]["documents"] = int(len(np.unique(docs[mask])))
        return {"name": self.protocol, **sides}


def sides_with_test_split(dev_rows: int, test_rows: int) -> Sides:
    """The papers' protocol: choose on every validation row, report on every test row."""
    return Sides("test split", "validation", "test", np.arange(dev_rows + test_rows) < dev_rows)


def validation_sides(docs: np.ndarray, dev_fraction: float, seed: int) -> Sides:
    """The fallback without a test split: the validation rows (``docs``: each row's document id) divided by
    document, or into two contiguous spans when they hold a single document (logged)."""
    if len(np.unique(docs)) >= 2:
        return Sides("validation by document", "validation", "validation",
                     split_by_document(docs, dev_fraction, seed))
    cut = min(max(int(round(dev_fraction * len(docs))), 1), len(docs) - 1)
    log.warning("evaluate: the validation split is one token stream (one document), so dev is its first %s rows "
                "and test the %s after them; set corpus.test (the papers' protocol) or corpus.document_separator",
                f"{cut:,}", f"{len(docs) - cut:,}")
    return Sides("validation by span", "validation", "validation", np.arange(len(docs)) < cut)


def split_by_document(docs: np.ndarray, dev_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over rows (True: dev) given each row's document id (at least two documents); both sides
    hold at least one document."""
    documents, sizes = np.unique(docs, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(documents))
    filled = np.cumsum(sizes[order])
    wanted = dev_fraction * len(docs)
    count = int(np.searchsorted(filled, wanted)) + 1  # the document that reaches the target share joins dev
    if count > 1 and wanted - filled[count - 2] < filled[count - 1] - wanted:
        count -= 1  # ... unless stopping before it lands nearer the target
    count = min(max(count, 1), len(documents) - 1)
    return np.isin(docs, documents[order[:count]])
