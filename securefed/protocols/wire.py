"""The common header of every protocol message (layout in ``protocols/wire.md``).

    magic    4 bytes  protocol tag, e.g. b"SFPL"
    version  1 byte   layout version of that protocol
    phase    1 byte   index of the phase in the protocol's ``phases``
    round    4 bytes  round index, big-endian
    session 32 bytes  the round's session id (public round randomness)
    sender   4 bytes  sender id, big-endian; 0xFFFFFFFF is the server
    length   4 bytes  length of the body that follows, big-endian

Parsing is strict: any mismatch (tag, version, phase, round, session, sender,
length) raises MessageRejected, which is how replays from another round or
session and out-of-phase messages are refused.
"""

from __future__ import annotations

import struct

from securefed.errors import MessageRejected

__all__ = ["HEADER_SIZE", "SERVER", "body", "header_prefix", "pack_header", "split_message", "unpack_message"]

SERVER = 0xFFFFFFFF
_HDR = struct.Struct(">4sBBI32sII")
_PREFIX = struct.Struct(">4sBBI32sI")  # the header without its length
_LENGTH = struct.Struct(">I")
HEADER_SIZE = _HDR.size


def pack_header(
    tag: bytes, version: int, phase: int, round_index: int, session_id: bytes, sender: int, body_len: int
) -> bytes:
    """The header for a body of `body_len` bytes."""
    return _HDR.pack(tag, version, phase, round_index, session_id, sender, body_len)


def unpack_message(
    data: bytes | bytearray | memoryview,
    *,
    tag: bytes,
    version: int,
    phase: int,
    round_index: int,
    session_id: bytes,
    sender: int,
) -> memoryview:
    """Check the header of `data` against what is expected; return the body (a view, no copy)."""
    return split_message(data, header_prefix(tag, version, phase, round_index, session_id, sender))


def header_prefix(tag: bytes, version: int, phase: int, round_index: int, session_id: bytes, sender: int) -> bytes:
    """The header's first bytes, everything but the body length: what :func:`split_message` expects."""
    return _PREFIX.pack(tag, version, phase, round_index, session_id, sender)


def split_message(data: bytes | bytearray | memoryview, prefix: bytes) -> memoryview:
    """:func:`unpack_message` with the expected fields packed by :func:`header_prefix`: one comparison
    of bytes (the check a server runs on every reply) instead of unpacking them."""
    if isinstance(data, bytes):
        head = data
    elif isinstance(data, (bytearray, memoryview)):
        data = memoryview(data)
        head = bytes(data[:HEADER_SIZE])
    else:
        raise MessageRejected("invalid message: not bytes")
    size = len(data)
    if size < HEADER_SIZE:
        raise MessageRejected("invalid message: truncated header")
    if not head.startswith(prefix):
        raise MessageRejected("invalid message: wrong protocol, version, phase, round, session or sender")
    if _LENGTH.unpack_from(head, _PREFIX.size)[0] != size - HEADER_SIZE:
        raise MessageRejected("invalid message: wrong length")
    return memoryview(data)[HEADER_SIZE:]


def body(message: bytes) -> bytes:
    """The body of `message`, its header unchecked: for harnesses that read a transcript they recorded.

    A party receiving a message uses :func:`unpack_message` or :func:`split_message` instead."""
    return bytes(message[HEADER_SIZE:])
