"""AES-CTR keystream expansion into preallocated numpy buffers.

The keystream of AES-CTR under a secret key with a zero IV is a PRG; each key is
used for one stream only. Output is written chunk by chunk into the caller's
buffer so that no second full-length array is allocated.

The stream can start at any block: CTR's counter block is the 128-bit big-endian
block index (OpenSSL increments all 128 bits), so ``new_stream(key, offset)``
yields exactly the bytes from `offset` on of ``new_stream(key)``. Threads use it
to expand disjoint parts of one stream in parallel.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["CHUNK_BYTES", "keystream_into", "new_stream", "zero_bytes"]

#: 256 KiB: large enough to reach AES-NI throughput, small enough for L2.
CHUNK_BYTES = 1 << 18

_ZERO_IV = bytes(16)
_zeros = np.zeros(CHUNK_BYTES, dtype=np.uint8)  # the plaintext of every expansion, shared by all threads


def zero_bytes(n: int) -> memoryview:
    """`n` zero bytes (read-only use): the input that CTR mode turns into `n` bytes of keystream."""
    global _zeros
    if _zeros.size < n:
        _zeros = np.zeros(n, dtype=np.uint8)
    return _zeros.data[:n]


def new_stream(key: bytes, offset: int = 0):  # -> CipherContext (cryptography's type is private)
    """An AES-CTR encryptor over `key` (16 or 32 bytes) with a zero IV, positioned at byte `offset`.

    `offset` must be a multiple of the 16-byte block (ValueError otherwise).
    """
    if len(key) not in (16, 32):
        raise ValueError(f"AES-CTR key must be 16 or 32 bytes, got {len(key)}")
    if offset % 16 or offset < 0:
        raise ValueError(f"a keystream offset must be a non-negative multiple of 16 bytes, got {offset}")
    iv = _ZERO_IV if not offset else (offset // 16).to_bytes(16, "big")
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def keystream_into(stream, out: np.ndarray) -> None:
    """Overwrite the bytes of the C-contiguous array `out` with the next keystream bytes."""
    if not out.flags.c_contiguous:
        raise ValueError("keystream_into needs a C-contiguous buffer")
    view = out.reshape(-1).view(np.uint8).data
    total = len(view)
    zeros = zero_bytes(min(CHUNK_BYTES, total))
    for off in range(0, total, CHUNK_BYTES):
        n = min(CHUNK_BYTES, total - off)
        stream.update_into(zeros[:n], view[off : off + n])
