"""Compiled field arithmetic of :mod:`securefed.crypto.shamir`: interpolation at zero and reconstruction.

All values are below the prime p < 2^32, so a product of two fits in uint64 and is reduced at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, INVALID_SHARE, INVALID_SECRET = range(3)


@njit(cache=True, nogil=True, boundscheck=False)
def lagrange_at_zero(x, p):  # pragma: no cover - compiled
    """Coefficients l_i with f(0) = sum l_i f(x_i) mod p, for distinct non-zero `x` (uint64, below p).

    l_i = P / (x_i prod_{j != i} (x_j - x_i)), P the product of all x_j; the t denominators are
    inverted together with one exponentiation (Montgomery's trick)."""
    t = x.size
    total = np.uint64(1)
    for i in range(t):
        total = total * x[i] % p
    den = np.empty(t, dtype=np.uint64)
    for i in range(t):
        d = x[i]
        for j in range(t):
            if j != i:
                d = d * ((x[j] + p - x[i]) % p) % p
        den[i] = d
    prefix = np.empty(t + 1, dtype=np.uint64)
    prefix[0] = 1
    for i in range(t):
        prefix[i + 1] = prefix[i] * den[i] % p
    inv, base, e = np.uint64(1), prefix[t], p - np.uint64(2)
    while e:
        if e & np.uint64(1):
            inv = inv * base % p
        base = base * base % p
        e >>= np.uint64(1)
    lam = np.empty(t, dtype=np.uint64)
    for i in range(t - 1, -1, -1):
        lam[i] = total * (inv * prefix[i] % p) % p
        inv = inv * den[i] % p
    return lam


@njit(cache=True, nogil=True, boundscheck=False)
def combine(lam, ys, p):  # pragma: no cover - compiled
    """sum_i lam_i ys[i] mod p for ys of shape (t, S, C), values below p: shape (S, C), uint64."""
    t, s_count, c_count = ys.shape
    out = np.zeros((s_count, c_count), dtype=np.uint64)
    for i in range(t):
        for s in range(s_count):
            for c in range(c_count):
                out[s, c] = (out[s, c] + lam[i] * np.uint64(ys[i, s, c])) % p
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def reconstruct(x, ys, p, chunk_bits, out):  # pragma: no cover - compiled
    """Status of reconstructing into `out` (uint8, (S, L)) the secrets whose shares by holders at `x`
    (uint64) are ys (uint32, (t, S, C)): INVALID_SHARE if a share is not below p, INVALID_SECRET if
    a chunk has more than `chunk_bits` bits or a secret has non-zero bits above its 8L."""
    for v in ys.ravel():
        if np.uint64(v) >= p:
            return INVALID_SHARE
    values = combine(lagrange_at_zero(x, p), ys, p)
    limit = np.uint64(1) << np.uint64(chunk_bits)
    length = out.shape[1]
    for s in range(values.shape[0]):
        bits, held, b = np.uint64(0), 0, 0  # a little-endian bit stream: `held` bits waiting in `bits`
        for c in range(values.shape[1]):
            v = values[s, c]
            if v >= limit:
                return INVALID_SECRET
            bits |= v << np.uint64(held)
            held += chunk_bits
            while held >= 8 and b < length:
                out[s, b] = bits & np.uint64(255)
                bits >>= np.uint64(8)
                held -= 8
                b += 1
            if b == length and bits:
                return INVALID_SECRET
    return OK
