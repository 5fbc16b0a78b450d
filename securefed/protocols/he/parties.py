"""The HE client and decryptor state machines (layouts in ``protocols/he.md``, "Messages").

Each party is in one state class at a time (the end of this module, fcp/secagg style): its ``step``
answers the request of a phase and returns the next state; the saved stage number names the state.
Framing is ``he/wire.py``, signatures and the key holder's verified sum ``he/auth.py``, the
server ``he/server.py``, the saved-state format ``he/state.py``. Nothing here is unpickled.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np

from securefed.crypto import aead, kex
from securefed.crypto.random import RandomSource
from securefed.errors import InvalidInput, MessageRejected
from securefed.protocols import wire
from securefed.protocols.base import ClientProtocol, RoundSpec
from securefed.protocols.he import auth, state
from securefed.protocols.he import tenseal as backend
from securefed.protocols.he.contract import HEScheme
from securefed.protocols.he.tenseal import Ring
from securefed.protocols.he.wire import (
    CHECK_BYTES,
    DECRYPTOR,
    DECRYPTOR_ID,
    KEY_ID_BYTES,
    Framer,
    Reader,
    blobs,
    u32,
)

__all__ = [
    "CHECK_BYTES",
    "DEALER",
    "DECRYPTOR",
    "DECRYPTOR_ID",
    "HEClient",
    "HEDecryptor",
    "signed_upload",
    "verified_public",
]

#: The key dealer of a "clients" mode round: client 0, fixed by the round's public data, so that no
#: client deals unless it is client 0 and none accepts another dealer's key. A dealer chosen from the
#: advertisers the server lists (once the lowest) let an active server make every client a dealer of
#: its own key list, and so have n keys and n decryptions in one round (proofs/he.md, H15).
DEALER = 0

#: HKDF label and AEAD purpose of the secret key sent from the dealer to each client ("clients" mode).
_KEY_PURPOSE = "he/secret-key"

# Client stages: what the client has done so far (the state classes below, as the saved state stores them).
FRESH, ADVERTISED, DEALT, UPLOADED, DECRYPTED = range(5)
# Decryptor stages.
KEYLESS, KEYED, SPENT = range(3)


def _out_of_order(phase: str, who: str) -> MessageRejected:
    return MessageRejected(f"invalid message: {phase!r} is out of order for {who}")


def verified_public(protocol: HEScheme, spec: RoundSpec, ring: Ring, reader: Reader) -> tuple[bytes, object]:
    """The decryptor's public context from ``u32 len || context || signature``, and it loaded.

    MessageRejected unless the decryptor signed its key id for this round: otherwise the server
    could hand clients a context whose secret key it holds."""
    public = bytes(reader.blob())
    sig = reader.take(auth.SIG)
    auth.verify(protocol.directory(spec.n), protocol._TAG, spec, DECRYPTOR_ID, backend.key_id(public), sig,
                purpose=auth.CONTEXT)
    return public, backend.load_context(public, ring, secret=False)


def signed_upload(protocol: HEScheme, spec: RoundSpec, client: int, key_id: bytes, parts: list[bytes]) -> list[bytes]:
    """The items of an upload payload: ``signature || key_id || blobs``, signed by `client`."""
    body = [key_id, *blobs(parts)]
    digest = hashlib.sha256()
    for item in body:
        digest.update(item)
    sig = auth.sign(protocol.directory(spec.n), protocol._TAG, spec, client, digest.digest(), purpose=auth.UPLOAD)
    return [sig, *body]


class _Party(ClientProtocol):
    """What the client and the decryptor share: the current state class, saved as its stage number, takes
    each request and returns the reply and the next state (fcp style, ``protocols/he.md`` "States")."""

    _STATES: ClassVar[tuple[Any, ...]]  # stage number -> state class, set below the state classes
    _state: Any
    _p: HEScheme
    _frame: Framer

    @property
    def _stage(self) -> int:
        """The current state as the saved state's stage number."""
        return int(self._state.stage)

    @_stage.setter
    def _stage(self, stage: int) -> None:
        self._state = self._STATES[stage]

    def handle(self, phase: str, request: bytes) -> bytes | None:
        if phase not in self._p.phases:
            raise MessageRejected(f"invalid message: no phase {phase!r}")
        reader = Reader(self._frame.payload(request, phase, wire.SERVER))
        reply, self._state = self._state.step(self, phase, reader)
        return reply


