"""Pseudorandom masks: AES-128-CTR keystreams added to or subtracted from a vector, in place.

A mask key is 16 bytes (an AES-128 key, used as is) or a 32-byte seed (hashed to
an AES-128 key with HKDF-SHA256, info ``b"securefed/mask-prg"``). The mask of a key
is the AES-128-CTR keystream under a zero IV, read as little-endian words of the
buffer's dtype (uint32 or uint64), so it is uniform modulo 2^32 or 2^64 and hence
modulo any 2^k below. Each key must be used for one mask only.

:func:`apply_masks` walks the buffer in chunks (about :func:`securefed.parallel.get_chunk_size`
elements, all alike): each chunk of the output stays in cache while every key's keystream for
that chunk is written into one small scratch buffer and added or subtracted; no mask
of full length is ever allocated (memory O(chunk) per thread whatever the number of
keys). Large buffers are split into slabs processed by threads
(:mod:`securefed.parallel`); each slab's keystreams start at the slab's offset, so
the result does not depend on the thread count. :class:`Masker` is the same loop for
callers that produce the vector chunk by chunk.

Pairwise masks (Bonawitz et al. 2017): party u adds PRG(s_uv) for each peer v > u
and subtracts it for each v < u, so the masks of any two parties that both
contribute cancel in the sum. :func:`pairwise_signs` gives that split.
See ``protocols/secagg.md`` (masking) and ``proofs/secagg.md`` (mask cancellation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed import parallel
from securefed.crypto.prg import new_stream, zero_bytes

__all__ = ["MASK_KEY_BYTES", "Masker", "apply_masks", "mask_aes_key", "pairwise_signs"]

MASK_KEY_BYTES = 16


def mask_aes_key(seed: bytes) -> bytes:
    """The AES-128 key that expands `seed` (16 bytes: itself; 32 bytes: HKDF-SHA256 of it)."""
    if len(seed) == MASK_KEY_BYTES:
        return bytes(seed)
    if len(seed) == 32:
        return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"securefed/mask-prg").derive(bytes(seed))
    raise ValueError(f"a mask seed is 16 or 32 bytes, got {len(seed)}")


class Masker:
    """Adds ``sum PRG(a) - sum PRG(s)`` to consecutive pieces of one vector, from element `start` on.

    `add` and `subtract` are AES-128 keys (already through :func:`mask_aes_key`);
    `dtype` is uint32 or uint64; `start` must be a multiple of 16 bytes of `dtype`.
    Pieces passed to :meth:`apply` are at most `chunk` elements and follow each other.
    """

    def __init__(self, dtype: np.dtype, add: Sequence[bytes], subtract: Sequence[bytes], start: int = 0,
                 chunk: int | None = None) -> None:
        itemsize = np.dtype(dtype).itemsize
        chunk = parallel.get_chunk_size() if chunk is None else chunk
        self._streams: list[tuple[Any, np.ufunc]] = [(new_stream(k, start * itemsize), np.add) for k in add]
        self._streams += [(new_stream(k, start * itemsize), np.subtract) for k in subtract]
        self._scratch = np.empty(chunk, dtype=dtype)
        self._raw = self._scratch.view(np.uint8).data
        self._zeros = zero_bytes(chunk * itemsize)

    def apply(self, part: np.ndarray) -> None:
        """``part += the masks' next len(part) words`` (wrapping), in place."""
        words, zeros, raw = self._scratch, self._zeros, self._raw
        if part.size != words.size:  # (a whole chunk, the usual case, needs no slicing)
            nbytes = part.size * part.itemsize
            words, zeros, raw = words[: part.size], zeros[:nbytes], raw[:nbytes]
        for stream, op in self._streams:
            stream.update_into(zeros, raw)
            op(part, words, out=part)


def apply_masks(out: np.ndarray, add: Iterable[bytes] = (), subtract: Iterable[bytes] = ()) -> np.ndarray:
    """``out += sum PRG(a) - sum PRG(s)`` modulo 2^(bits of out's dtype), in place; returns `out`.

    `out` is a C-contiguous 1-D uint32 or uint64 array; keys as in :func:`mask_aes_key`.
    """
    if not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype not in (np.uint32, np.uint64):
        raise ValueError("apply_masks needs a 1-D uint32 or uint64 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("apply_masks needs a writeable C-contiguous buffer")
    plus = [mask_aes_key(k) for k in add]
    minus = [mask_aes_key(k) for k in subtract]
    if not (plus or minus) or out.size == 0:
        return out
    size = parallel.get_chunk_size()

    def slab(lo: int, hi: int) -> None:
        # Chunks of about the configured size, all alike: a short last chunk would cost a call per key
        # for little work (10^5 words in chunks of 2^15: three of 33,344, not three of 32,768 and one of 1,696).
        pieces = max(1, round((hi - lo) / size))
        chunk = -(-(hi - lo) // pieces)
        chunk = -(-chunk // parallel.ALIGN) * parallel.ALIGN  # (a multiple of ALIGN: keystreams start on AES blocks)
        masker = Masker(out.dtype, plus, minus, lo, min(chunk, hi - lo))
        for a in range(lo, hi, chunk):
            masker.apply(out[a : min(a + chunk, hi)])

    parallel.run_slabs(slab, parallel.slabs(out.size, len(plus) + len(minus)))
    return out


def pairwise_signs(party: int, peers: Sequence[int], keys: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split the pairwise keys of `party` into (added: peers above it, subtracted: peers below)."""
    if len(peers) != len(keys):
        raise ValueError("one key per peer")
    add: list[bytes] = []
    sub: list[bytes] = []
    for v, k in zip(peers, keys):
        if v == party:
            raise ValueError("a party has no pairwise mask with itself")
        (add if v > party else sub).append(k)
    return add, sub
