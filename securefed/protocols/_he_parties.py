"""The parties of the HE protocols: client, decryptor and server state machines, and their saved states.

Messages are ``header || CRC-32(payload) || payload`` (the header of ``protocols/wire.md``);
the checksum catches corruption in transit, which a ciphertext cannot reveal by itself (a
flipped bit is usually still a valid ciphertext of another value). It is not authentication:
that is the transport's job. Payload layouts,
stage by stage, are in ``protocols/he.md`` ("Messages"). Nothing here is unpickled.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto import aead, kex
from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, InvalidInput, MessageRejected, ProtocolAborted
from securefed.protocols import _he_tenseal as backend
from securefed.protocols import _wire
from securefed.protocols._he_tenseal import Ring
from securefed.protocols.base import ClientProtocol, DropReason, DropRecord, Party, RoundSpec, ServerProtocol

if TYPE_CHECKING:
    from securefed.protocols.he import _HEProtocol

__all__ = ["DECRYPTOR", "HEClient", "HEDecryptor", "HEServer", "load_party"]

#: Name of the auxiliary key-holding party, and its sender id in message headers.
DECRYPTOR = "decryptor"
DECRYPTOR_ID = 0xFFFFFFFE

_VERSION = 1
#: Bytes of the CRC-32 that starts every body, and of a key id (SHA-256 of a public context).
CHECK_BYTES = 4
_KEY_ID = 32
_U32 = struct.Struct(">I")
#: HKDF label and AEAD purpose of the secret key sent from the dealer to each client ("clients" mode).
_KEY_PURPOSE = "he/secret-key"


def _sender_id(party: Party) -> int:
    return DECRYPTOR_ID if party == DECRYPTOR else int(party)


class _Framer:
    """Headers and checksums for one round of one HE protocol."""

    def __init__(self, protocol: _HEProtocol, spec: RoundSpec) -> None:
        self._tag, self._phases, self._spec = protocol._TAG, protocol.phases, spec

    def message(self, phase: str, sender: int, items: Sequence[bytes]) -> bytes:
        crc = 0
        for item in items:
            crc = zlib.crc32(item, crc)
        length = CHECK_BYTES + sum(len(i) for i in items)
        s = self._spec
        head = _wire.pack_header(self._tag, _VERSION, self._phases.index(phase), s.round_index, s.session_id,
                                 sender, length)
        return b"".join([head, _U32.pack(crc), *items])

    def payload(self, data: bytes, phase: str, sender: int) -> memoryview:
        s = self._spec
        body = _wire.unpack_message(data, tag=self._tag, version=_VERSION, phase=self._phases.index(phase),
                                    round_index=s.round_index, session_id=s.session_id, sender=sender)
        if len(body) < CHECK_BYTES or _U32.unpack_from(body)[0] != zlib.crc32(body[CHECK_BYTES:]):
            raise MessageRejected("invalid message: checksum mismatch")
        return body[CHECK_BYTES:]


def _u32(value: int) -> bytes:
    return _U32.pack(value)


class _Reader:
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


def _blobs(parts: Sequence[bytes]) -> list[bytes]:
    """``u32 count || (u32 length || part)*`` as a list of pieces (joined once, in the header)."""
    out = [_u32(len(parts))]
    for p in parts:
        out += [_u32(len(p)), p]
    return out


def _read_vectors(reader: _Reader, ctx: Any, ring: Ring, dim: int) -> list[Any]:
    """Exactly one ciphertext per chunk of a `dim`-vector, each loaded and checked."""
    chunks = ring.chunks(dim)
    if reader.u32() != len(chunks):
        raise MessageRejected("invalid message: wrong number of ciphertexts")
    return [backend.load_chunk(ctx, ring, bytes(reader.blob()), hi - lo) for lo, hi in chunks]


def _read_ids(reader: _Reader, n: int) -> tuple[int, ...]:
    count = reader.u32()
    if not 1 <= count <= n:
        raise MessageRejected("invalid message: bad client count")
    ids = tuple(reader.u32() for _ in range(count))
    if any(b <= a for a, b in zip(ids, ids[1:])) or ids[-1] >= n:
        raise MessageRejected("invalid message: client list not ascending or out of range")
    return ids


def _decrypt(protocol: _HEProtocol, spec: RoundSpec, ring: Ring, ctx: Any, reader: _Reader, count: int) -> bytes:
    """Decrypt the aggregate of `count` uploads in a decrypt request; what the key holder releases."""
    vecs = _read_vectors(reader, ctx, ring, spec.dim)
    reader.end()
    values = np.empty(spec.dim, dtype=np.float64 if ring.scheme == "ckks" else np.int64)
    for (lo, hi), vec in zip(ring.chunks(spec.dim), vecs):
        values[lo:hi] = backend.decrypt_chunk(vec)
    return protocol._release(values, spec, count)


# -- client --------------------------------------------------------------------------------

# Client stages: what the client has done so far.
_FRESH, _ADVERTISED, _DEALT, _UPLOADED, _DECRYPTED = range(5)


class HEClient(ClientProtocol):
    """One client: encrypts its input under the round's public key; in "clients" mode it also holds the key."""

    def __init__(self, protocol: _HEProtocol, spec: RoundSpec, ring: Ring, client: int, x: np.ndarray | None,
                 rng: RandomSource) -> None:
        self._p, self._spec, self._ring, self._id, self._rng = protocol, spec, ring, client, rng
        self._frame = _Framer(protocol, spec)
        self._values: np.ndarray | None = None
        self._stage = _FRESH
        self._kex_key: kex.X25519PrivateKey | None = None
        self._secret: bytes | None = None  # secret-only context ("clients" mode, once the key arrived)
        self._key_id: bytes | None = None
        if x is not None:
            self.set_input(x)

    def set_input(self, x: np.ndarray) -> None:
        """Check and encode `x`: InvalidInput for a wrong shape or dtype, NaN/Inf or a value out of range."""
        self._values = self._p._prepare(x, self._spec, self._rng)

    def handle(self, phase: str, request: bytes) -> bytes | None:
        if phase not in self._p.phases:
            raise MessageRejected(f"invalid message: no phase {phase!r}")
        reader = _Reader(self._frame.payload(request, phase, _wire.SERVER))
        clients_mode = self._p.key_holder == "clients"
        if phase == "setup" and clients_mode and self._stage == _FRESH:
            reader.end()
            self._kex_key = kex.generate_private_key(self._rng.child("he/kex"))
            self._stage = _ADVERTISED
            return self._frame.message(phase, self._id, [kex.public_bytes(self._kex_key)])
        if phase == "keys" and clients_mode and self._stage == _ADVERTISED:
            return self._deal(reader)
        if phase == "upload" and self._stage in ((_ADVERTISED, _DEALT) if clients_mode else (_FRESH,)):
            return self._upload(reader)
        if phase == "decrypt" and clients_mode and self._stage == _UPLOADED:
            ids = _read_ids(reader, self._spec.n)
            if self._id not in ids:
                raise MessageRejected("invalid message: asked to decrypt an aggregate without this client")
            assert self._secret is not None
            ctx = backend.load_context(self._secret, self._ring, secret=True)
            released = _decrypt(self._p, self._spec, self._ring, ctx, reader, len(ids))
            self._stage = _DECRYPTED
            return self._frame.message(phase, self._id, [released])
        raise MessageRejected(f"invalid message: {phase!r} is out of order for this client")

    def _deal(self, reader: _Reader) -> bytes:
        """The dealer (lowest-index advertiser) makes the key and seals the secret part to every other client."""
        assert self._kex_key is not None
        count = reader.u32()
        peers = {}
        for _ in range(count):
            j = reader.u32()
            peers[j] = bytes(reader.take(kex.KEY_BYTES))
        reader.end()
        mine = kex.public_bytes(self._kex_key)
        if peers.get(self._id) != mine or min(peers) != self._id or max(peers) >= self._spec.n:
            raise MessageRejected("invalid message: this client is not the dealer of this key list")
        ctx = backend.new_context(self._ring)
        public = backend.public_bytes(ctx)
        self._secret, self._key_id = backend.secret_bytes(ctx), backend.key_id(public)
        s = self._spec
        items = [_u32(len(public)), public, _u32(len(peers) - 1)]
        for j, pk in sorted(peers.items()):
            if j == self._id:
                continue
            key = kex.agree(self._kex_key, pk, label=_KEY_PURPOSE, session_id=s.session_id, party_a=self._id, party_b=j)
            sealed = aead.seal(key, self._key_id + self._secret, purpose=_KEY_PURPOSE, session_id=s.session_id,
                               round_index=s.round_index, sender=self._id, recipient=j, rng=self._rng)
            items += [_u32(j), _u32(len(sealed)), sealed]
        self._stage = _DEALT
        return self._frame.message("keys", self._id, items)

    def _receive_key(self, dealer: int, dealer_pk: bytes, sealed: memoryview) -> None:
        assert self._kex_key is not None
        s = self._spec
        key = kex.agree(self._kex_key, dealer_pk, label=_KEY_PURPOSE, session_id=s.session_id,
                        party_a=dealer, party_b=self._id)
        plain = aead.open_sealed(key, sealed, purpose=_KEY_PURPOSE, session_id=s.session_id,
                                 round_index=s.round_index, sender=dealer, recipient=self._id)
        self._key_id, self._secret = plain[:_KEY_ID], plain[_KEY_ID:]
        backend.load_context(self._secret, self._ring, secret=True)  # refuse a malformed key now

    def _upload(self, reader: _Reader) -> bytes:
        if self._values is None:
            raise InvalidInput("no input vector: call set_input before the upload phase")
        public = bytes(reader.blob())
        if self._p.key_holder == "clients":
            dealer = reader.u32()
            dealer_pk = bytes(reader.take(kex.KEY_BYTES))
            sealed = reader.rest()
            if self._stage == _DEALT:
                if dealer != self._id or len(sealed):
                    raise MessageRejected("invalid message: the dealer gets no sealed key")
            elif dealer == self._id or not len(sealed):
                raise MessageRejected("invalid message: no sealed key for this client")
            else:
                self._receive_key(dealer, dealer_pk, sealed)
            if backend.key_id(public) != self._key_id:
                raise MessageRejected("invalid message: the public context is not the dealer's")
        reader.end()
        ctx = backend.load_context(public, self._ring, secret=False)
        kid = backend.key_id(public)
        parts = backend.encrypt_chunks(ctx, self._ring, self._values)
        self._values = None  # encrypted and sent: a model-sized copy the client no longer needs
        self._stage = _UPLOADED
        return self._frame.message("upload", self._id, [kid, *_blobs(parts)])

    def dump(self) -> bytes:
        fields: dict[int, bytes] = {}
        if self._values is not None:
            fields[_F_VALUES_F8 if self._values.dtype == np.float64 else _F_VALUES_I8] = (
                self._values.astype(self._values.dtype.newbyteorder("<"), copy=False).tobytes())
        if self._kex_key is not None:
            fields[_F_KEX] = kex.private_bytes(self._kex_key)
        if self._secret is not None:
            assert self._key_id is not None
            fields[_F_SECRET], fields[_F_KEY_ID] = self._secret, self._key_id
        return _dump(self._p, self._spec, _ROLE_CLIENT, self._id, self._stage, fields)