class HEClient(_Party):
    """One client: encrypts its input under the round's public key; in "clients" mode it also holds the key
    and, if it dealt it, decrypts the round's verified sum once."""

    def __init__(self, protocol: HEScheme, spec: RoundSpec, ring: Ring, client: int, x: np.ndarray | None,
                 rng: RandomSource) -> None:
        self._p, self._spec, self._ring, self._id, self._rng = protocol, spec, ring, client, rng
        self._frame = Framer(protocol, spec)
        self._values: np.ndarray | None = None
        self._state: type[_ClientState] = _Fresh
        self._kex_key: kex.X25519PrivateKey | None = None
        self._secret: bytes | None = None  # secret-only context ("clients" mode, once the key arrived)
        self._key_id: bytes | None = None
        self._dealer = False  # whether this client (client 0) made the key (and is the round's only decrypter)
        if x is not None:
            self.set_input(x)

    def set_input(self, x: np.ndarray) -> None:
        """Check and encode `x`: InvalidInput for a wrong shape or dtype, NaN/Inf or a value out of range."""
        self._values = self._p._prepare(x, self._spec, self._rng)

    def _advertise(self, reader: Reader) -> bytes:
        """Setup in "clients" mode: a fresh exchange key, signed, for the dealer to seal the secret key to."""
        reader.end()
        self._kex_key = kex.generate_private_key(self._rng.child("he/kex"))
        pk = kex.public_bytes(self._kex_key)
        sig = auth.sign(self._p.directory(self._spec.n), self._p._TAG, self._spec, self._id, pk, purpose=auth.KEX)
        return self._frame.message("setup", self._id, [pk, sig])

    def _decrypt(self, reader: Reader) -> bytes:
        """The dealer's one decryption of the verified sum; the key is spent before anything is checked, so a
        refused request is no retry."""
        secret, key_id = self._secret, self._key_id
        assert secret is not None and key_id is not None
        self._state, self._secret = _Decrypted, None
        released, _ = auth.decrypt_verified(self._p, self._spec, self._ring, secret, key_id, reader)
        return self._frame.message("decrypt", self._id, [released])

    def _deal(self, reader: Reader) -> bytes:
        """The dealer (client 0, always) makes the key and seals the secret part to every other client listed."""
        assert self._kex_key is not None
        if self._id != DEALER:
            raise MessageRejected(f"invalid message: only client {DEALER} deals the key of a round")
        s, ids = self._spec, self._p.directory(self._spec.n)
        count = reader.u32()
        peers = {}
        for _ in range(count):
            j = reader.u32()
            pk = bytes(reader.take(kex.KEY_BYTES))
            sig = reader.take(auth.SIG)
            if j >= s.n or j in peers:
                raise MessageRejected("invalid message: client list out of range or repeated")
            auth.verify(ids, self._p._TAG, s, j, pk, sig, purpose=auth.KEX)  # else the server gets the key
            peers[j] = pk
        reader.end()
        if peers.get(self._id) != kex.public_bytes(self._kex_key):
            raise MessageRejected("invalid message: the key list lacks this client's own exchange key")
        ctx = backend.new_context(self._ring)
        public = backend.public_bytes(ctx)
        self._secret, self._key_id = backend.secret_bytes(ctx), backend.key_id(public)
        items = [u32(len(public)), public, u32(len(peers) - 1)]
        for j, pk in sorted(peers.items()):
            if j == self._id:
                continue
            key = kex.agree(self._kex_key, pk, label=_KEY_PURPOSE, session_id=s.session_id, party_a=self._id, party_b=j)
            sealed = aead.seal(key, self._key_id + self._secret, purpose=_KEY_PURPOSE, session_id=s.session_id,
                               round_index=s.round_index, sender=self._id, recipient=j, rng=self._rng)
            items += [u32(j), u32(len(sealed)), sealed]
        return self._frame.message("keys", self._id, items)

    def _receive_key(self, dealer: int, dealer_pk: bytes, sealed: memoryview) -> None:
        assert self._kex_key is not None
        s = self._spec
        key = kex.agree(self._kex_key, dealer_pk, label=_KEY_PURPOSE, session_id=s.session_id,
                        party_a=dealer, party_b=self._id)
        plain = aead.open_sealed(key, sealed, purpose=_KEY_PURPOSE, session_id=s.session_id,
                                 round_index=s.round_index, sender=dealer, recipient=self._id)
        self._key_id, self._secret = plain[:KEY_ID_BYTES], plain[KEY_ID_BYTES:]
        backend.load_context(self._secret, self._ring, secret=True)  # refuse a malformed key now

    def _public_context(self, reader: Reader) -> tuple[bytes, object]:
        """The round's public context, authenticated: signed by the decryptor, or sealed by the signed dealer."""
        if self._p.key_holder != "clients":
            return verified_public(self._p, self._spec, self._ring, reader)
        public = bytes(reader.blob())
        dealer = reader.u32()
        dealer_pk = bytes(reader.take(kex.KEY_BYTES))
        dealer_sig = reader.take(auth.SIG)
        sealed = reader.rest()
        if self._state is _Dealt:
            if dealer != self._id or len(sealed):
                raise MessageRejected("invalid message: the dealer gets no sealed key")
        elif self._id == DEALER:
            raise MessageRejected(f"invalid message: client {DEALER} uploads only under the key it dealt")
        elif dealer != DEALER:
            raise MessageRejected(f"invalid message: the key of a round is client {DEALER}'s, not client {dealer}'s")
        elif not len(sealed):
            raise MessageRejected("invalid message: no sealed key for this client")
        else:
            auth.verify(self._p.directory(self._spec.n), self._p._TAG, self._spec, dealer, dealer_pk, dealer_sig,
                        purpose=auth.KEX)  # else the server could deal its own key
            self._receive_key(dealer, dealer_pk, sealed)
        if backend.key_id(public) != self._key_id:
            raise MessageRejected("invalid message: the public context is not the dealer's")
        return public, backend.load_context(public, self._ring, secret=False)

    def _upload(self, reader: Reader) -> bytes:
        if self._values is None:
            raise InvalidInput("no input vector: call set_input before the upload phase")
        public, ctx = self._public_context(reader)
        reader.end()
        parts = backend.encrypt_chunks(ctx, self._ring, self._values)
        self._values = None  # encrypted and sent: a model-sized copy the client no longer needs
        items = signed_upload(self._p, self._spec, self._id, backend.key_id(public), parts)
        return self._frame.message("upload", self._id, items)

    def dump(self) -> bytes:
        fields: dict[int, bytes] = {}
        if self._values is not None:
            fields[state.F_VALUES_F8 if self._values.dtype == np.float64 else state.F_VALUES_I8] = (
                self._values.astype(self._values.dtype.newbyteorder("<"), copy=False).tobytes())
        if self._kex_key is not None:
            fields[state.F_KEX] = kex.private_bytes(self._kex_key)
        if self._secret is not None:
            assert self._key_id is not None
            fields[state.F_SECRET], fields[state.F_KEY_ID] = self._secret, self._key_id
        if self._dealer:
            fields[state.F_DEALER] = b""
        return state.dump(self._p, self._spec, state.ROLE_CLIENT, self._id, self._stage, fields)

    @classmethod
    def from_state(cls, protocol: HEScheme, spec: RoundSpec, party: int, stage: int, fields: dict[int, bytes],
                   rng: RandomSource) -> HEClient:
        """The client that :meth:`dump` saved; InvalidInput for fields that do not fit its mode and stage."""
        clients_mode = protocol.key_holder == "clients"
        dealer = state.F_DEALER in fields
        has_secret = state.F_SECRET in fields and len(fields.get(state.F_KEY_ID, b"")) == KEY_ID_BYTES
        want_kex = clients_mode and stage != FRESH
        want_secret = clients_mode and DEALT <= stage < DECRYPTED
        allowed = {state.F_VALUES_F8, state.F_VALUES_I8, state.F_KEX, state.F_SECRET, state.F_KEY_ID, state.F_DEALER}
        if (set(fields) - allowed or (state.F_VALUES_F8 in fields and state.F_VALUES_I8 in fields)
                or (state.F_KEX in fields) != want_kex or has_secret != want_secret
                or (state.F_SECRET in fields) != has_secret
                or dealer != (clients_mode and party == DEALER and stage >= DEALT)
                or fields.get(state.F_DEALER, b"") != b"" or (stage in (DEALT, DECRYPTED) and not dealer)
                or (not clients_mode and stage not in (FRESH, UPLOADED))):
            raise state.invalid(protocol)
        client = cls(protocol, spec, protocol._ring(spec.n), party, None, rng)
        for key, dtype in ((state.F_VALUES_F8, "<f8"), (state.F_VALUES_I8, "<i8")):
            if key in fields:
                raw = fields[key]
                if len(raw) != 8 * spec.dim:
                    raise state.invalid(protocol)
                client._values = np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))
        client._stage, client._dealer = stage, dealer
        if want_kex:
            client._kex_key = kex.load_private_key(fields[state.F_KEX])
        if has_secret:
            client._secret, client._key_id = fields[state.F_SECRET], fields[state.F_KEY_ID]
        return client


