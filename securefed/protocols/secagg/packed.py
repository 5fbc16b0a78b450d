"""Masked vectors on the wire, streamed: encode, mask and pack block by block; unpack-and-add likewise.

Layout (``protocols/secagg.md``, "Masked vectors"): ``count`` values of ``w`` bits take
exactly ``ceil(count*w/8)`` bytes, as with :func:`securefed.encoding.pack`, but *column-packed*
so that both sides run vectorized loops. With ``F = 32`` for ``w <= 32`` (else 64), the vector
is cut into blocks of :data:`BLOCK` values, then one block of the largest multiple of ``F``
left, then a tail of fewer than ``F`` values. A block of ``c = size / F`` columns holds value
``j*c + m`` as field ``j`` of column ``m``: the ``F`` fields of a column are a little-endian
bit stream of ``F*w`` bits, i.e. ``w`` words of ``F`` bits, and word ``k`` of column ``m`` is
word ``k*c + m`` of the block (little-endian words). The tail is packed as
:func:`securefed.encoding.pack` does (zero padding bits). :func:`column_pack` and
:func:`column_unpack` are the layout in numpy, for tests and audits.

A client's masked vector is made in one pass over its input (:func:`masked_message`): each
chunk of a block is quantized (or read from a stored encoding) and masked with every key's
keystream for those positions, and the block is packed into its place in the message, so a
client holds no full-length buffer but the packed message itself. The server adds each message
into its accumulator block by block (:class:`UnpackAdder`), reading it in place. Both split
large vectors into slabs of whole blocks run by threads (:mod:`securefed.parallel`); every
keystream (masks, rounding uniforms) is addressed by position, so the bytes do not depend on
the thread count or the chunk size.

Why columns: unpacking is the server's per-message cost next to the AES-CTR expansions it
redoes. Field ``j`` of every column sits at the same bit offset of one or two word rows, so
a row of values is a shift and an or of whole word rows (AVX2 on x86; adding the bits above a
field too changes nothing in the low ``w`` bits, which are the sum). Measurements against the
sequential layout: ``bench/results.md``, "History".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from securefed import kernels, parallel
from securefed.crypto.masks import Masker
from securefed.crypto.prg import keystream_into, new_stream
from securefed.encoding.fixedpoint import IntegerEncoder
from securefed.encoding.packing import pack, packed_size, storage_dtype, unpack
from securefed.errors import InvalidInput, MessageRejected

__all__ = ["BLOCK", "GROUP", "HOLD_BYTES", "ROUNDING_KEY_BYTES", "Source", "UnpackAdder", "column_pack",
           "column_unpack", "encoded_source", "masked_message", "materialize", "stored_source"]

#: The rounding uniforms of a streamed encoding: AES-128-CTR under a fresh 16-byte key, one uint32 per coordinate.
ROUNDING_KEY_BYTES = 16
#: Values per column block (1024 columns of 32-bit words, 512 of 64-bit words).
BLOCK = 1 << 15

#: ``source(lo)`` opens a reader at coordinate `lo`; the reader fills `out` with the encodings of
#: the next ``len(out)`` coordinates, ``reader(start, out)``, pieces following each other.
Source = Callable[[int], Callable[[int, np.ndarray], None]]


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    from securefed.protocols.secagg import _packed_kernels as k

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


def _words(width: int) -> np.dtype:
    """The little-endian words of the column layout: the storage dtype of `width` (F = its bits)."""
    return storage_dtype(width).newbyteorder("<")


def _pieces(count: int, width: int) -> list[tuple[int, int, int]]:
    """The layout of `count` values: (first value, values, columns) per block, then the tail (columns 0)."""
    f = 8 * _words(width).itemsize
    out = [(lo, BLOCK, BLOCK // f) for lo in range(0, count - count % BLOCK, BLOCK)]
    rest = count % BLOCK
    if rest >= f:
        out.append((count - rest, rest - rest % f, rest // f))
    if rest % f:
        out.append((count - rest % f, rest % f, 0))
    return out


def column_pack(values: np.ndarray, width: int) -> bytes:
    """`values` (unsigned, each below 2^width) in the column layout; the reference, in numpy."""
    words = _words(width)
    f = 8 * words.itemsize
    out = []
    for lo, size, c in _pieces(values.size, width):
        v = values[lo : lo + size]
        if c:  # column m's fields in order, packed column after column, then words row by row
            cols = pack(np.ascontiguousarray(v.reshape(f, c).T).reshape(-1), width).view(words).reshape(c, width)
            out.append(np.ascontiguousarray(cols.T).tobytes())
        else:
            out.append(pack(v, width).tobytes())
    return b"".join(out)


def column_unpack(data: bytes | memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`column_pack` (storage dtype of `width`); InvalidInput for a wrong length or padding."""
    raw = memoryview(data).cast("B")  # read in place: slices of it are views
    if len(raw) != packed_size(count, width):
        raise InvalidInput(f"packed vector has {len(raw)} bytes, expected {packed_size(count, width)}")
    words = _words(width)
    f = 8 * words.itemsize
    out = np.empty(count, dtype=storage_dtype(width))
    for lo, size, c in _pieces(count, width):
        b0, b1 = lo * width // 8, packed_size(lo + size, width)
        if c:
            cols = np.ascontiguousarray(np.frombuffer(raw[b0:b1], dtype=words).reshape(width, c).T)
            out[lo : lo + size] = unpack(cols.view(np.uint8).reshape(-1), width, size).reshape(c, f).T.reshape(-1)
        else:
            out[lo : lo + size] = unpack(raw[b0:b1], width, size)
    return out


