"""Saved states of the HE parties (``dump()`` / ``load_client()``; layout in ``protocols/he.md``).

The format only: each party class writes its own fields (``dump()``) and checks them when it is
restored (``from_state()``), so this module knows no party and every party module can import it.

A key holder's state carries its secret key until it has decrypted; after that (or after a
refused request) the key is gone from the state too.
"""

from __future__ import annotations

import struct
from typing import Any

from securefed.errors import InvalidInput
from securefed.protocols.base import RoundSpec
from securefed.protocols.he.contract import HEScheme
from securefed.protocols.he.wire import VERSION

__all__ = [
    "F_DEALER",
    "F_INNER",
    "F_KEX",
    "F_KEY_ID",
    "F_SECRET",
    "F_VALUES_F8",
    "F_VALUES_I8",
    "ROLE_CLIENT",
    "ROLE_DECRYPTOR",
    "dump",
    "invalid",
    "parse",
]

# tag (the protocol's), version, role, key holder, n, dim, round, session, party id, stage; then fields.
_STATE = struct.Struct(">4sBBBIII32sIB")
_FIELD = struct.Struct(">BQ")
ROLE_CLIENT, ROLE_DECRYPTOR = 1, 2
F_VALUES_F8, F_VALUES_I8, F_KEX, F_SECRET, F_KEY_ID, F_INNER, F_DEALER = range(1, 8)


def dump(protocol: HEScheme, spec: RoundSpec, role: int, party: int, stage: int, fields: dict[int, bytes]) -> bytes:
    """``header || fields``, fields ``u8 key || u64 length || bytes`` in ascending key order."""
    head = _STATE.pack(protocol._TAG, VERSION, role, protocol.key_holders.index(protocol.key_holder), spec.n,
                       spec.dim, spec.round_index, spec.session_id, party, stage)
    return b"".join([head, *(_FIELD.pack(k, len(v)) + v for k, v in sorted(fields.items()))])


def invalid(protocol: HEScheme) -> InvalidInput:
    """The one error of every state that is not a dump of `protocol`'s parties."""
    return InvalidInput(f"invalid {protocol.name} party state")


def _parse(protocol: HEScheme, data: bytes) -> tuple[tuple[Any, ...], dict[int, bytes]]:
    bad = invalid(protocol)
    mv = memoryview(data)
    if len(mv) < _STATE.size:
        raise bad
    head = _STATE.unpack_from(mv)
    tag, version, _, holder = head[:4]
    if (tag, version) != (protocol._TAG, VERSION) or holder != protocol.key_holders.index(protocol.key_holder):
        raise bad
    fields: dict[int, bytes] = {}
    off = _STATE.size
    while off < len(mv):
        if off + _FIELD.size > len(mv):
            raise bad
        key, size = _FIELD.unpack_from(mv, off)
        off += _FIELD.size
        if key in fields or (fields and key < max(fields)) or off + size > len(mv):
            raise bad
        fields[key] = bytes(mv[off : off + size])
        off += size
    return head[2:], fields


def parse(protocol: HEScheme, data: bytes) -> tuple[int, RoundSpec, int, int, dict[int, bytes]]:
    """``(role, spec, party, stage, fields)`` of :func:`dump` bytes; InvalidInput for anything else.

    The fields are only split here: each party's ``from_state`` checks that they fit its role and stage."""
    (role, _, n, dim, round_index, session, party, stage), fields = _parse(protocol, data)
    try:
        spec = RoundSpec(n=n, dim=dim, session_id=session, round_index=round_index)
    except Exception:  # noqa: BLE001 - any invalid spec is an invalid state
        raise invalid(protocol) from None
    return role, spec, party, stage, fields
