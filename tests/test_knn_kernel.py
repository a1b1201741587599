"""The targets kernel (pipelines/knn_rows.py, compiled) against plain float64 Python per row: ties, missing
neighbours, weights that underflow, more distinct tokens than the width, keep rules with a floor and a mass,
k 1024, and dropping ids; the fused kernel (drop, value lookup and distribution in one pass) against the three
steps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from memforge.pipelines.knn import KeepRule, distributions, drop_ids, search_distributions

pytestmark = pytest.mark.unit


def reference_row(dists, values, temperature, rule):
    """(stored {token: p}, truncated) of one row, computed the slow way."""
    valid = [(float(d), int(v)) for d, v in zip(dists, values) if v != -1]
    if not valid:
        return {}, 0.0
    nearest = min(d for d, _ in valid)
    nearest = nearest if math.isfinite(nearest) else 0.0
    mass: dict[int, float] = {}
    for d, v in valid:
        weight = float(np.exp(np.float32(np.float32(d) - np.float32(nearest)) / np.float32(-temperature)))
        mass[v] = mass.get(v, 0.0) + weight
    total = sum(mass.values())
    if total == 0:
        return {}, 0.0
    probs = {v: m / total for v, m in mass.items() if m > 0}
    ranked, kept_mass = [], 0.0
    for v in sorted(probs, key=lambda v: (-np.float32(probs[v]), v)):
        if len(ranked) == rule.width or kept_mass >= rule.mass:
            break
        if probs[v] >= rule.min_prob:
            ranked.append(v)
            kept_mass += probs[v]
    return {v: probs[v] for v in ranked}, max(0.0, 1.0 - sum(probs[v] for v in ranked))


@pytest.mark.parametrize("seed", range(6))
def test_distributions_equal_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = 64, [1, 7, 64, 300, 1024, 33][seed]
    width = int(rng.integers(1, k + 1))
    vocab = [3, 40, 5000, 2**30, 50, 7][seed]
    temperature = [1.0, 0.1, 10.0, 1.0, 0.01, 1.0][seed]
    rule = KeepRule.of(k, [width, None, width, None, k, width][seed], [None, 1e-3, None, 1e-8, 1e-4, 0.05][seed],
                       [None, None, 0.9, 0.5, None, 0.99][seed])
    dists = np.sort(rng.exponential(5.0, (n, k)), axis=1).astype(np.float32)
    if seed % 2:
        dists = np.round(dists, 1)  # equal distances: ties in probability
    values = (rng.zipf(1.3, (n, k)) % vocab).astype(np.int64)
    values[rng.random((n, k)) < 0.1] = -1
    values[0] = -1  # a row with no neighbour at all
    tokens, probs, truncated = distributions(dists, values, temperature, rule)
    assert tokens.shape == probs.shape == (n, rule.width) and tokens.dtype == np.int32 and probs.dtype == np.float32
    for row in range(n):
        expected, cut = reference_row(dists[row], values[row], temperature, rule)
        stored = {int(t): float(p) for t, p in zip(tokens[row], probs[row]) if t >= 0}
        assert list(tokens[row][len(stored):]) == [-1] * (rule.width - len(stored)), "padding comes last"
        assert stored.keys() == expected.keys(), row
        for token, p in expected.items():
            assert stored[token] == pytest.approx(p, rel=1e-6, abs=1e-12)
        assert float(truncated[row]) == pytest.approx(cut, abs=1e-6)
        ranked = [(-probs[row][j], tokens[row][j]) for j in range(len(stored))]
        assert ranked == sorted(ranked), "most probable first, then the lower token id"


def test_underflowing_weights_are_not_stored_and_mass_is_kept():
    dists = np.array([[0.0, 1.0, 500.0, 600.0]], dtype=np.float32)  # exp(-500) underflows in float32
    values = np.array([[4, 5, 6, 4]])
    tokens, probs, truncated = distributions(dists, values, 1.0, KeepRule(4))
    assert list(tokens[0]) == [4, 5, -1, -1] and probs[0, 2:].tolist() == [0.0, 0.0]
    assert probs[0, 0] == pytest.approx(1 / (1 + math.exp(-1))) and truncated[0] == pytest.approx(0.0, abs=1e-7)
    tokens, probs, truncated = distributions(dists, values, 1.0, KeepRule(1))
    assert list(tokens[0]) == [4] and float(probs[0, 0] + truncated[0]) == pytest.approx(1.0)


def test_drop_ids_keeps_order_and_pads():
    """Own ids (row i's is own_first + i), flagged and missing entries go; the rest keep their order."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 50, (40, 30))
    ids[::3, 0] = np.arange(20, 60)[::3]  # most rows of a real search find themselves first ...
    ids[1::7, 4] = np.arange(20, 60)[1::7]  # ... some further on, some (the rest) not at all
    dists = np.sort(rng.random((40, 30)), axis=1).astype(np.float32)
    drop = rng.random((40, 30)) < 0.2
    for k in (1, 10, 29, 30, 35):
        for own_first, flags in ((None, drop), (20, None), (20, drop), (None, None)):
            out_dists, out_ids = drop_ids(dists, ids, k, own_first, flags)
            assert out_ids.shape == (40, k) and out_ids.dtype == np.int64 and out_dists.dtype == np.float32
            for row in range(40):
                own = -1 if own_first is None else own_first + row
                dropped = np.zeros(30, bool) if flags is None else flags[row]
                kept = [(d, i) for d, i, x in zip(dists[row], ids[row], dropped) if not x and i not in (-1, own)][:k]
                kept += [(np.inf, -1)] * (k - len(kept))
                assert list(zip(out_dists[row], out_ids[row])) == kept


def test_fused_search_distributions_equal_drop_lookup_and_distribution(tmp_path):
    """Bit for bit, over random searches: own ids anywhere or absent, flagged and missing entries, k below or
    at the columns, widths above and below the distinct tokens, values from a memory-mapped (read-only) table."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "values.npy", rng.integers(0, 40, 6000).astype(np.int32))
    mapped = np.load(tmp_path / "values.npy", mmap_mode="r")
    for trial in range(24):
        columns = int(rng.integers(2, 1100))
        k, width = int(rng.integers(1, columns + 1)), int(rng.integers(1, 48))
        rule = KeepRule.of(k, width if trial % 3 else None, 1e-4 if trial % 5 == 0 else None,
                           0.9 if trial % 7 == 0 else None)
        ids = rng.integers(-1, 6000, (30, columns))
        found = rng.random(30) < 0.9  # most rows find themselves (at one column per trial), the rest not at all
        ids[found, int(rng.integers(0, columns))] = np.arange(500, 530)[found]
        dists = np.sort(rng.random((30, columns)), axis=1).astype(np.float32) * 40
        dists[ids == -1] = np.inf
        token_of = mapped if trial % 2 else np.asarray(mapped).copy()
        drop = rng.random((30, columns)) < 0.1 if trial % 3 == 0 else None
        own_first = None if trial % 4 == 0 else 500
        kept_dists, kept_ids = drop_ids(dists, ids, k, own_first, drop)
        values = np.where(kept_ids >= 0, np.asarray(mapped)[np.maximum(kept_ids, 0)], -1)
        expected = distributions(kept_dists, values, 8.0, rule)
        fused = search_distributions(dists, ids, token_of, k, 8.0, rule, own_first, drop)
        for want, got in zip(expected, fused):
            assert got.dtype == want.dtype and np.array_equal(got, want), trial


def test_equal_distances_are_ordered_by_id_whatever_the_search_order():
    """Re-ranked candidates with equal exact distances (duplicate keys) come out in id order, missing ones
    last, however the search listed them: the k kept and their order do not depend on the search's order.
    Ids too wide to pack (2**32 - 1 and up) sort the same way."""
    from memforge.pipelines.neighbour_lists import sort_by_distance

    dists = np.array([[2.0, 1.0, 1.0, np.inf, 1.0, 0.0]], dtype=np.float32)
    ids = np.array([[5, 9, 3, -1, 7, 4]])
    expected_dists = np.array([[0.0, 1.0, 1.0, 1.0, 2.0, np.inf]], dtype=np.float32)
    for order in ([0, 1, 2, 3, 4, 5], [3, 4, 2, 1, 0, 5], [5, 4, 3, 2, 1, 0]):
        for base in (0, 2 ** 32):
            shifted = np.where(ids[:, order] >= 0, ids[:, order] + base, -1)
            got_dists, got_ids = sort_by_distance(dists[:, order], shifted)
            np.testing.assert_array_equal(got_dists, expected_dists)
            np.testing.assert_array_equal(got_ids, np.array([[4, 3, 7, 9, 5, -1]]) + np.array([[base] * 5 + [0]]))
