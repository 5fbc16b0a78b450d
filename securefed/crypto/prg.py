"""AES-CTR keystream expansion into preallocated numpy buffers.

The keystream of AES-CTR under a secret key with a zero IV is a PRG; each key is
used for one stream only. Output is written chunk by chunk into the caller's
buffer so that no second full-length array is allocated.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["CHUNK_BYTES", "keystream_into", "new_stream"]

#: 256 KiB: large enough to reach AES-NI throughput, small enough for L2.
CHUNK_BYTES = 1 << 18

_ZERO_IV = bytes(16)
_ZEROS = np.zeros(CHUNK_BYTES, dtype=np.uint8)


def new_stream(key: bytes):  # -> CipherContext (cryptography's type is private)
    """An AES-CTR encryptor over `key` (16 or 32 bytes) with a zero IV."""
    if len(key) not in (16, 32):
        raise ValueError(f"AES-CTR key must be 16 or 32 bytes, got {len(key)}")
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()


def keystream_into(stream, out: np.ndarray) -> None:
    """Overwrite the bytes of the C-contiguous array `out` with the next keystream bytes."""
    if not out.flags.c_contiguous:
        raise ValueError("keystream_into needs a C-contiguous buffer")
    view = memoryview(out.reshape(-1).view(np.uint8))
    total = len(view)
    for off in range(0, total, CHUNK_BYTES):
        n = min(CHUNK_BYTES, total - off)
        stream.update_into(_ZEROS[:n], view[off : off + n])