class HEDecryptor(_Party):
    """The separate key holder: makes a fresh key pair per round and decrypts one verified sum, once."""

    def __init__(self, protocol: HEScheme, spec: RoundSpec, ring: Ring, rng: RandomSource) -> None:
        self._p, self._spec, self._ring, self._rng = protocol, spec, ring, rng
        self._frame = Framer(protocol, spec)
        self._state: type[_DecryptorState] = _Keyless
        self._secret: bytes | None = None
        self._key_id: bytes | None = None

    def _make_key(self, reader: Reader) -> bytes:
        """Setup: a fresh key pair; the public context goes out with the signature on its key id."""
        reader.end()
        ctx = backend.new_context(self._ring)
        public = backend.public_bytes(ctx)
        self._secret, self._key_id = backend.secret_bytes(ctx), backend.key_id(public)
        sig = auth.sign(self._p.directory(self._spec.n), self._p._TAG, self._spec, DECRYPTOR_ID, self._key_id,
                        purpose=auth.CONTEXT)
        return self._frame.message("setup", DECRYPTOR_ID, [sig, public])

    def _decrypt(self, reader: Reader) -> bytes:
        """One decryption per round, the key spent before anything is checked: a refused request is no retry."""
        secret, key_id = self._secret, self._key_id
        assert secret is not None and key_id is not None
        self._state, self._secret = _Spent, None
        released, _ = auth.decrypt_verified(self._p, self._spec, self._ring, secret, key_id, reader)
        return self._frame.message("decrypt", DECRYPTOR_ID, [released])

    def dump(self) -> bytes:
        fields = {} if self._secret is None else {state.F_SECRET: self._secret, state.F_KEY_ID: self._key_id or b""}
        return state.dump(self._p, self._spec, state.ROLE_DECRYPTOR, DECRYPTOR_ID, self._stage, fields)

    @classmethod
    def from_state(cls, protocol: HEScheme, spec: RoundSpec, stage: int, fields: dict[int, bytes],
                   rng: RandomSource) -> HEDecryptor:
        """The decryptor that :meth:`dump` saved: its key while it has not decrypted, else none."""
        has_secret = state.F_SECRET in fields and len(fields.get(state.F_KEY_ID, b"")) == KEY_ID_BYTES
        if set(fields) - {state.F_SECRET, state.F_KEY_ID} or stage not in (KEYLESS, KEYED, SPENT) \
                or has_secret != (stage == KEYED) or (state.F_SECRET in fields) != has_secret:
            raise state.invalid(protocol)
        dec = cls(protocol, spec, protocol._ring(spec.n), rng)
        dec._stage = stage
        if has_secret:
            dec._secret, dec._key_id = fields[state.F_SECRET], fields[state.F_KEY_ID]
        return dec