# -- decryptor ------------------------------------------------------------------------------

# Decryptor stages.
_KEYLESS, _KEYED, _SPENT = range(3)


class HEDecryptor(ClientProtocol):
    """The separate key holder: makes a fresh key pair per round and decrypts one aggregate, once."""

    def __init__(self, protocol: _HEProtocol, spec: RoundSpec, ring: Ring, rng: RandomSource) -> None:
        self._p, self._spec, self._ring, self._rng = protocol, spec, ring, rng
        self._frame = _Framer(protocol, spec)
        self._stage = _KEYLESS
        self._secret: bytes | None = None
        self._key_id: bytes | None = None

    def handle(self, phase: str, request: bytes) -> bytes | None:
        if phase not in self._p.phases:
            raise MessageRejected(f"invalid message: no phase {phase!r}")
        reader = _Reader(self._frame.payload(request, phase, _wire.SERVER))
        if phase == "setup" and self._stage == _KEYLESS:
            reader.end()
            ctx = backend.new_context(self._ring)
            public = backend.public_bytes(ctx)
            self._secret, self._key_id = backend.secret_bytes(ctx), backend.key_id(public)
            self._stage = _KEYED
            return self._frame.message(phase, DECRYPTOR_ID, [public])
        if phase == "decrypt" and self._stage == _KEYED:
            ids = _read_ids(reader, self._spec.n)
            assert self._secret is not None
            ctx = backend.load_context(self._secret, self._ring, secret=True)
            released = _decrypt(self._p, self._spec, self._ring, ctx, reader, len(ids))
            self._stage = _SPENT  # one decryption per round: a second request is refused
            return self._frame.message(phase, DECRYPTOR_ID, [released])
        raise MessageRejected(f"invalid message: {phase!r} is out of order for the decryptor")

    def dump(self) -> bytes:
        fields = {} if self._secret is None else {_F_SECRET: self._secret, _F_KEY_ID: self._key_id or b""}
        return _dump(self._p, self._spec, _ROLE_DECRYPTOR, DECRYPTOR_ID, self._stage, fields)


