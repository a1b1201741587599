"""index.factory auto: exact Flat for small datastores, else IVF-PQ sized by N and d (DESIGN §3)."""
from __future__ import annotations

import math

import pytest

from pipelines.faiss_index import build_empty, ivf_of, resolve_factory
from storage.params import IndexParams


@pytest.mark.parametrize("n_rows, dim", [(250_000, 128), (10_000_000, 1024), (100_000_000, 4096)])
def test_auto_factory_follows_the_rules_of_thumb(n_rows, dim):
    factory = resolve_factory(IndexParams(), n_rows, dim)
    index = build_empty(factory, dim)
    nlist = ivf_of(index).nlist
    assert 4 * math.sqrt(n_rows) <= nlist <= 16 * math.sqrt(n_rows) and nlist & (nlist - 1) == 0
    assert factory.startswith("OPQ") == (dim > 1024)
    assert index.d == dim and not index.is_trained


def test_auto_factory_is_exact_below_the_threshold():
    assert resolve_factory(IndexParams(flat_threshold=1000), 999, 64) == "Flat"
    assert resolve_factory(IndexParams(factory="IVF16,PQ8"), 10, 64) == "IVF16,PQ8"
