"""Compiled inner loops of the encoding (numba, cached on disk, GIL released).

numpy needs one pass over memory per elementwise operation; stochastic rounding
and bit packing at arbitrary widths need five to ten, which puts them far from
memory speed. These loops do each job in one pass. They trust their inputs: the
public functions in this package check shapes, dtypes and widths first.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_U64_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_TWO32 = 4294967296.0


@njit(cache=True, nogil=True)
def first_outside(x, bound):  # pragma: no cover - compiled
    """Index of the first x[i] that is NaN or outside [-bound, bound], else -1."""
    for i in range(x.size):
        xi = np.float64(x[i])
        if not (xi >= -bound and xi <= bound):
            return i
    return -1


@njit(cache=True, nogil=True)
def quantize_into(x, scale, bound, u32, mask, out):  # pragma: no cover - compiled
    """out[i] = floor(x[i]*scale + U_i) mod 2^k, U_i = u32[i] / 2^32.

    Returns the index of the first x[i] that is NaN or outside [-bound, bound], else -1
    (`out` is then unspecified). The loop has no early exit, so that it vectorizes: a bad
    coordinate is noted, encoded as 0, and looked for again only when there is one.
    """
    ok = True
    for i in range(x.size):
        xi = np.float64(x[i])
        inside = (xi >= -bound) & (xi <= bound)
        ok &= inside
        v = (xi if inside else 0.0) * scale
        f = math.floor(v)
        # (v - f) is exact; scaling by 2^32 is exact; so P(round up) = ceil(frac*2^32)/2^32.
        q = np.int64(f) + np.int64((v - f) * _TWO32 > np.float64(u32[i]))
        out[i] = np.uint64(q) & mask
    return -1 if ok else first_outside(x, bound)


@njit(cache=True, nogil=True)
def decode_into(s, k, inv_scale, out):  # pragma: no cover - compiled
    """out[i] = centered(s[i] mod 2^k) * inv_scale, centered into [-2^(k-1), 2^(k-1))."""
    if k == 64:
        for i in range(s.size):
            out[i] = np.float64(np.int64(np.uint64(s[i]))) * inv_scale
        return
    if k <= 32:  # in int32 (a shift up and an arithmetic shift down centre it): AVX2 converts int32 to double
        sh, ish = np.uint32(32 - k), np.int32(32 - k)
        for i in range(s.size):  # (shifts as ufuncs: numba's operators would widen them to int64)
            out[i] = np.float64(np.right_shift(np.int32(np.left_shift(np.uint32(s[i]), sh)), ish)) * inv_scale
        return
    mod = np.int64(1) << np.int64(k)
    half = np.int64(1) << np.int64(k - 1)
    m = np.uint64(mod - 1)
    for i in range(s.size):
        t = np.int64(np.uint64(s[i]) & m)
        if t >= half:
            t -= mod
        out[i] = np.float64(t) * inv_scale


@njit(cache=True, nogil=True)
def pack_words(v, w, out):  # pragma: no cover - compiled
    """Write v (each < 2^w) as a little-endian stream of w-bit fields into uint64 words.

    Returns the index of the first value that does not fit in w bits, else -1.
    """
    acc = np.uint64(0)
    nb = 0
    j = 0
    for i in range(v.size):
        x = np.uint64(v[i])
        if w < 64 and (x >> np.uint64(w)) != 0:
            return i
        acc |= x << np.uint64(nb)
        nb += w
        if nb >= 64:
            out[j] = acc
            j += 1
            nb -= 64
            acc = (x >> np.uint64(w - nb)) if nb > 0 else np.uint64(0)
    if nb > 0:
        out[j] = acc
    return -1


@njit(cache=True, nogil=True)
def unpack_words(words, w, n, out):  # pragma: no cover - compiled
    """Inverse of pack_words: read n fields of w bits into out."""
    mask = _U64_ONES if w == 64 else (np.uint64(1) << np.uint64(w)) - np.uint64(1)
    j = 0
    nb = 0
    for i in range(n):
        x = words[j] >> np.uint64(nb)
        if nb > 0 and nb + w > 64:
            x |= words[j + 1] << np.uint64(64 - nb)
        out[i] = x & mask
        nb += w
        if nb >= 64:
            nb -= 64
            j += 1