# -- server --------------------------------------------------------------------------------


class HEServer(ServerProtocol):
    """Adds uploads one at a time into one encrypted accumulator (memory O(dim)); holds no secret key."""

    def __init__(self, protocol: _HEProtocol, spec: RoundSpec, ring: Ring) -> None:
        self._p, self._spec, self._ring = protocol, spec, ring
        self._frame = _Framer(protocol, spec)
        self._clients_mode = protocol.key_holder == "clients"
        self._next = 0  # index of the next phase to open
        self._open: str | None = None
        self._asked: set[Party] = set()
        self._answered: set[Party] = set()
        self._dropped: dict[int, DropRecord] = {}
        self._public: bytes | None = None
        self._ctx: Any = None
        self._key_id: bytes | None = None
        self._kex_keys: dict[int, bytes] = {}
        self._dealer: int | None = None
        self._dealer_pk = b""
        self._sealed: dict[int, bytes] = {}
        self._acc: list[Any] | None = None
        self._uploaded: list[int] = []
        self._included: tuple[int, ...] = ()
        self._released: bytes | None = None
        self._total: np.ndarray | None = None
        self._conflict = False

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        return self._dropped

    @property
    def public_context(self) -> bytes | None:
        """The serialized public context the server holds (no secret key), once setup is done."""
        return self._public

    def _alive(self, candidates: Sequence[int]) -> list[int]:
        return [c for c in candidates if c not in self._dropped]

    def requests(self, phase: str) -> Mapping[Party, bytes]:
        phases = self._p.phases
        if self._open is not None or self._next >= len(phases) or phase != phases[self._next]:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"requests({phase!r}) out of order", phase=phase)
        self._open, self._answered = phase, set()
        out = self._build_requests(phase)
        self._asked = set(out)
        return out

    def _build_requests(self, phase: str) -> dict[Party, bytes]:
        if phase == "setup":
            msg = self._frame.message(phase, _wire.SERVER, [])
            return {c: msg for c in range(self._spec.n)} if self._clients_mode else {DECRYPTOR: msg}
        if phase == "keys" and self._clients_mode:
            assert self._dealer is not None
            items = [_u32(len(self._kex_keys))]
            for c, pk in sorted(self._kex_keys.items()):
                items += [_u32(c), pk]
            return {self._dealer: self._frame.message(phase, _wire.SERVER, items)}
        if phase == "upload":
            if self._clients_mode:
                tail = [_u32(self._dealer or 0), self._dealer_pk]
                return {c: self._frame.message(phase, _wire.SERVER, self._public_items() + tail
                                               + [self._sealed.get(c, b"")])
                        for c in self._alive(sorted(self._kex_keys))}
            msg = self._frame.message(phase, _wire.SERVER, self._public_items())
            return {c: msg for c in self._alive(range(self._spec.n))}
        if phase == "decrypt":
            msg = self._aggregate_request()
            return {c: msg for c in self._alive(self._included)} if self._clients_mode else {DECRYPTOR: msg}
        return {}  # "keys" without a dealer; "consistency_check" and "unmasking" outside masked mode

    def _public_items(self) -> list[bytes]:
        assert self._public is not None
        return [_u32(len(self._public)), self._public]

    def _aggregate_request(self) -> bytes:
        """The decrypt request: the included clients and the aggregate; the accumulator is released."""
        assert self._acc is not None
        self._included = tuple(sorted(self._uploaded))
        items = [_u32(len(self._included)), *(_u32(c) for c in self._included),
                 *_blobs([v.serialize() for v in self._acc])]
        self._acc = None  # the aggregate now lives in the request; keep one copy
        return self._frame.message("decrypt", _wire.SERVER, items)

    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        try:
            if phase != self._open or party not in self._asked:
                raise MessageRejected("invalid message: out of phase or unknown sender")
            if party in self._answered:
                raise MessageRejected("invalid message: replayed")
            self._dispatch(phase, party, payload)
        except MessageRejected as e:
            if isinstance(party, int) and party in self._asked and party not in self._answered:
                self._dropped.setdefault(party, DropRecord(phase, DropReason.REJECTED, str(e)))
            raise
        self._answered.add(party)

    def _dispatch(self, phase: str, party: Party, payload: bytes) -> None:
        reader = _Reader(self._frame.payload(payload, phase, _sender_id(party)))
        getattr(self, "_receive_" + phase)(party, reader)

    def _receive_setup(self, party: Party, reader: _Reader) -> None:
        if self._clients_mode:
            self._kex_keys[int(party)] = bytes(reader.take(kex.KEY_BYTES))
            reader.end()
        else:
            self._accept_public(bytes(reader.rest()))

    def _accept_public(self, public: bytes) -> None:
        self._ctx = backend.load_context(public, self._ring, secret=False)
        self._public, self._key_id = public, backend.key_id(public)

    def _receive_keys(self, party: Party, reader: _Reader) -> None:
        public = bytes(reader.blob())
        count = reader.u32()
        sealed = {}
        for _ in range(count):
            j = reader.u32()
            sealed[j] = bytes(reader.blob())
        reader.end()
        if set(sealed) != set(self._kex_keys) - {party}:
            raise MessageRejected("invalid message: sealed keys do not match the advertised clients")
        self._accept_public(public)
        self._sealed, self._dealer_pk = sealed, self._kex_keys[int(party)]

    def _receive_upload(self, party: Party, reader: _Reader) -> None:
        if bytes(reader.take(_KEY_ID)) != self._key_id:
            raise MessageRejected("invalid message: encrypted under another key")
        vecs = _read_vectors(reader, self._ctx, self._ring, self._spec.dim)
        reader.end()
        # Everything is checked before the first addition: a rejected upload leaves the sum untouched.
        if self._acc is None:
            self._acc = vecs
        else:
            for acc, vec in zip(self._acc, vecs):
                acc.add_(vec)
        self._uploaded.append(int(party))

    def _receive_decrypt(self, party: Party, reader: _Reader) -> None:
        released = bytes(reader.rest())
        if len(released) != self._p._released_size(self._spec):
            raise MessageRejected("invalid message: wrong length of the sum")
        if self._released is None:
            self._total = self._p._total(memoryview(released), self._spec, len(self._included))
            self._released = released
        elif released != self._released:
            self._conflict = True  # two key holders disagree: no sum is trustworthy
            raise MessageRejected("invalid message: decryption differs from another key holder's")

    def finish_phase(self, phase: str) -> None:
        if phase != self._open:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"finish_phase({phase!r}) out of order", phase=phase)
        for party in self._asked - self._answered:
            if isinstance(party, int):
                self._dropped.setdefault(party, DropRecord(phase, DropReason.NO_REPLY))
        self._open, self._next = None, self._next + 1
        self._close(phase)

    def _close(self, phase: str) -> None:
        if phase == "setup":
            if self._clients_mode:
                if not self._kex_keys:
                    raise ProtocolAborted(AbortReason.NO_INPUTS, "no client advertised a key", phase=phase)
                self._dealer = min(self._kex_keys)
            elif self._public is None:
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "the decryptor sent no public key", phase=phase)
        elif phase == "keys" and self._clients_mode and self._public is None:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  f"the key dealer (client {self._dealer}) left before delivering the key; "
                                  "rerun the round", phase=phase)
        elif phase == "upload" and not self._uploaded:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client uploaded an input", phase=phase)
        elif phase == "decrypt":
            if self._conflict:
                raise ProtocolAborted(AbortReason.CONSISTENCY_CHECK_FAILED,
                                      "key holders returned different sums", phase=phase)
            if self._released is None:
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "no key holder decrypted the aggregate",
                                      phase=phase)

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        if self._total is None or self._open is not None or self._next != len(self._p.phases):
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the decrypt phase finished")
        return self._total, self._included


