"""The dev/test protocol: with a test split, all of validation against all of test; without one, the validation
rows divided by document (deterministic, whole documents, near the asked share), or into two spans of one stream."""
from __future__ import annotations

import numpy as np
import pytest

from memforge.training.dev_test import sides_with_test_split, split_by_document, validation_sides

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


def test_one_stream_is_cut_into_two_spans_and_says_so(caplog):
    docs = np.zeros(50, np.int64)
    sides = validation_sides(docs, 0.3, seed=0)
    assert sides.protocol == "validation by span"
    assert sides.is_dev[:15].all() and not sides.is_dev[15:].any()  # dev: the first 30 %, contiguous
    assert "one token stream" in caplog.text and "corpus.test" in caplog.text
    assert sides.describe(docs) == {"name": "validation by span", "dev": {"split": "validation", "rows": 15,
                                                                         "documents": 1},
                                    "test": {"split": "validation", "rows": 35, "documents": 1}}
    assert validation_sides(np.zeros(2, np.int64), 0.01, seed=0).is_dev.tolist() == [True, False]  # both keep a row


def test_documents_decide_when_there_are_two():
    docs = np.array([0] * 30 + [1] * 20)
    sides = validation_sides(docs, 0.5, seed=0)
    assert sides.protocol == "validation by document"
    assert sides.describe(docs)["dev"]["documents"] == sides.describe(docs)["test"]["documents"] == 1


def test_a_test_split_is_all_of_test_against_all_of_validation():
    sides = sides_with_test_split(40, 25)
    assert sides.is_dev.sum() == 40 and sides.is_dev[:40].all()
    assert sides.describe() == {"name": "test split", "dev": {"split": "validation", "rows": 40},
                                "test": {"split": "test", "rows": 25}}
