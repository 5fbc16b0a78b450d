"""Message bodies of SecAgg / SecAgg+ (layout version 3; the spec is ``protocols/secagg.md``).

Every message is the common header of :mod:`securefed.protocols.wire` followed by
one of these bodies. Integers are big-endian; ``id`` is a client index (uint32);
lists are ``count (uint32)`` then ``count`` fixed-size records with ids strictly
ascending. Parsing is strict: wrong lengths, unsorted or repeated ids, non-zero
padding bits all raise MessageRejected.

    advertise_keys     request  (empty)
                       reply    c_pk[32] s_pk[32] [sig[64] if active] check[4]
    share_keys         request  count, count x (id, c_pk[32], s_pk[32], [sig[64]], check[4])
                       reply    commit[32], count, count x (recipient id, sealed[100])
    masked_input       request  count, count x (sender id, sealed[100])
                       reply    the masked vector, column-packed at the modulus width (packed.py)
    consistency_check  request  survivors bitmap[ceil(n/8)]          (active only)
                       reply    sig[64]
    unmasking          request  survivors bitmap[ceil(n/8)] [count, count x (id, sig[64]) if active]
                       reply    count, count x (id, share[36])

sealed = AES-GCM(nonce[12] || enc(b_share[36] || sk_share[36]) || tag[16]).
check = CRC-32(id || c_pk || s_pk || [sig]) of the advertising client, big-endian: the server
checks it on arrival and every neighbour on the forwarded record, because one corrupted key
would silently break every mask its owner shares (no recovery can repair that).
Bitmap: bit (i mod 8) of byte (i div 8) is client i; padding bits zero.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from securefed.crypto import aead, shamir
from securefed.errors import MessageRejected

__all__ = [
    "CHECK",
    "COMMIT",
    "KEY",
    "SEALED",
    "SHARE",
    "SIG",
    "Expected",
    "bitmap",
    "check_keys",
    "check_list",
    "key_check",
    "list_header",
    "list_rows",
    "parse_bitmap",
    "parse_records",
    "record_table",
    "records",
    "route_complete",
    "split_bitmap",
]

KEY = 32
SIG = 64
COMMIT = 32
SHARE = shamir.share_size(32)
SEALED = aead.sealed_size(2 * SHARE)
CHECK = 4
_U32 = struct.Struct(">I")
assert SEALED % 4 == 0  # route_complete writes each record's id as a 4-byte word


def key_check(party: int, keys: bytes) -> bytes:
    """CRC-32 of ``id || keys`` (an advertised record without its check), 4 bytes big-endian."""
    return _U32.pack(zlib.crc32(keys, zlib.crc32(_U32.pack(party))))


def check_keys(party: int, record: bytes) -> bytes:
    """The keys of an advertised `record` (``keys || check``) of `party`; MessageRejected if the check fails."""
    keys = record[:-CHECK]
    if key_check(party, keys) != record[-CHECK:]:
        raise MessageRejected("invalid message: corrupted advertised keys")
    return keys


def list_header(m: int) -> bytes:
    """The 4-byte count that opens a list body."""
    return _U32.pack(m)


def records(entries: list[tuple[int, bytes]], prefix: bytes = b"") -> bytes:
    """``prefix || count || (id || payload)*`` with `entries` already sorted by id."""
    out = [prefix, _U32.pack(len(entries))]
    for i, payload in entries:
        out.append(_U32.pack(i))
        out.append(payload)
    return b"".join(out)


def record_table(ids: np.ndarray, payloads: np.ndarray) -> np.ndarray:
    """Records ``id || payload`` as the rows of a uint8 table; `payloads` is a (count, size) uint8 array."""
    table = np.empty((ids.size, 4 + payloads.shape[1]), dtype=np.uint8)
    table[:, :4] = ids.astype(">u4").view(np.uint8).reshape(-1, 4)
    table[:, 4:] = payloads
    return table


class Expected:
    """The ids a reply's record list must carry (ascending), as their wire bytes: the server checks
    every reply of a phase against it (:func:`check_list`). ``Expected(ids)``, or
    ``Expected.all_but(other, i)``: the ids of `other` without its i-th (on the complete graph, one
    list of everyone serves every client)."""

    __slots__ = ("_ids", "_skip", "_u8")

    def __init__(self, ids: np.ndarray) -> None:
        self._ids: np.ndarray | None = ids
        self._u8 = np.frombuffer(ids.astype(">u4").tobytes(), dtype=np.uint8)
        self._skip = -1

    @classmethod
    def all_but(cls, other: Expected, i: int) -> Expected:
        out = cls.__new__(cls)
        out._ids, out._u8, out._skip = None, other._u8, i
        return out

    @property
    def ids(self) -> np.ndarray:
        """The ids, ascending int64."""
        if self._ids is None:
            every = self._u8.view(">u4").astype(np.int64)
            self._ids = np.delete(every, self._skip)
        return self._ids


_loaded = None


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    global _loaded
    if _loaded is None:
        from securefed.protocols.secagg import _wire_kernels

        _loaded = _wire_kernels
    return _loaded


_REASONS = ("", "invalid message: wrong list length", "invalid message: records for the wrong set of clients",
            "invalid share")


def check_list(body: memoryview, payload_size: int, expect: Expected, offset: int = 0, share_words: int = 0) -> None:
    """MessageRejected unless the record list at `offset` ends `body`, carries exactly `expect`'s ids in
    order, and the first `share_words` little-endian uint32 words of every payload are below the Shamir
    prime (one compiled pass: the server's per-reply check). Read it with :func:`list_rows`."""
    status = _kernels().check_list(body, offset, 4 + payload_size, expect._u8, expect._skip, share_words, shamir.PRIME)
    if status:
        raise MessageRejected(_REASONS[status])


def route_complete(records: np.ndarray, place: np.ndarray, senders: np.ndarray) -> np.ndarray:
    """The masked_input request bodies of the complete graph without their count, one per row (uint8):
    row j lists, ordered by sender, ``(sender id, sealed)`` for each share addressed to ``senders[j]``.
    `records` holds every sender's share_keys records (recipient id, sealed), sender after sender, one
    per row; each sender has one for every other advertiser, in id order; `place` is each sender's
    index among the advertisers."""
    n, rec = senders.size, 4 + SEALED
    order = np.empty(n * (n - 1), dtype=np.int64)
    ids = np.empty(n * (n - 1), dtype=np.uint32)
    _kernels().route_complete(place, records.shape[0] // n, senders.astype(">u4").view("<u4"), order, ids)
    out = np.take(records, order, axis=0)  # rows are copied whole: a memcpy each
    out.view("<u4")[:, 0] = ids  # the sender's id where the recipient's was
    return out.reshape(n, (n - 1) * rec)


def list_rows(body: memoryview | bytes, payload_size: int, offset: int = 0) -> np.ndarray:
    """The payloads of a record list already checked, as a (count, payload_size) uint8 view of `body`."""
    count = (len(body) - offset - 4) // (4 + payload_size)
    table = np.frombuffer(body, dtype=np.uint8, count=count * (4 + payload_size), offset=offset + 4)
    return table.reshape(count, 4 + payload_size)[:, 4:]


def parse_records(body: memoryview, payload_size: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Parse a record list at `offset`: (ids as int64, payloads as a (count, payload_size) uint8 view).

    The list must end the body. Raises MessageRejected for a wrong length or ids
    that are not strictly ascending.
    """
    if len(body) < offset + 4:
        raise MessageRejected("invalid message: truncated list")
    (count,) = _U32.unpack_from(body, offset)
    rec = 4 + payload_size
    if len(body) != offset + 4 + count * rec:
        raise MessageRejected("invalid message: wrong list length")
    table = np.frombuffer(body, dtype=np.uint8, count=count * rec, offset=offset + 4).reshape(count, rec)
    ids = table[:, :4].copy().view(">u4").reshape(count).astype(np.int64)
    if count > 1 and not (ids[1:] > ids[:-1]).all():
        raise MessageRejected("invalid message: ids not strictly ascending")
    return ids, table[:, 4:]


def bitmap(members: np.ndarray | list[int], n: int) -> bytes:
    """The n-bit set of `members` (client indices)."""
    bits = np.zeros(((n + 7) // 8) * 8, dtype=np.uint8)
    bits[np.asarray(members, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def parse_bitmap(data: memoryview | bytes, n: int) -> np.ndarray:
    """Members (ascending int64) of an n-bit set; MessageRejected for a wrong length or padding."""
    if len(data) != (n + 7) // 8:
        raise MessageRejected("invalid message: wrong bitmap length")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise MessageRejected("invalid message: non-zero bitmap padding")
    return np.flatnonzero(bits[:n]).astype(np.int64)


def split_bitmap(body: memoryview | bytes, n: int) -> tuple[np.ndarray, memoryview]:
    """A body that opens with an n-bit set (a survivor list): its members and the bytes after it.

    MessageRejected for a body shorter than the set or a malformed set."""
    size = (n + 7) // 8
    if len(body) < size:
        raise MessageRejected("invalid message: truncated survivor list")
    mv = memoryview(body)
    return parse_bitmap(mv[:size], n), mv[size:]
