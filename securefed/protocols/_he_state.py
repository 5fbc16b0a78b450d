"""Saved states of the HE parties (``dump()`` / ``load_client()``; layout in ``protocols/he.md``).

A key holder's state carries its secret key until it has decrypted; after that (or after a
refused request) the key is gone from the state too.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto import kex
from securefed.crypto.random import RandomSource
from securefed.errors import InvalidInput
from securefed.protocols import _he_parties as parties
from securefed.protocols._he_parties import HEClient, HEDecryptor
from securefed.protocols._he_wire import DECRYPTOR_ID, KEY_ID_BYTES, VERSION
from securefed.protocols.base import ClientProtocol, RoundSpec

if TYPE_CHECKING:
    from securefed.protocols.he import _HEProtocol

__all__ = ["F_INNER", "ROLE_CLIENT", "dump", "dump_client", "dump_decryptor", "load_party"]

# tag (the protocol's), version, role, key holder, n, dim, round, session, party id, stage; then fields.
_STATE = struct.Struct(">4sBBBIII32sIB")
_FIELD = struct.Struct(">BQ")
ROLE_CLIENT, _ROLE_DECRYPTOR = 1, 2
_F_VALUES_F8, _F_VALUES_I8, _F_KEX, _F_SECRET, _F_KEY_ID, F_INNER, _F_DEALER = range(1, 8)


def dump(protocol: _HEProtocol, spec: RoundSpec, role: int, party: int, stage: int, fields: dict[int, bytes]) -> bytes:
    """``header || fields``, fields ``u8 key || u64 length || bytes`` in ascending key order."""
    head = _STATE.pack(protocol._TAG, VERSION, role, protocol.key_holders.index(protocol.key_holder), spec.n,
                       spec.dim, spec.round_index, spec.session_id, party, stage)
    return b"".join([head, *(_FIELD.pack(k, len(v)) + v for k, v in sorted(fields.items()))])


def dump_client(c: HEClient) -> bytes:
    fields: dict[int, bytes] = {}
    if c._values is not None:
        fields[_F_VALUES_F8 if c._values.dtype == np.float64 else _F_VALUES_I8] = (
            c._values.astype(c._values.dtype.newbyteorder("<"), copy=False).tobytes())
    if c._kex_key is not None:
        fields[_F_KEX] = kex.private_bytes(c._kex_key)
    if c._secret is not None:
        assert c._key_id is not None
        fields[_F_SECRET], fields[_F_KEY_ID] = c._secret, c._key_id
    if c._dealer:
        fields[_F_DEALER] = b""
    return dump(c._p, c._spec, ROLE_CLIENT, c._id, c._stage, fields)


def dump_decryptor(d: HEDecryptor) -> bytes:
    fields = {} if d._secret is None else {_F_SECRET: d._secret, _F_KEY_ID: d._key_id or b""}
    return dump(d._p, d._spec, _ROLE_DECRYPTOR, DECRYPTOR_ID, d._stage, fields)


def _parse(protocol: _HEProtocol, data: bytes) -> tuple[tuple[Any, ...], dict[int, bytes]]:
    bad = InvalidInput(f"invalid {protocol.name} party state")
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


def load_party(protocol: _HEProtocol, data: bytes, rng: RandomSource) -> ClientProtocol:
    """Restore a client or decryptor from :meth:`dump` bytes; InvalidInput for anything else."""
    bad = InvalidInput(f"invalid {protocol.name} party state")
    (role, _, n, dim, round_index, session, party, stage), fields = _parse(protocol, data)
    try:
        spec = RoundSpec(n=n, dim=dim, session_id=session, round_index=round_index)
    except Exception:  # noqa: BLE001 - any invalid spec is an invalid state
        raise bad from None
    ring = protocol._ring(n)
    clients_mode = protocol.key_holder == "clients"
    has_secret = _F_SECRET in fields and len(fields.get(_F_KEY_ID, b"")) == KEY_ID_BYTES
    if role == _ROLE_DECRYPTOR and party == DECRYPTOR_ID and not clients_mode:
        if set(fields) - {_F_SECRET, _F_KEY_ID} or stage not in (parties.KEYLESS, parties.KEYED, parties.SPENT) \
                or has_secret != (stage == parties.KEYED) or (_F_SECRET in fields) != has_secret:
            raise bad
        dec = HEDecryptor(protocol, spec, ring, rng)
        dec._stage = stage
        if has_secret:
            dec._secret, dec._key_id = fields[_F_SECRET], fields[_F_KEY_ID]
        return dec
    if role != ROLE_CLIENT or not 0 <= party < n or stage > parties.DECRYPTED:
        raise bad
    if protocol.key_holder == "masked":
        from securefed.protocols._he_masked import load_masked_client

        if set(fields) != {F_INNER} or stage not in (0, 1):
            raise bad
        return load_masked_client(protocol, spec, ring, party, stage, fields[F_INNER], rng)  # type: ignore[arg-type]
    return _load_client(protocol, spec, party, stage, fields, rng)


def _load_client(protocol: _HEProtocol, spec: RoundSpec, party: int, stage: int, fields: dict[int, bytes],
                 rng: RandomSource) -> HEClient:
    bad = InvalidInput(f"invalid {protocol.name} party state")
    clients_mode = protocol.key_holder == "clients"
    dealer = _F_DEALER in fields
    has_secret = _F_SECRET in fields and len(fields.get(_F_KEY_ID, b"")) == KEY_ID_BYTES
    want_kex = clients_mode and stage != parties.FRESH
    want_secret = clients_mode and parties.DEALT <= stage < parties.DECRYPTED
    allowed = {_F_VALUES_F8, _F_VALUES_I8, _F_KEX, _F_SECRET, _F_KEY_ID, _F_DEALER}
    if (set(fields) - allowed or (_F_VALUES_F8 in fields and _F_VALUES_I8 in fields)
            or (_F_KEX in fields) != want_kex or has_secret != want_secret or (_F_SECRET in fields) != has_secret
            or dealer != (clients_mode and party == parties.DEALER and stage >= parties.DEALT)
            or fields.get(_F_DEALER, b"") != b"" or (stage in (parties.DEALT, parties.DECRYPTED) and not dealer)
            or (not clients_mode and stage not in (parties.FRESH, parties.UPLOADED))):
        raise bad
    client = HEClient(protocol, spec, protocol._ring(spec.n), party, None, rng)
    for key, dtype in ((_F_VALUES_F8, "<f8"), (_F_VALUES_I8, "<i8")):
        if key in fields:
            raw = fields[key]
            if len(raw) != 8 * spec.dim:
                raise bad
            client._values = np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))
    client._stage, client._dealer = stage, dealer
    if want_kex:
        client._kex_key = kex.load_private_key(fields[_F_KEX])
    if has_secret:
        client._secret, client._key_id = fields[_F_SECRET], fields[_F_KEY_ID]
    return client