# -- states (fcp/secagg style): each takes its phase's request and returns (reply, next state) ---------------

class _ClientState:
    """What an HE client has done so far; ``step`` answers the request of `phase` or refuses it out of order
    (a refused request leaves the state as it was, except a decryption, which is spent first)."""

    stage: ClassVar[int]

    @staticmethod
    def step(c: HEClient, phase: str, reader: Reader) -> tuple[bytes, type[_ClientState]]:
        raise _out_of_order(phase, "this client")


class _Fresh(_ClientState):
    stage = FRESH

    @staticmethod
    def step(c: HEClient, phase: str, reader: Reader) -> tuple[bytes, type[_ClientState]]:
        clients_mode = c._p.key_holder == "clients"
        if phase == "setup" and clients_mode:
            return c._advertise(reader), _Advertised
        if phase == "upload" and not clients_mode:
            return c._upload(reader), _Uploaded
        raise _out_of_order(phase, "this client")


class _Advertised(_ClientState):
    stage = ADVERTISED

    @staticmethod
    def step(c: HEClient, phase: str, reader: Reader) -> tuple[bytes, type[_ClientState]]:
        if phase == "keys":
            reply = c._deal(reader)
            c._dealer = True
            return reply, _Dealt
        if phase == "upload":
            return c._upload(reader), _Uploaded
        raise _out_of_order(phase, "this client")


