"""Compiled check of :mod:`securefed.protocols._secagg_wire` (the server's per-reply parsing)."""

from __future__ import annotations

import numpy as np
from numba import njit

OK, WRONG_LENGTH, WRONG_IDS, INVALID_SHARE = range(4)


@njit(cache=True, nogil=True, boundscheck=False)
def check_list(body, offset, rec, expect, share_words, prime):  # pragma: no cover - compiled
    """Status of the record list at `offset` of `body` (uint8): it must end the body, its records of
    `rec` bytes must carry the big-endian ids `expect` (uint8, 4 per id) in that order, and the first
    `share_words` little-endian uint32 words after each id must be below `prime`."""
    n = body.size
    if n < offset + 4:
        return WRONG_LENGTH
    count = ((np.int64(body[offset]) << 24) | (np.int64(body[offset + 1]) << 16) | (np.int64(body[offset + 2]) << 8)
             | np.int64(body[offset + 3]))
    if n != offset + 4 + count * rec:
        return WRONG_LENGTH
    if 4 * count != expect.size:
        return WRONG_IDS
    for i in range(count):
        o = offset + 4 + i * rec
        if (body[o] != expect[4 * i] or body[o + 1] != expect[4 * i + 1] or body[o + 2] != expect[4 * i + 2]
                or body[o + 3] != expect[4 * i + 3]):
            return WRONG_IDS
    for i in range(count):
        o = offset + 8 + i * rec
        for w in range(share_words):
            q = o + 4 * w
            v = (np.uint32(body[q]) | (np.uint32(body[q + 1]) << np.uint32(8)) | (np.uint32(body[q + 2]) << np.uint32(16))
                 | (np.uint32(body[q + 3]) << np.uint32(24)))
            if v >= prime:
                return INVALID_SHARE
    return OK