# -- saved states ------------------------------------------------------------------------------

# tag (the protocol's), version, role, key holder, n, dim, round, session, party id, stage; then fields.
_STATE = struct.Struct(">4sBBBIII32sIB")
_FIELD = struct.Struct(">BQ")
_ROLE_CLIENT, _ROLE_DECRYPTOR = 1, 2
_F_VALUES_F8, _F_VALUES_I8, _F_KEX, _F_SECRET, _F_KEY_ID, _F_INNER = range(1, 7)


def _dump(protocol: _HEProtocol, spec: RoundSpec, role: int, party: int, stage: int, fields: dict[int, bytes]) -> bytes:
    head = _STATE.pack(protocol._TAG, _VERSION, role, protocol.key_holders.index(protocol.key_holder), spec.n,
                       spec.dim, spec.round_index, spec.session_id, party, stage)
    return b"".join([head, *(_FIELD.pack(k, len(v)) + v for k, v in sorted(fields.items()))])


def load_party(protocol: _HEProtocol, data: bytes, rng: RandomSource) -> ClientProtocol:
    """Restore a client or decryptor from :meth:`dump` bytes; InvalidInput for anything else."""
    bad = InvalidInput(f"invalid {protocol.name} party state")
    mv = memoryview(data)
    if len(mv) < _STATE.size:
        raise bad
    tag, version, role, holder, n, dim, round_index, session, party, stage = _STATE.unpack_from(mv)
    if (tag, version) != (protocol._TAG, _VERSION) or holder != protocol.key_holders.index(protocol.key_holder):
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
    try:
        spec = RoundSpec(n=n, dim=dim, session_id=session, round_index=round_index)
    except Exception:  # noqa: BLE001 - any invalid spec is an invalid state
        raise bad from None
    ring = protocol._ring(n)
    clients_mode = protocol.key_holder == "clients"
    has_secret = _F_SECRET in fields and len(fields.get(_F_KEY_ID, b"")) == _KEY_ID
    if role == _ROLE_DECRYPTOR and party == DECRYPTOR_ID and not clients_mode:
        if set(fields) - {_F_SECRET, _F_KEY_ID} or stage not in (_KEYLESS, _KEYED, _SPENT) \
                or has_secret != (stage != _KEYLESS):
            raise bad
        dec = HEDecryptor(protocol, spec, ring, rng)
        dec._stage = stage
        if has_secret:
            dec._secret, dec._key_id = fields[_F_SECRET], fields[_F_KEY_ID]
        return dec
    if role != _ROLE_CLIENT or not 0 <= party < n or stage > _DECRYPTED:
        raise bad
    if protocol.key_holder == "masked":
        from securefed.protocols._he_masked import load_masked_client

        if set(fields) != {_F_INNER} or stage not in (0, 1):
            raise bad
        return load_masked_client(protocol, spec, ring, party, stage, fields[_F_INNER], rng)  # type: ignore[arg-type]
    want_kex = clients_mode and stage != _FRESH
    want_secret = clients_mode and stage >= _DEALT
    allowed = {_F_VALUES_F8, _F_VALUES_I8, _F_KEX, _F_SECRET, _F_KEY_ID}
    if (set(fields) - allowed or (_F_VALUES_F8 in fields and _F_VALUES_I8 in fields)
            or (_F_KEX in fields) != want_kex or has_secret != want_secret or (_F_SECRET in fields) != has_secret
            or (not clients_mode and stage not in (_FRESH, _UPLOADED))):
        raise bad
    client = HEClient(protocol, spec, ring, party, None, rng)
    for key, dtype in ((_F_VALUES_F8, "<f8"), (_F_VALUES_I8, "<i8")):
        if key in fields:
            raw = fields[key]
            if len(raw) != 8 * dim:
                raise bad
            client._values = np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))
    client._stage = stage
    if want_kex:
        client._kex_key = kex.load_private_key(fields[_F_KEX])
    if has_secret:
        client._secret, client._key_id = fields[_F_SECRET], fields[_F_KEY_ID]
    return client