class _Dealt(_ClientState):
    stage = DEALT

    @staticmethod
    def step(c: HEClient, phase: str, reader: Reader) -> tuple[bytes, type[_ClientState]]:
        if phase == "upload":
            return c._upload(reader), _Uploaded
        raise _out_of_order(phase, "this client")


class _Uploaded(_ClientState):
    stage = UPLOADED

    @staticmethod
    def step(c: HEClient, phase: str, reader: Reader) -> tuple[bytes, type[_ClientState]]:
        if phase == "decrypt" and c._p.key_holder == "clients" and c._dealer:
            return c._decrypt(reader), _Decrypted
        raise _out_of_order(phase, "this client")


class _Decrypted(_ClientState):
    stage = DECRYPTED


_CLIENT_STATES: tuple[type[_ClientState], ...] = (_Fresh, _Advertised, _Dealt, _Uploaded, _Decrypted)
HEClient._STATES = _CLIENT_STATES


class _DecryptorState:
    """What the decryptor has done so far: keyless, keyed (holds the round's secret key), spent."""

    stage: ClassVar[int]

    @staticmethod
    def step(d: HEDecryptor, phase: str, reader: Reader) -> tuple[bytes, type[_DecryptorState]]:
        raise _out_of_order(phase, "the decryptor")


class _Keyless(_DecryptorState):
    stage = KEYLESS

    @staticmethod
    def step(d: HEDecryptor, phase: str, reader: Reader) -> tuple[bytes, type[_DecryptorState]]:
        if phase == "setup":
            return d._make_key(reader), _Keyed
        raise _out_of_order(phase, "the decryptor")


class _Keyed(_DecryptorState):
    stage = KEYED

    @staticmethod
    def step(d: HEDecryptor, phase: str, reader: Reader) -> tuple[bytes, type[_DecryptorState]]:
        if phase == "decrypt":
            return d._decrypt(reader), _Spent
        raise _out_of_order(phase, "the decryptor")


class _Spent(_DecryptorState):
    stage = SPENT


_DECRYPTOR_STATES: tuple[type[_DecryptorState], ...] = (_Keyless, _Keyed, _Spent)
HEDecryptor._STATES = _DECRYPTOR_STATES