def _pack_columns(v: np.ndarray, width: int, c: int, mask: np.unsignedinteger, out: np.ndarray) -> None:
    """``out`` (``width*c`` words) <- the ``F*c`` values of `v` column-packed: the compiled loop's
    job (``_packed_kernels.pack_columns``) in numpy, a row of ``c`` columns per step, where loading
    the compiler would cost more than it saves (:mod:`securefed.kernels`)."""
    f = 8 * out.dtype.itemsize
    word = out.dtype.type
    x = np.bitwise_and(v[: f * c], mask).reshape(f, c)
    rows = out.reshape(width, c)
    rows[:] = 0
    for j in range(f):
        k, off = divmod(j * width, f)
        rows[k] |= x[j] << word(off)
        if off + width > f:
            rows[k + 1] |= x[j] >> word(f - off)


def _packer(width: int, values: int) -> Callable[..., None]:
    """The loop column-packing `values` values of this width: compiled, or numpy's (:mod:`securefed.kernels`)."""
    return _pack_kernel(width) if kernels.compiled(values) else _pack_columns


@cache
def _pack_kernel(width: int):  # -> the compiled packing loop for this width
    from numba.core import types

    word = types.uint32 if width <= 32 else types.uint64
    vec = types.Array(word, 1, "C")
    return _kernels().pack_columns.compile((vec, types.IntegerLiteral(width), types.int64, word, vec))


@cache
def _unpack_kernel(width: int, aligned: bool):  # -> the compiled unpack-add loop for this width
    from numba.core import types

    word = types.uint32 if width <= 32 else types.uint64
    src = types.Array(word, 1, "C", readonly=True, aligned=aligned)
    return _kernels().unpack_add_columns.compile(
        (src, types.IntegerLiteral(width), types.int64, types.int64, types.int64, types.Array(word, 1, "C")))


@cache
def _unpack_group_kernel(u32: bool):  # -> the compiled loop adding GROUP messages in one pass
    from numba.core import types

    word = types.uint32 if u32 else types.uint64
    src = types.Array(word, 1, "C", readonly=True, aligned=False)  # (any alignment: the messages' vary)
    return _kernels().unpack_add_columns4.compile(
        (src, src, src, src, types.int64, types.int64, types.int64, types.int64, types.Array(word, 1, "C")))


def _mask(width: int) -> np.unsignedinteger:
    dtype = storage_dtype(width)
    return dtype.type((1 << width) - 1)


def masked_message(source: Source, size: int, width: int, dtype: np.dtype, add: Sequence[bytes],
                   subtract: Sequence[bytes], prefix: bytes) -> bytes:
    """``prefix`` followed by ``encoding + sum PRG(add) - sum PRG(subtract)``, reduced to `width` bits and packed.

    `add`/`subtract` are AES-128 mask keys; arithmetic is modulo 2^(bits of `dtype`),
    whose low `width` bits are the sum modulo 2^width. Memory: the packed message
    (twice, while it is joined to `prefix`) plus a block and a few chunks per thread.
    """
    if np.dtype(dtype) != storage_dtype(width):
        raise ValueError(f"a {width}-bit masked vector is computed in {storage_dtype(width)}, not {dtype}")
    out = np.empty(packed_size(size, width), dtype=np.uint8)
    words = _words(width)
    chunk = parallel.get_chunk_size()
    kernel, mask = _packer(width, size), _mask(width)
    layout = _pieces(size, width)

    def slab(lo: int, hi: int) -> None:
        read = source(lo)
        masker = Masker(dtype, add, subtract, lo, min(chunk, hi - lo))
        buf = np.empty(min(BLOCK, hi - lo), dtype=dtype)
        for a, n, c in (p for p in layout if lo <= p[0] < hi):
            part = buf[:n]
            for s in range(0, n, chunk):  # pieces follow each other: the reader and the masker continue their streams
                piece = part[s : s + chunk]
                read(a + s, piece)
                masker.apply(piece)
            b0, b1 = a * width // 8, packed_size(a + n, width)
            if c:
                kernel(part, width, c, mask, out[b0:b1].view(words))
            else:
                out[b0:b1] = pack(part & mask, width)

    parallel.run_slabs(slab, parallel.slabs(size, len(add) + len(subtract) + 3, align=BLOCK))
    return b"".join((prefix, out.data))


#: Messages an :class:`UnpackAdder` adds in one pass over its accumulator.
GROUP = 4
#: The largest message it holds back for a group (holding GROUP - 1 of them costs their memory).
HOLD_BYTES = 8 << 20


