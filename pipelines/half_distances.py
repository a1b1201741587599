"""Exact squared L2 distances to keys stored as 16-bit floats, compiled by Numba (``nogil``).

Re-ranking reads a query's k neighbours' keys from the index's memory-mapped ``keys.npy``, which keeps
the key store's dtype (float16: half the bytes of a float32 copy, so half the page cache and disk).
Numba has no float16 on the CPU and numpy's float16 -> float32 cast is a scalar loop (~2.6 ns a value,
slower than the distances themselves), so each neighbour's key is widened here with integer operations
that the compiler vectorises, exactly: every finite float16 and bfloat16 value is a float32 value.
Non-finite keys never reach a store (``KeyStore.write_shard`` refuses them).
"""
from __future__ import annotations

import math

import numba
import numpy as np

_REBIAS = np.uint32((127 - 15) << 23)  # float16 exponent bias 15 -> float32's 127
_SMALLEST_NORMAL = np.float32(2.0 ** -14)  # of float16


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def l2_by_idx(queries, bits, ids, bfloat16, out):
    """``out[i, j]`` = squared L2 distance between ``queries[i]`` (float32) and the key in row ``ids[i, j]``
    of ``bits`` (uint16 patterns of float16, or of bfloat16 when ``bfloat16``); entries with id < 0 are
    left as they are."""
    dim = queries.shape[1]
    widened = np.empty(dim, np.float32)
    as_bits = widened.view(np.uint32)
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            row = ids[i, j]
            if row < 0:
                continue
            key = bits[row]
            if bfloat16:
                for c in range(dim):
                    as_bits[c] = np.uint32(key[c]) << 16
            else:  # exponent rebiased, mantissa shifted, sign moved: exact for every normal float16
                for c in range(dim):
                    half = np.uint32(key[c])
                    as_bits[c] = (((half & np.uint32(0x7FFF)) << 13) + _REBIAS) | ((half & np.uint32(0x8000)) << 16)
            total = np.float32(0.0)
            for c in range(dim):
                value = widened[c]
                if not bfloat16 and abs(value) < _SMALLEST_NORMAL:
                    # a zero or subnormal float16 (mantissa m) read as a normal is ±(2^-15 + m 2^-25); it is ±m 2^-24
                    value = np.float32(2.0) * value - math.copysign(_SMALLEST_NORMAL, value)
                diff = queries[i, c] - value
                total += diff * diff
            out[i, j] = total
