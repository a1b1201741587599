"""The dev/test split of the validation rows: deterministic, whole documents, near the asked share."""
from __future__ import annotations

import numpy as np
import pytest

from memforge.storage.errors import MemforgeError
from memforge.training.dev_test import split_by_document

pytestmark = pytest.mark.unit


def test_whole_documents_near_the_share_and_the_same_every_time():
    docs = np.repeat(np.arange(40), np.random.default_rng(0).integers(50, 400, 40))
    dev = split_by_document(docs, 0.5, seed=0)
    assert np.array_equal(dev, split_by_document(docs, 0.5, seed=0))
    assert not set(docs[dev]) & set(docs[~dev])
    assert abs(dev.mean() - 0.5) < 400 / len(docs)  # off by less than one document
    assert not np.array_equal(dev, split_by_document(docs, 0.5, seed=1))
    assert abs(split_by_document(docs, 0.25, seed=0).mean() - 0.25) < 400 / len(docs)


def test_both_sides_keep_a_document():
    docs = np.array([0] * 1000 + [1] * 10)
    for fraction in (0.01, 0.99):
        dev = split_by_document(docs, fraction, seed=0)
        assert 0 < dev.sum() < len(docs)


def test_one_document_is_refused():
    with pytest.raises(MemforgeError, match="evaluate.dev_fraction: the validation split holds 1 document"):
        split_by_document(np.zeros(50, np.int64), 0.5, seed=0)
