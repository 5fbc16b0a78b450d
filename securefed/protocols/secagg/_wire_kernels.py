"""Compiled check of :mod:`securefed.protocols.secagg.wire` (the server's per-reply parsing)."""

from __future__ import annotations

import numpy as np
from numba import njit

OK, WRONG_LENGTH, WRONG_IDS, INVALID_SHARE = range(4)


@njit(cache=True, nogil=True, boundscheck=False)
def check_list(body, offset, rec, expect, skip, share_words, prime):  # pragma: no cover - compiled
    """Status of the record list at `offset` of `body` (bytes, a memoryview): it must end the body, its records of
    `rec` bytes must carry the big-endian ids `expect` (uint8, 4 per id) in that order, the one at
    index `skip` left out (-1: none), and the first `share_words` little-endian uint32 words after
    each id must be below `prime`."""
    n = len(body)
    if n < offset + 4:
        return WRONG_LENGTH
    count = ((np.int64(body[offset]) << 24) | (np.int64(body[offset + 1]) << 16) | (np.int64(body[offset + 2]) << 8)
             | np.int64(body[offset + 3]))
    if n != offset + 4 + count * rec:
        return WRONG_LENGTH
    if 4 * (count + (1 if skip >= 0 else 0)) != expect.size:
        return WRONG_IDS
    for i in range(count):
        o = offset + 4 + i * rec
        e = 4 * (i + 1 if 0 <= skip <= i else i)
        if (body[o] != expect[e] or body[o + 1] != expect[e + 1] or body[o + 2] != expect[e + 2]
                or body[o + 3] != expect[e + 3]):
            return WRONG_IDS
    for i in range(count):
        o = offset + 8 + i * rec
        for w in range(share_words):
            q = o + 4 * w
            v = (np.uint32(body[q]) | (np.uint32(body[q + 1]) << np.uint32(8))
                 | (np.uint32(body[q + 2]) << np.uint32(16)) | (np.uint32(body[q + 3]) << np.uint32(24)))
            if v >= prime:
                return INVALID_SHARE
    return OK


@njit(cache=True, nogil=True, boundscheck=False)
def route_complete(place, per, ids, order, senders):  # pragma: no cover - compiled
    """Where the masked_input requests of the complete graph take their records from: entry
    ``j * (n-1) + c`` (recipient j's c-th record, senders ascending) gets the row of the share
    sender i addressed to j among all senders' records (`per` each: i's list holds every other
    advertiser in id order; `place` is each sender's index among the advertisers) and i's id as on
    the wire."""
    n = place.size
    for j in range(n):
        pj = place[j]
        for i in range(n):
            if i == j:
                continue
            at = j * (n - 1) + i - (1 if i > j else 0)
            order[at] = i * per + pj - (1 if pj > place[i] else 0)
            senders[at] = ids[i]
