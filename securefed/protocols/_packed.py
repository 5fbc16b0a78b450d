"""Masked vectors on the wire, streamed: encode, mask and pack chunk by chunk; unpack-and-add likewise.

The layout is :mod:`securefed.encoding.packing`'s (value i at bits [i*w, (i+1)*w)
of a little-endian stream, zero padding), so :func:`securefed.encoding.unpack`
reads these messages too. A client's masked vector is made in one pass over its
input (:func:`masked_message`): each chunk is quantized (or read from a stored
encoding), masked with every key's keystream for those positions, and packed into
its place in the message, so a client holds no full-length buffer but the packed
message itself. The server adds each message into its accumulator chunk by chunk
(:class:`UnpackAdder`), never materializing the vector. Both split large vectors
into slabs run by threads (:mod:`securefed.parallel`); every keystream (masks,
rounding uniforms) is addressed by position, so the bytes do not depend on the
thread count or the chunk size.

Unpacking is the server's per-message cost next to the AES-CTR expansions it
redoes, so its kernel is compiled once per width (a compile-time constant width
lets LLVM turn the eight byte loads around a field into one load and vectorize
the loop, about three times faster); numba caches each on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from securefed import parallel
from securefed.crypto.masks import Masker
from securefed.crypto.prg import keystream_into, new_stream
from securefed.encoding.fixedpoint import IntegerEncoder
from securefed.encoding.packing import packed_size
from securefed.errors import MessageRejected

__all__ = ["ROUNDING_KEY_BYTES", "Source", "UnpackAdder", "encoded_source", "masked_message", "materialize",
           "stored_source"]

#: The rounding uniforms of a streamed encoding: AES-128-CTR under a fresh 16-byte key, one uint32 per coordinate.
ROUNDING_KEY_BYTES = 16
#: Widest field the byte-window kernel reads (a field plus its bit offset in its first byte fits 64 bits).
_BYTE_KERNEL_MAX = 56

#: ``source(lo)`` opens a reader at coordinate `lo`; the reader fills `out` with the encodings of
#: the next ``len(out)`` coordinates, ``reader(start, out)``, pieces following each other.
Source = Callable[[int], Callable[[int, np.ndarray], None]]


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    from securefed.protocols import _packed_kernels as k

    return k


def encoded_source(x: np.ndarray, encoder: IntegerEncoder, n: int, rounding_key: bytes) -> Source:
    """The encodings of `x` under a chunked `encoder`, rounding uniform i = keystream word i of `rounding_key`."""

    def open_at(lo: int) -> Callable[[int, np.ndarray], None]:
        stream = new_stream(rounding_key, 4 * lo)
        uniforms = np.empty(parallel.get_chunk_size(), dtype=np.uint32)

        def read(start: int, out: np.ndarray) -> None:
            u = uniforms[: out.size]
            keystream_into(stream, u)
            encoder.encode_chunk(x[start : start + out.size], u, n=n, out=out, offset=start)

        return read

    return open_at


def stored_source(encoded: np.ndarray) -> Source:
    """An encoding already made (by an encoder that needs the whole vector, or restored from a saved state)."""

    def open_at(lo: int) -> Callable[[int, np.ndarray], None]:
        def read(start: int, out: np.ndarray) -> None:
            out[:] = encoded[start : start + out.size]

        return read

    return open_at


def materialize(source: Source, size: int, dtype: np.dtype) -> np.ndarray:
    """The whole encoded vector of `source` (for a saved state), made slab by slab."""
    out = np.empty(size, dtype=dtype)
    chunk = parallel.get_chunk_size()

    def slab(lo: int, hi: int) -> None:
        read = source(lo)
        for a in range(lo, hi, chunk):
            read(a, out[a : min(a + chunk, hi)])

    parallel.run_slabs(slab, parallel.slabs(size, 2))
    return out


def masked_message(source: Source, size: int, width: int, dtype: np.dtype, add: Sequence[bytes],
                   subtract: Sequence[bytes], prefix: bytes) -> bytes:
    """``prefix`` followed by ``encoding + sum PRG(add) - sum PRG(subtract)``, reduced to `width` bits and packed.

    `add`/`subtract` are AES-128 mask keys; arithmetic is modulo 2^(bits of `dtype`),
    whose low `width` bits are the sum modulo 2^width. Memory: the packed message
    (twice, while it is joined to `prefix`) plus a few chunks per thread.
    """
    words = np.empty((size * width + 63) // 64, dtype=np.uint64)
    chunk = parallel.get_chunk_size()
    pack = _kernels().pack_low_bits

    def slab(lo: int, hi: int) -> None:
        read = source(lo)
        masker = Masker(dtype, add, subtract, lo, min(chunk, hi - lo))
        buf = np.empty(min(chunk, hi - lo), dtype=dtype)
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            part = buf[: b - a]
            read(a, part)
            masker.apply(part)
            # a is a multiple of 64, so the chunk starts on a word boundary of the packed stream
            pack(part, width, words[a * width // 64 : (b * width + 63) // 64])

    parallel.run_slabs(slab, parallel.slabs(size, len(add) + len(subtract) + 3))
    return b"".join((prefix, memoryview(words.view(np.uint8))[: packed_size(size, width)]))


@cache
def _unpack_kernel(width: int, dtype: str):  # -> the compiled entry point for this width
    from numba.core import types

    vec = types.Array(types.uint32 if dtype == "uint32" else types.uint64, 1, "C")
    if width <= _BYTE_KERNEL_MAX:
        src = types.Array(types.uint8, 1, "C", readonly=True)
        return _kernels().unpack_add_range.compile((src, types.IntegerLiteral(width), types.int64, types.int64, vec))
    words = types.Array(types.uint64, 1, "C")
    return _kernels().unpack_add.compile((words, types.IntegerLiteral(width), types.int64, vec))


class UnpackAdder:
    """Adds packed vectors of ``acc.size`` values of `width` bits into `acc` (wrapping), slab by slab.

    Reads each message in place, one kernel call per slab (widths up to 56 bits; wider
    ones chunk by chunk through a chunk-sized scratch buffer); rejects a message (wrong
    length, non-zero padding) before touching the accumulator.
    """

    def __init__(self, acc: np.ndarray, width: int) -> None:
        self.acc, self.width, self.count = acc, width, acc.size
        self.size = packed_size(acc.size, width)
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
        src = np.frombuffer(body, dtype=np.uint8)
        if src.flags.writeable:  # the kernel is compiled for read-only bytes (a bytes message)
            src = src.view()
            src.flags.writeable = False
        if self.width <= _BYTE_KERNEL_MAX:  # read in place, one kernel call per slab
            parallel.run_slabs(lambda lo, hi: self._kernel(src, self.width, lo, hi, self.acc), parallel.slabs(self.count))
        else:
            parallel.run_slabs(lambda lo, hi: self._add_wide(src, lo, hi), parallel.slabs(self.count, 2))

    def _add_wide(self, src: np.ndarray, lo: int, hi: int) -> None:
        """Fields wider than 56 bits: through a chunk-sized, zero-padded copy of the words."""
        w, chunk = self.width, parallel.get_chunk_size()
        scratch = np.empty(min(chunk, hi - lo) * w // 64 + 2, dtype=np.uint64)
        raw = scratch.view(np.uint8)
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            b0, b1 = a * w // 8, packed_size(b, w)
            raw[: b1 - b0] = src[b0:b1]
            raw[b1 - b0 : b1 - b0 + 16] = 0
            self._kernel(scratch, w, b - a, self.acc[a:b])
