"""The loops of :mod:`securefed.encoding._kernels` in numpy: the same bits, no compiler to load.

Same names, signatures and results (``tests/encoding/test_kernels.py`` compares them); used
where loading numba would cost more than it saves (:mod:`securefed.kernels`). Each function
works in pieces of :data:`PIECE` values, so its temporaries stay small.
"""

from __future__ import annotations

import numpy as np

#: Values per piece: a multiple of 64, so a piece of w-bit fields starts on a 64-bit word.
PIECE = 1 << 15
_TWO32 = 4294967296.0


def first_outside(x: np.ndarray, bound: float) -> int:
    """Index of the first x[i] that is NaN or outside [-bound, bound], else -1."""
    for lo in range(0, x.size, PIECE):
        xd = x[lo : lo + PIECE].astype(np.float64)
        bad = ~((xd >= -bound) & (xd <= bound))
        if bad.any():
            return lo + int(np.argmax(bad))
    return -1


def quantize_into(x: np.ndarray, scale: float, bound: float, u32: np.ndarray, mask: np.uint64,
                  out: np.ndarray) -> int:
    """out[i] = floor(x[i]*scale + U_i) mod 2^k, U_i = u32[i] / 2^32 (the compiled loop's float64 steps).

    Returns the index of the first x[i] that is NaN or outside [-bound, bound], else -1 (`out` is
    then unspecified).
    """
    for lo in range(0, x.size, PIECE):
        v = x[lo : lo + PIECE].astype(np.float64)
        bad = ~((v >= -bound) & (v <= bound))
        if bad.any():
            return lo + int(np.argmax(bad))
        np.multiply(v, scale, out=v)
        f = np.floor(v)
        np.subtract(v, f, out=v)
        np.multiply(v, _TWO32, out=v)  # exact, as in the compiled loop
        q = f.astype(np.int64)
        q += v > u32[lo : lo + PIECE]  # (uint32 to float64 is exact)
        np.bitwise_and(q.view(np.uint64), mask, out=q.view(np.uint64))
        out[lo : lo + PIECE] = q.view(np.uint64)
    return -1


def decode_into(s: np.ndarray, k: int, inv_scale: float, out: np.ndarray) -> None:
    """out[i] = centered(s[i] mod 2^k) * inv_scale, centered into [-2^(k-1), 2^(k-1))."""
    up = np.uint64(64 - k)  # bit k-1 to the top, then an arithmetic shift back centres it
    for lo in range(0, s.size, PIECE):
        t = s[lo : lo + PIECE].astype(np.uint64) << up
        np.multiply(t.view(np.int64) >> up.astype(np.int64), inv_scale, out=out[lo : lo + PIECE])


def pack_words(v: np.ndarray, w: int, out: np.ndarray) -> int:
    """Write v (each < 2^w) as a little-endian stream of w-bit fields into uint64 words.

    Returns the index of the first value that does not fit in w bits, else -1.
    """
    out[:] = 0
    per = PIECE * w // 64  # words of a whole piece
    for lo in range(0, v.size, PIECE):
        x = v[lo : lo + PIECE].astype(np.uint64)
        if w < 64:
            big = (x >> np.uint64(w)) != 0
            if big.any():
                return lo + int(np.argmax(big))
        pos = np.arange(x.size, dtype=np.uint64) * np.uint64(w)
        idx = (pos >> np.uint64(6)).astype(np.intp)
        off = pos & np.uint64(63)
        # Fields start at most 64 bits apart, so every word of the piece has one starting in it:
        # a word's low parts are an or over a run of consecutive fields.
        starts = np.flatnonzero(np.diff(idx, prepend=-1))
        base = (lo // PIECE) * per
        out[base + idx[starts]] = np.bitwise_or.reduceat(x << off, starts)
        spill = off + np.uint64(w) > np.uint64(64)  # (so off > 0); at most one field spills into a word
        if spill.any():
            out[base + idx[spill] + 1] |= x[spill] >> (np.uint64(64) - off[spill])
    return -1


def unpack_words(words: np.ndarray, w: int, n: int, out: np.ndarray) -> None:
    """Inverse of pack_words: read n fields of w bits into out."""
    mask = np.uint64((1 << w) - 1)
    per = PIECE * w // 64
    for lo in range(0, n, PIECE):
        m = min(PIECE, n - lo)
        pos = np.arange(m, dtype=np.uint64) * np.uint64(w)
        idx = (pos >> np.uint64(6)).astype(np.intp) + (lo // PIECE) * per
        off = pos & np.uint64(63)
        x = words[idx] >> off
        spill = off + np.uint64(w) > np.uint64(64)
        if spill.any():
            x[spill] |= words[idx[spill] + 1] << (np.uint64(64) - off[spill])
        out[lo : lo + m] = x & mask