class UnpackAdder:
    """Adds column-packed vectors of ``acc.size`` values of `width` bits into `acc` modulo 2^width.

    Reads each message in place, one kernel call per slab of whole blocks; rejects a
    message (wrong length, non-zero padding) before touching the accumulator. Only the low
    `width` bits of `acc` are the sum (the bits above are left as they fall): reduce it with
    ``acc &= 2^width - 1`` before reading it.

    Messages of at most :data:`HOLD_BYTES` that live in immutable ``bytes`` are held back and
    added :data:`GROUP` at a time: one pass over the accumulator instead of four, which matters
    when the messages come from memory (``bench/results.md``, "History").
    :meth:`flush` adds what is held; :attr:`held_bytes` is its size.
    """

    def __init__(self, acc: np.ndarray, width: int) -> None:
        if acc.dtype != storage_dtype(width):
            raise ValueError(f"a {width}-bit sum accumulates in {storage_dtype(width)}, not {acc.dtype}")
        self.acc, self.width, self.count = acc, width, acc.size
        self.size = packed_size(acc.size, width)
        self._words = _words(width)
        self._full = acc.size - acc.size % BLOCK  # the whole blocks end here
        rest = _pieces(acc.size, width)[self._full // BLOCK :]  # a block of fewer columns, a tail
        self._last = sum(c for _, _, c in rest)  # columns of the short block (0: none)
        self._in_columns = acc.size - sum(n for _, n, c in rest if not c)
        self._nwords = self._in_columns * width // (8 * self._words.itemsize)
        self._single = acc.size < 2 * parallel.MIN_SLAB_WORK  # one slab (what slabs() gives), called directly
        f = 8 * self._words.itemsize
        # the arguments of a one-slab call, fixed for every message
        self._whole = (width, BLOCK // f, self._full // BLOCK, self._last, acc[: self._in_columns])
        self._hold = self.size <= HOLD_BYTES
        self._pending: list[tuple[memoryview, np.ndarray]] = []

    @property
    def held_bytes(self) -> int:
        """Bytes of messages accepted by :meth:`add` and not yet in the accumulator."""
        return len(self._pending) * self.size

    def check(self, body: memoryview) -> None:
        """MessageRejected unless `body` is exactly one packed vector with zero padding."""
        if len(body) != self.size:
            raise MessageRejected("invalid message: wrong length of the masked vector")
        used = self.count * self.width % 8
        if used and body[-1] >> used:
            raise MessageRejected("invalid message: non-zero padding bits")

    def add(self, body: memoryview, *, more: int | None = None) -> None:
        """``acc += column_unpack(body)`` modulo 2^width, now or with the next messages (see
        :meth:`flush`); call :meth:`check` first. `more`: how many messages the caller still
        expects after this one (None: unknown); a message is held only if its group can fill."""
        words = np.frombuffer(body, dtype=self._words, count=self._nwords)
        if words.flags.writeable:  # the kernels are compiled for read-only words (a bytes message)
            words = words.view()
            words.flags.writeable = False
        # only immutable bytes can wait: the caller may reuse a writeable buffer once add() returns
        if (self._hold and isinstance(body, memoryview) and isinstance(body.obj, bytes)
                and (more is None or len(self._pending) + 1 + more >= GROUP)):
            self._pending.append((body, words))
            if len(self._pending) == GROUP:
                group, self._pending = self._pending, []
                self._add(group)
        else:
            self._add([(body, words)])

    def flush(self) -> None:
        """Add the messages held back: `acc` is then the sum of every message passed to :meth:`add`."""
        pending, self._pending = self._pending, []
        for message in pending:
            self._add([message])

    def _add(self, messages: list[tuple[memoryview, np.ndarray]]) -> None:
        """Add one message, or GROUP in one pass."""
        words = [w for _, w in messages]
        if len(messages) == GROUP:
            kernel = _unpack_group_kernel(self.width <= 32)
        else:
            kernel = _unpack_kernel(self.width, bool(words[0].flags.aligned))
        if self._single:
            kernel(*words, *self._whole)
            if self._in_columns < self.count:  # a tail of fewer than F values, packed as encoding.pack does
                for body, _ in messages:
                    self._tail(body)
        else:
            parallel.run_slabs(lambda lo, hi: self._slab(messages, kernel, lo, hi),
                               parallel.slabs(self.count, len(messages), align=BLOCK))

    def _slab(self, messages: list[tuple[memoryview, np.ndarray]], kernel, lo: int, hi: int) -> None:
        w, acc, f = self.width, self.acc, 8 * self._words.itemsize
        end = self._in_columns if hi == self.count else hi  # the last slab also takes the short block
        last = self._last if hi == self.count else 0
        if end > lo:  # the slab's blocks in one call
            kernel(*[x[lo * w // f : end * w // f] for _, x in messages], w, BLOCK // f,
                   (min(hi, self._full) - lo) // BLOCK, last, acc[lo:end])
        if hi == self.count and end < hi:
            for body, _ in messages:
                self._tail(body)

    def _tail(self, body: memoryview) -> None:
        """Add the tail of fewer than F values, packed as :func:`securefed.encoding.pack` does."""
        end, w = self._in_columns, self.width
        self.acc[end:] += unpack(body[end * w // 8 :], w, self.count - end)
