"""Compiled loops of :mod:`securefed.protocols._packed` (unpack_add is compiled once per width `w`)."""

from __future__ import annotations

import numpy as np
from numba import literally, njit

_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True, boundscheck=False)
def pack_low_bits(v, w, out):  # pragma: no cover - compiled
    """out (uint64 words) <- the low w bits of each v[i], as a little-endian bit stream."""
    W = w
    mask = _ONES if W == 64 else (np.uint64(1) << np.uint64(W)) - np.uint64(1)
    acc = np.uint64(0)
    nb = 0
    j = 0
    for i in range(v.size):
        x = np.uint64(v[i]) & mask
        acc |= x << np.uint64(nb)
        nb += W
        if nb >= 64:
            out[j] = acc
            j += 1
            nb -= 64
            acc = (x >> np.uint64(W - nb)) if nb > 0 else np.uint64(0)
    if nb > 0:
        out[j] = acc


@njit(cache=True, nogil=True, boundscheck=False)
def unpack_add(words, w, n, acc):  # pragma: no cover - compiled
    """acc[i] += field i of w bits of `words` (which carries one zero word of padding)."""
    W = literally(w)
    mask = _ONES if W == 64 else (np.uint64(1) << np.uint64(W)) - np.uint64(1)
    one = np.uint64(1)
    for i in range(n):
        p = i * W
        j = p >> 6
        off = np.uint64(p & 63)
        # (hi << 1) << (63 - off) is hi << (64 - off) without the undefined shift by 64
        x = (words[j] >> off) | ((words[j + 1] << one) << (np.uint64(63) - off))
        acc[i] += x & mask


@njit(cache=True, nogil=True, boundscheck=False)
def unpack_add_bytes(b8, w, n, acc):  # pragma: no cover - compiled
    """acc[i] += field i of w <= 56 bits of the byte stream `b8`, which has 8 readable bytes from
    each field's first byte. Reading the 8 bytes around a field is one unaligned load once the
    width is a compile-time constant (LLVM combines them), and the loop vectorizes."""
    W = literally(w)
    mask = (np.uint64(1) << np.uint64(W)) - np.uint64(1)
    for i in range(n):
        p = i * W
        q = p >> 3
        x = (np.uint64(b8[q]) | (np.uint64(b8[q + 1]) << np.uint64(8)) | (np.uint64(b8[q + 2]) << np.uint64(16))
             | (np.uint64(b8[q + 3]) << np.uint64(24)) | (np.uint64(b8[q + 4]) << np.uint64(32))
             | (np.uint64(b8[q + 5]) << np.uint64(40)) | (np.uint64(b8[q + 6]) << np.uint64(48))
             | (np.uint64(b8[q + 7]) << np.uint64(56)))
        acc[i] += (x >> np.uint64(p & 7)) & mask


@njit(cache=True, nogil=True, boundscheck=False)
def _unpack_add_tail(b8, W, lo, hi, acc):  # pragma: no cover - compiled
    """acc[i] += field i for i in [lo, hi), reading only the bytes `b8` has (the last fields)."""
    mask = (np.uint64(1) << np.uint64(W)) - np.uint64(1)
    for i in range(lo, hi):
        p = i * W
        q = p >> 3
        x = np.uint64(0)
        for k in range(min(8, b8.size - q)):
            x |= np.uint64(b8[q + k]) << np.uint64(8 * k)
        acc[i] += (x >> np.uint64(p & 7)) & mask


@njit(cache=True, nogil=True, boundscheck=False)
def unpack_add_range(b8, w, lo, hi, acc):  # pragma: no cover - compiled
    """acc[i] += field i of w <= 56 bits of the packed message `b8`, for i in [lo, hi); lo is a
    multiple of 8 (so field lo starts on a byte). One call per message and slab: the fields whose
    8-byte window lies inside `b8` go through :func:`unpack_add_bytes`, the last few byte by byte."""
    W = literally(w)
    safe = ((b8.size - 8) * 8) // W + 1 if b8.size >= 8 else 0
    mid = min(max(lo, safe - safe % 8), hi)
    unpack_add_bytes(b8[lo * W // 8 :], W, mid - lo, acc[lo:mid])
    _unpack_add_tail(b8, W, mid, hi, acc)
