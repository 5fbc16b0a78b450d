"""Masked vectors on the wire: pack at the modulus width, and unpack-and-add into an accumulator.

The layout is :mod:`securefed.encoding.packing`'s (value i at bits [i*w, (i+1)*w)
of a little-endian stream, zero padding), so :func:`securefed.encoding.unpack`
reads these messages too. Two differences make them fit the protocol's hot path:
packing keeps the low w bits of each value (the client's masked sum lives modulo
2^32 or 2^64 and is reduced to 2^w here, in the same pass), and the server adds
each message into its accumulator chunk by chunk, never materializing the vector.
Unpacking is the server's per-message cost next to the AES-CTR expansions it
redoes, so its kernel is compiled once per width (a compile-time constant width
makes it about twice as fast); numba caches each on disk.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from securefed.encoding.packing import packed_size
from securefed.errors import MessageRejected

__all__ = ["UnpackAdder", "pack_low_bits"]

#: Values per chunk when unpacking (a multiple of 64, so every chunk starts on a byte and word boundary).
CHUNK_VALUES = 1 << 16


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    from securefed.protocols import _packed_kernels as k

    return k


@cache
def _unpack_kernel(width: int, dtype: str):  # -> the compiled entry point for this width
    from numba.core import types

    vec = types.Array(types.uint32 if dtype == "uint32" else types.uint64, 1, "C")
    words = types.Array(types.uint64, 1, "C")
    return _kernels().unpack_add.compile((words, types.IntegerLiteral(width), types.int64, vec))


def pack_low_bits(values: np.ndarray, width: int, prefix: bytes = b"") -> bytes:
    """``prefix`` followed by the low `width` bits of each of `values` (uint32/uint64), packed."""
    words = np.empty((values.size * width + 63) // 64, dtype=np.uint64)
    _kernels().pack_low_bits(values, width, words)
    return b"".join((prefix, memoryview(words.view(np.uint8))[: packed_size(values.size, width)]))


class UnpackAdder:
    """Adds packed vectors of `count` values of `width` bits into `acc` (wrapping), chunk by chunk.

    Holds one scratch buffer of O(CHUNK_VALUES) words; rejects a message (wrong
    length, non-zero padding) before touching the accumulator.
    """

    def __init__(self, acc: np.ndarray, width: int) -> None:
        self.acc, self.width, self.count = acc, width, acc.size
        self.size = packed_size(acc.size, width)
        step = min(CHUNK_VALUES, acc.size)
        self._scratch = np.zeros(step * width // 64 + 2, dtype=np.uint64)
        self._kernel = _unpack_kernel(width, acc.dtype.name)

    def check(self, body: memoryview) -> None:
        """MessageRejected unless `body` is exactly one packed vector with zero padding."""
        if len(body) != self.size:
            raise MessageRejected("invalid message: wrong length of the masked vector")
        used = self.count * self.width % 8
        if used and body[-1] >> used:
            raise MessageRejected("invalid message: non-zero padding bits")

    def add(self, body: memoryview) -> None:
        """``acc += unpack(body)``; call :meth:`check` first."""
        raw = self._scratch.view(np.uint8)
        src = np.frombuffer(body, dtype=np.uint8)
        w = self.width
        for lo in range(0, self.count, CHUNK_VALUES):
            hi = min(lo + CHUNK_VALUES, self.count)
            b0, b1 = lo * w // 8, packed_size(hi, w)
            nbytes = b1 - b0
            raw[:nbytes] = src[b0:b1]
            raw[nbytes : nbytes + 16] = 0
            self._kernel(self._scratch, w, hi - lo, self.acc[lo:hi])
