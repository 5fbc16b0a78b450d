"""Canonical byte encoding of party identifiers for key derivation and associated data."""

from __future__ import annotations

import struct

__all__ = ["party_bytes"]

_U32 = struct.Struct(">I")


def party_bytes(party: int | str) -> bytes:
    """``b"i" + uint32`` for a client index, ``b"s" + length + UTF-8`` for a named party.

    Injective, so two different parties never derive the same key or associated data.
    """
    if isinstance(party, bool):
        raise TypeError("a party is an int in [0, 2**32) or a non-empty str, not a bool")
    if isinstance(party, int):
        if not 0 <= party < 2**32:
            raise ValueError(f"a client index must be in [0, 2**32), got {party}")
        return b"i" + _U32.pack(party)
    if isinstance(party, str) and party:
        raw = party.encode()
        if len(raw) > 255:
            raise ValueError("a party name must be at most 255 UTF-8 bytes")
        return b"s" + bytes([len(raw)]) + raw
    raise TypeError(f"a party is an int in [0, 2**32) or a non-empty str, got {party!r}")
