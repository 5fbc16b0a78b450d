"""Pseudorandom masks: AES-128-CTR keystreams added to or subtracted from a vector, in place.

A mask key is 16 bytes (an AES-128 key, used as is) or a 32-byte seed (hashed to
an AES-128 key with HKDF-SHA256, info ``b"securefed/mask-prg"``). The mask of a key
is the AES-128-CTR keystream under a zero IV, read as little-endian words of the
buffer's dtype (uint32 or uint64), so it is uniform modulo 2^32 or 2^64 and hence
modulo any 2^k below. Each key must be used for one mask only.

:func:`apply_masks` walks the buffer in chunks of :data:`~securefed.crypto.prg.CHUNK_BYTES`:
each chunk of the output stays in cache while every key's keystream for that chunk
is written into one small scratch buffer and added or subtracted; no mask of full
length is ever allocated (memory O(chunk) whatever the number of keys).

Pairwise masks (Bonawitz et al. 2017): party u adds PRG(s_uv) for each peer v > u
and subtracts it for each v < u, so the masks of any two parties that both
contribute cancel in the sum. :func:`pairwise_signs` gives that split.
See ``protocols/secagg.md`` (masking) and ``proofs/secagg.md`` (mask cancellation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.crypto.prg import CHUNK_BYTES, new_stream

__all__ = ["MASK_KEY_BYTES", "apply_masks", "mask_aes_key", "pairwise_signs"]

MASK_KEY_BYTES = 16
_ZEROS = np.zeros(CHUNK_BYTES, dtype=np.uint8)


def mask_aes_key(seed: bytes) -> bytes:
    """The AES-128 key that expands `seed` (16 bytes: itself; 32 bytes: HKDF-SHA256 of it)."""
    if len(seed) == MASK_KEY_BYTES:
        return bytes(seed)
    if len(seed) == 32:
        return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"securefed/mask-prg").derive(bytes(seed))
    raise ValueError(f"a mask seed is 16 or 32 bytes, got {len(seed)}")


def apply_masks(out: np.ndarray, add: Iterable[bytes] = (), subtract: Iterable[bytes] = ()) -> np.ndarray:
    """``out += sum PRG(a) - sum PRG(s)`` modulo 2^(bits of out's dtype), in place; returns `out`.

    `out` is a C-contiguous 1-D uint32 or uint64 array; keys as in :func:`mask_aes_key`.
    """
    if not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype not in (np.uint32, np.uint64):
        raise ValueError("apply_masks needs a 1-D uint32 or uint64 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("apply_masks needs a writeable C-contiguous buffer")
    streams = [(new_stream(mask_aes_key(k)), np.add) for k in add]
    streams += [(new_stream(mask_aes_key(k)), np.subtract) for k in subtract]
    if not streams or out.size == 0:
        return out
    step = CHUNK_BYTES // out.itemsize
    scratch = np.empty(min(step, out.size), dtype=out.dtype)
    raw = memoryview(scratch.view(np.uint8))
    zeros = memoryview(_ZEROS)
    for lo in range(0, out.size, step):
        hi = min(lo + step, out.size)
        part = out[lo:hi]
        words = scratch[: hi - lo]
        nbytes = (hi - lo) * out.itemsize
        for stream, op in streams:
            stream.update_into(zeros[:nbytes], raw[:nbytes])
            op(part, words, out=part)
    return out


def pairwise_signs(party: int, peers: Sequence[int], keys: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split the pairwise keys of `party` into (added: peers above it, subtracted: peers below)."""
    if len(peers) != len(keys):
        raise ValueError("one key per peer")
    add, sub = [], []
    for v, k in zip(peers, keys):
        if v == party:
            raise ValueError("a party has no pairwise mask with itself")
        (add if v > party else sub).append(k)
    return add, sub
