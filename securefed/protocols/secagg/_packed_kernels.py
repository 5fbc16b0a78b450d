"""Compiled loops of :mod:`securefed.protocols.secagg.packed`, compiled once per width `w` (a literal).

Both walk a column block row by row: row j of the block's values (field j of every column)
comes from one or two rows of words with the same shifts for every column, so the inner
loop is a plain loop over columns that LLVM vectorizes (the shifts are loop-invariant).
"""

from __future__ import annotations

import numpy as np
from numba import literally, njit

# Scalar arithmetic through the ufuncs: they keep the words' own type (uint32), where numba's
# operators widen integers narrower than 64 bits, so LLVM would vectorize with 4 lanes, not 8.
_add, _and, _or, _shl, _shr = np.add, np.bitwise_and, np.bitwise_or, np.left_shift, np.right_shift


@njit(cache=True, nogil=True, boundscheck=False)
def pack_columns(v, w, c, mask, out):  # pragma: no cover - compiled
    """out (w*c words of F bits) <- the F*c values of v column-packed: value j*c + m is field j
    of column m, its low w bits at bits [j*w, (j+1)*w) of column m's words (word k of column m
    is out[k*c + m]). F is 32 for w <= 32, else 64; `mask` is 2^w - 1 in out's dtype."""
    W = literally(w)
    F = 32 if W <= 32 else 64
    word = out.dtype.type  # shifts in the words' own unsigned type (a signed amount would promote them)
    out[:] = 0
    for j in range(F):
        p = j * W
        k = p // F
        off = p % F
        x = v[j * c : (j + 1) * c]
        lo = out[k * c : (k + 1) * c]
        up = word(off)
        for m in range(c):
            lo[m] = _or(lo[m], _shl(_and(x[m], mask), up))
        if off + W > F:
            hi = out[(k + 1) * c : (k + 2) * c]
            down = word(F - off)
            for m in range(c):
                hi[m] = _or(hi[m], _shr(_and(x[m], mask), down))


@njit(cache=True, nogil=True, boundscheck=False)
def unpack_add_columns(words, w, c, blocks, last, acc):  # pragma: no cover - compiled
    """acc += the values of `blocks` consecutive column blocks of c columns, then of one block of
    `last` columns if `last` > 0 (see pack_columns): a message's blocks in one call. Only the low w
    bits of acc are the sum: a field is added with the bits above it in its word (carries only go
    up, so they change nothing below bit w; one mask fewer per value), and the caller reduces acc."""
    W = literally(w)
    F = 32 if W <= 32 else 64
    word = acc.dtype.type
    for b in range(blocks + (1 if last > 0 else 0)):
        cols = c if b < blocks else last
        src = words[b * W * c : b * W * c + W * cols]
        dst = acc[b * F * c : b * F * c + F * cols]
        for j in range(F):
            p = j * W
            k = p // F
            off = p % F
            a = dst[j * cols : (j + 1) * cols]
            lo = src[k * cols : (k + 1) * cols]
            down = word(off)
            if off + W > F:
                hi = src[(k + 1) * cols : (k + 2) * cols]
                up = word(F - off)
                for m in range(cols):
                    a[m] = _add(a[m], _or(_shr(lo[m], down), _shl(hi[m], up)))
            else:
                for m in range(cols):
                    a[m] = _add(a[m], _shr(lo[m], down))


@njit(cache=True, nogil=True, boundscheck=False)
def unpack_add_columns4(w0, w1, w2, w3, w, c, blocks, last, acc):  # pragma: no cover - compiled
    """unpack_add_columns of four messages of the same layout in one pass: acc is read and written
    once for the four (what the server saves is that traffic; the messages are read once anyway).
    `w` is a run-time argument here: as fast (the shifts are per row anyway), one compilation per
    word type instead of one per width."""
    W = w
    F = 32 if W <= 32 else 64
    word = acc.dtype.type
    for b in range(blocks + (1 if last > 0 else 0)):
        cols = c if b < blocks else last
        at = b * W * c
        s0 = w0[at : at + W * cols]
        s1 = w1[at : at + W * cols]
        s2 = w2[at : at + W * cols]
        s3 = w3[at : at + W * cols]
        dst = acc[b * F * c : b * F * c + F * cols]
        for j in range(F):
            p = j * W
            k = p // F
            off = p % F
            a = dst[j * cols : (j + 1) * cols]
            lo, hi = k * cols, (k + 1) * cols
            l0, l1, l2, l3 = s0[lo:hi], s1[lo:hi], s2[lo:hi], s3[lo:hi]
            down = word(off)
            if off + W > F:
                lo, hi = (k + 1) * cols, (k + 2) * cols
                h0, h1, h2, h3 = s0[lo:hi], s1[lo:hi], s2[lo:hi], s3[lo:hi]
                up = word(F - off)
                for m in range(cols):
                    a[m] = _add(a[m], _add(_add(_or(_shr(l0[m], down), _shl(h0[m], up)),
                                                _or(_shr(l1[m], down), _shl(h1[m], up))),
                                           _add(_or(_shr(l2[m], down), _shl(h2[m], up)),
                                                _or(_shr(l3[m], down), _shl(h3[m], up)))))
            else:
                for m in range(cols):
                    a[m] = _add(a[m], _add(_add(_shr(l0[m], down), _shr(l1[m], down)),
                                           _add(_shr(l2[m], down), _shr(l3[m], down))))
