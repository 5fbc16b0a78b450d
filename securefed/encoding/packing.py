"""Bit-packing of modular integer vectors to exactly their width.

Layout (wire format, see ``protocols/encoding.md``): value ``i`` occupies bits
``[i*w, (i+1)*w)`` of a little-endian bit stream (stream bit ``j`` is bit ``j % 8``
of byte ``j // 8``); the stream is ``ceil(count*w/8)`` bytes and its padding bits
are zero. Unpacking is strict: wrong length or non-zero padding is rejected, so
every vector has exactly one encoding.
"""

from __future__ import annotations

import numpy as np

from securefed.encoding.loops import loops
from securefed.errors import ConfigurationError, InvalidInput

__all__ = ["pack", "packed_size", "storage_dtype", "unpack"]




def _check_width(width: int) -> None:
    if not isinstance(width, (int, np.integer)) or not 1 <= width <= 64:
        raise ConfigurationError(f"bit width must be an integer in [1, 64], got {width!r}")


def storage_dtype(width: int) -> np.dtype:
    """uint32 for widths up to 32 bits, uint64 above (the in-memory form of a modular vector)."""
    _check_width(width)
    return np.dtype(np.uint32) if width <= 32 else np.dtype(np.uint64)


def packed_size(count: int, width: int) -> int:
    """Bytes taken by `count` values of `width` bits."""
    _check_width(width)
    return (count * width + 7) // 8


def pack(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned integers, each below ``2**width``, into a uint8 array of :func:`packed_size` bytes.

    Raises InvalidInput for a non-1-D or non-unsigned array, or a value that needs more bits.
    """
    _check_width(width)
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind != "u":
        raise InvalidInput("pack expects a 1-D numpy array of unsigned integers")
    n = values.size
    if width == 8 * values.dtype.itemsize:  # every value fits by its dtype: the layout is a plain copy
        return values.astype(values.dtype.newbyteorder("<"), copy=True).view(np.uint8)
    words = np.empty((n * width + 63) // 64, dtype="<u8")
    bad = loops(n).pack_words(np.ascontiguousarray(values), int(width), words)
    if bad >= 0:
        raise InvalidInput(
            f"value {int(values[bad])} at index {bad} does not fit in {width} bits; "
            "reduce it modulo 2**width before packing"
        )
    return words.view(np.uint8)[: packed_size(n, width)]


def unpack(data: bytes | bytearray | memoryview | np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: `count` values of `width` bits, as :func:`storage_dtype`.

    Raises InvalidInput when the length is not exactly ``packed_size(count, width)``
    or the padding bits are not zero.
    """
    _check_width(width)
    if count < 0:
        raise InvalidInput(f"count must be >= 0, got {count}")
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise InvalidInput("unpack expects bytes or a 1-D uint8 array")
    size = packed_size(count, width)
    if raw.size != size:
        raise InvalidInput(f"packed vector has {raw.size} bytes, expected {size} for {count} x {width} bits")
    nwords = (count * width + 63) // 64
    words = np.zeros(nwords, dtype="<u8")
    words.view(np.uint8)[:size] = raw
    tail_bits = count * width % 64
    if tail_bits and int(words[-1]) >> tail_bits:
        raise InvalidInput("packed vector has non-zero padding bits")
    out = np.empty(count, dtype=storage_dtype(width))
    loops(count).unpack_words(words, int(width), count, out)
    return out
