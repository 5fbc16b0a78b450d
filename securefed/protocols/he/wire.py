"""Message framing and strict parsing shared by the HE parties (layouts in ``protocols/he.md``).

Messages are ``header || CRC-32(payload) || payload`` (the header of ``protocols/wire.md``);
the checksum catches corruption in transit, which a ciphertext cannot reveal by itself (a
flipped bit is usually still a valid ciphertext of another value). Authentication is the
signatures' job (``he/auth.py``).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from securefed.errors import MessageRejected
from securefed.protocols import wire
from securefed.protocols.base import Party, RoundSpec
from securefed.protocols.he import tenseal as backend
from securefed.protocols.he.contract import HEScheme
from securefed.protocols.he.tenseal import Ring

__all__ = [
    "CHECK_BYTES",
    "DECRYPTOR",
    "DECRYPTOR_ID",
    "KEY_ID_BYTES",
    "VERSION",
    "Framer",
    "Reader",
    "blobs",
    "read_ids",
    "read_vectors",
    "sender_id",
    "u32",
]

#: Name of the auxiliary key-holding party, and its sender id in message headers and the identity directory.
DECRYPTOR = "decryptor"
DECRYPTOR_ID = 0xFFFFFFFE
#: Layout version 2: signed uploads, signed public contexts and key-exchange keys, uploads forwarded to the key holder.
VERSION = 2
#: Bytes of the CRC-32 that starts every body, and of a key id (SHA-256 of a public context).
CHECK_BYTES = 4
KEY_ID_BYTES = 32
_U32 = struct.Struct(">I")


def sender_id(party: Party) -> int:
    """The header sender id of `party` (a client index or the decryptor)."""
    return DECRYPTOR_ID if party == DECRYPTOR else int(party)


def u32(value: int) -> bytes:
    return _U32.pack(value)


class Framer:
    """Headers and checksums for one round of one HE protocol."""

    def __init__(self, protocol: HEScheme, spec: RoundSpec) -> None:
        self._tag, self._phases, self._spec = protocol._TAG, protocol.phases, spec

    def message(self, phase: str, sender: int, items: Sequence[bytes]) -> bytes:
        crc = 0
        for item in items:
            crc = zlib.crc32(item, crc)
        length = CHECK_BYTES + sum(len(i) for i in items)
        s = self._spec
        head = wire.pack_header(self._tag, VERSION, self._phases.index(phase), s.round_index, s.session_id,
                                 sender, length)
        return b"".join([head, _U32.pack(crc), *items])

    def payload(self, data: bytes, phase: str, sender: int) -> memoryview:
        s = self._spec
        body = wire.unpack_message(data, tag=self._tag, version=VERSION, phase=self._phases.index(phase),
                                    round_index=s.round_index, session_id=s.session_id, sender=sender)
        if len(body) < CHECK_BYTES or _U32.unpack_from(body)[0] != zlib.crc32(body[CHECK_BYTES:]):
            raise MessageRejected("invalid message: checksum mismatch")
        return body[CHECK_BYTES:]


class Reader:
    """Strict sequential parsing of a payload; any shortfall or leftover is MessageRejected."""

    def __init__(self, mv: memoryview) -> None:
        self._mv, self._off = mv, 0

    def u32(self) -> int:
        if self._off + 4 > len(self._mv):
            raise MessageRejected("invalid message: truncated")
        (v,) = _U32.unpack_from(self._mv, self._off)
        self._off += 4
        return v

    def take(self, size: int) -> memoryview:
        if size < 0 or self._off + size > len(self._mv):
            raise MessageRejected("invalid message: truncated")
        out = self._mv[self._off : self._off + size]
        self._off += size
        return out

    def blob(self) -> memoryview:
        return self.take(self.u32())

    def rest(self) -> memoryview:
        return self.take(len(self._mv) - self._off)

    def end(self) -> None:
        if self._off != len(self._mv):
            raise MessageRejected("invalid message: trailing bytes")


def blobs(parts: Sequence[bytes]) -> list[bytes]:
    """``u32 count || (u32 length || part)*`` as a list of pieces (joined once, in the header)."""
    out = [u32(len(parts))]
    for p in parts:
        out += [u32(len(p)), p]
    return out


def read_vectors(reader: Reader, ctx: Any, ring: Ring, dim: int) -> list[Any]:
    """Exactly one ciphertext per chunk of a `dim`-vector, each loaded and checked."""
    chunks = ring.chunks(dim)
    if reader.u32() != len(chunks):
        raise MessageRejected("invalid message: wrong number of ciphertexts")
    return [backend.load_chunk(ctx, ring, bytes(reader.blob()), hi - lo) for lo, hi in chunks]


def read_ids(reader: Reader, n: int) -> tuple[int, ...]:
    """``u32 m || m x u32`` client ids: 1 <= m <= n, strictly ascending, each below n."""
    count = reader.u32()
    if not 1 <= count <= n:
        raise MessageRejected("invalid message: bad client count")
    ids = tuple(reader.u32() for _ in range(count))
    if any(b <= a for a, b in itertools.pairwise(ids)) or ids[-1] >= n:
        raise MessageRejected("invalid message: client list not ascending or out of range")
    return ids
