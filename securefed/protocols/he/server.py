"""The HE server: routes keys, checks and keeps the signed uploads, forwards them to the one key holder.

It never adds ciphertexts itself: the key holder must decrypt only a sum it formed from signed
uploads (``he/auth.py``), so the server's job is to check each upload completely (so a faulty
client is dropped, not the round) and pass the accepted ones on. It keeps the accepted uploads'
bytes until the decrypt request is built (memory: the accepted uploads, nothing loaded).

:class:`HEServer` is a thin facade over one state class per phase (fcp/secagg style): each state
builds its phase's requests, takes its replies and, when the phase closes, checks what the round
needs and returns the next state; the facade checks the phase order and records drops with their
:class:`DropReason`. See ``protocols/he.md`` (server).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from securefed.crypto import kex
from securefed.encoding.fixedpoint import check_sum
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import (
    DropReason,
    DropRecord,
    Party,
    RoundSpec,
    ServerProtocol,
)
from securefed.protocols.he import auth
from securefed.protocols.he import tenseal as backend
from securefed.protocols.he.contract import HEScheme
from securefed.protocols.he.parties import DEALER
from securefed.protocols.he.tenseal import Ring
from securefed.protocols.he.wire import (
    DECRYPTOR,
    DECRYPTOR_ID,
    Framer,
    Reader,
    read_vectors,
    sender_id,
    u32,
)

__all__ = [
    "Aborted",
    "AwaitingKeys",
    "AwaitingSetup",
    "AwaitingSum",
    "AwaitingUploads",
    "Done",
    "HEServer",
    "NothingToCheck",
    "NothingToUnmask",
    "ServerState",
    "following",
]


class HEServer(ServerProtocol):
    """Checks uploads as they arrive and forwards the accepted ones to the key holder; holds no secret key.

    ``_state`` is the current phase's state class (``AwaitingSetup`` ... ``Done``, or ``Aborted``)."""

    def __init__(self, protocol: HEScheme, spec: RoundSpec, ring: Ring) -> None:
        self._p, self._spec, self._ring = protocol, spec, ring
        self._frame = Framer(protocol, spec)
        self._ids = protocol.directory(spec.n)
        self._clients_mode = protocol.key_holder == "clients"
        self._state: type[ServerState] = AwaitingSetup
        self._open = False  # whether the state's phase has been opened by requests()
        self._aborted: ProtocolAborted | None = None
        self._asked: set[Party] = set()
        self._answered: set[Party] = set()
        self._dropped: dict[int, DropRecord] = {}
        self._public: bytes | None = None
        self._public_sig = b""
        self._ctx: Any = None
        self._key_id: bytes | None = None
        self._kex_keys: dict[int, bytes] = {}  # client -> X25519 key || its signature
        self._dealer: int | None = None
        self._sealed: dict[int, bytes] = {}
        self._uploads: list[tuple[int, bytes]] | None = []
        self._uploaded: list[int] = []
        self._included: tuple[int, ...] = ()
        self._released: bytes | None = None
        self._total: np.ndarray | None = None

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        return self._dropped

    @property
    def public_context(self) -> bytes | None:
        """The serialized public context the server holds (no secret key), once setup is done."""
        return self._public

    def _alive(self, candidates: Sequence[int]) -> list[int]:
        return [c for c in candidates if c not in self._dropped]

    def _live(self) -> None:
        if self._state is Aborted:
            assert self._aborted is not None
            raise self._aborted

    def requests(self, phase: str) -> Mapping[Party, bytes]:
        self._live()
        if self._open or phase != self._state.phase or phase not in self._p.phases:  # Done's phase is none
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"requests({phase!r}) out of order", phase=phase)
        self._open, self._answered = True, set()
        out = self._state.requests(self)
        self._asked = set(out)
        return out

    def _public_items(self) -> list[bytes]:
        """``u32 len || public context``, then the decryptor's signature on it (not in clients mode)."""
        assert self._public is not None
        return [u32(len(self._public)), self._public] + ([] if self._clients_mode else [self._public_sig])

    def _aggregate_request(self) -> bytes:
        """The decrypt request: each accepted upload with its client id, ascending; the server lets go of them."""
        assert self._uploads is not None
        uploads, self._uploads = sorted(self._uploads), None
        self._included = tuple(c for c, _ in uploads)
        items = [u32(len(uploads))]
        for c, up in uploads:
            items += [u32(c), u32(len(up)), up]
        return self._frame.message("decrypt", wire.SERVER, items)

    def _reader(self, party: Party, payload: bytes) -> Reader:
        """The body of `party`'s message of the open phase (MessageRejected for a bad frame)."""
        return Reader(self._frame.payload(payload, self._state.phase, sender_id(party)))

    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        self._live()
        try:
            if not self._open or phase != self._state.phase or party not in self._asked:
                raise MessageRejected("invalid message: out of phase or unknown sender")
            if party in self._answered:
                raise MessageRejected("invalid message: replayed")
            if party in self._dropped:  # a rejected reply dropped it: a later one must not include it again
                raise MessageRejected(f"invalid message: client {party} was dropped from the round")
            self._state.receive(self, party, payload)
        except MessageRejected as e:
            if isinstance(party, int) and party in self._asked and party not in self._answered:
                self._dropped.setdefault(party, DropRecord(phase, DropReason.REJECTED, str(e)))
            raise
        self._answered.add(party)

    def _accept_public(self, public: bytes) -> None:
        self._ctx = backend.load_context(public, self._ring, secret=False)
        self._public, self._key_id = public, backend.key_id(public)

    def finish_phase(self, phase: str) -> None:
        self._live()
        if not self._open or phase != self._state.phase:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"finish_phase({phase!r}) out of order", phase=phase)
        for party in self._asked - self._answered:
            if isinstance(party, int):
                self._dropped.setdefault(party, DropRecord(phase, DropReason.NO_REPLY))
        self._open = False
        try:
            self._state = self._state.finish(self)
        except ProtocolAborted as e:
            self._state, self._aborted = Aborted, e
            raise

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        self._live()
        if self._total is None or self._state is not Done:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the decrypt phase finished")
        return check_sum(self._total, len(self._included)), self._included  # finite inputs may overflow it


class ServerState:
    """One phase of the HE server: its requests, its replies, and the next state when it closes."""

    phase: ClassVar[str]

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        return {}

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        raise MessageRejected("invalid message: out of phase or unknown sender")

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        raise NotImplementedError


class AwaitingSetup(ServerState):
    """setup: every client's signed exchange key ("clients" mode), or the decryptor's signed public context."""

    phase = "setup"

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        msg = s._frame.message("setup", wire.SERVER, [])
        return dict.fromkeys(range(s._spec.n), msg) if s._clients_mode else {DECRYPTOR: msg}

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        reader, tag = s._reader(party, payload), s._p._TAG
        if s._clients_mode:
            pk = bytes(reader.take(kex.KEY_BYTES))
            sig = bytes(reader.take(auth.SIG))
            reader.end()
            auth.verify(s._ids, tag, s._spec, int(party), pk, sig, purpose=auth.KEX)
            s._kex_keys[int(party)] = pk + sig
        else:
            sig = bytes(reader.take(auth.SIG))
            public = bytes(reader.rest())
            auth.verify(s._ids, tag, s._spec, DECRYPTOR_ID, backend.key_id(public), sig, purpose=auth.CONTEXT)
            s._accept_public(public)
            s._public_sig = sig

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        if s._clients_mode:
            if not s._kex_keys:
                raise ProtocolAborted(AbortReason.NO_INPUTS, "no client advertised a key", phase="setup")
            if DEALER not in s._kex_keys:
                # The dealer is fixed (clients refuse any other), so without it nobody can make the key.
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                      f"client {DEALER}, the key dealer of every clients-mode round, did not "
                                      "advertise an exchange key; rerun the round", phase="setup")
            s._dealer = DEALER
        elif s._public is None:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "the decryptor sent no public key", phase="setup")
        return AwaitingKeys


class AwaitingKeys(ServerState):
    """keys ("clients" mode; nobody is asked otherwise): the dealer's public context and sealed secret keys."""

    phase = "keys"

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        if not s._clients_mode:
            return {}
        assert s._dealer is not None
        items = [u32(len(s._kex_keys))]
        for c, signed in sorted(s._kex_keys.items()):
            items += [u32(c), signed]
        return {s._dealer: s._frame.message("keys", wire.SERVER, items)}

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        reader = s._reader(party, payload)
        public = bytes(reader.blob())
        count = reader.u32()
        sealed = {}
        for _ in range(count):
            j = reader.u32()
            sealed[j] = bytes(reader.blob())
        reader.end()
        if set(sealed) != set(s._kex_keys) - {party}:
            raise MessageRejected("invalid message: sealed keys do not match the advertised clients")
        s._accept_public(public)
        s._sealed = sealed

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        if s._clients_mode and s._public is None:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  f"the key dealer (client {s._dealer}) left before delivering the key; "
                                  "rerun the round", phase="keys")
        return AwaitingUploads


class AwaitingUploads(ServerState):
    """upload: each client's signed ciphertexts, checked completely as they arrive and kept as bytes."""

    phase = "upload"

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        if s._clients_mode:
            assert s._dealer is not None
            tail = [u32(s._dealer), s._kex_keys[s._dealer]]
            return {c: s._frame.message("upload", wire.SERVER, s._public_items() + tail + [s._sealed.get(c, b"")])
                    for c in s._alive(sorted(s._kex_keys))}
        msg = s._frame.message("upload", wire.SERVER, s._public_items())
        return dict.fromkeys(s._alive(range(s._spec.n)), msg)

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        upload = s._reader(party, payload).rest()
        assert s._key_id is not None
        body = auth.check_upload(s._ids, s._p._TAG, s._spec, int(party), upload, s._key_id)
        read_vectors(body, s._ctx, s._ring, s._spec.dim)  # a faulty upload drops its client, not the round
        body.end()
        assert s._uploads is not None
        s._uploads.append((int(party), bytes(upload)))
        s._uploaded.append(int(party))

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        if s._clients_mode and s._dealer in s._dropped:
            # Only the dealer decrypts (one key, one decryption): abort before sending anyone's uploads on.
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  f"the key dealer (client {s._dealer}) left before decrypting; rerun the round",
                                  phase="upload")
        if not s._uploaded:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client uploaded an input", phase="upload")
        if len(s._uploaded) < (need := s._p.min_survivors(s._spec.n)):
            # The key holder would refuse: abort before asking it anything.
            raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS, f"only {len(s._uploaded)} uploads arrived; "
                                  f"the round needs {need}", phase="upload")
        return AwaitingSum


class AwaitingSum(ServerState):
    """decrypt: the one key holder gets every accepted upload and releases their verified sum, once."""

    phase = "decrypt"

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        # One key holder per key: two decryptions of different subsets would give their difference.
        if s._clients_mode:
            assert s._dealer is not None
            return {s._dealer: s._aggregate_request()} if s._dealer not in s._dropped else {}
        return {DECRYPTOR: s._aggregate_request()}

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        released = bytes(s._reader(party, payload).rest())
        if len(released) != s._p._released_size(s._spec):
            raise MessageRejected("invalid message: wrong length of the sum")
        s._total = s._p._total(memoryview(released), s._spec, len(s._included))
        s._released = released

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        if s._released is None:
            who = f"the dealer (client {s._dealer})" if s._clients_mode else "the decryptor"
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"{who} did not decrypt the aggregate", phase="decrypt")
        return following(s, "decrypt")


def following(s: HEServer, phase: str) -> type[ServerState]:
    """The state after `phase`: a phase where this server asks nobody (BFV's masking phases outside masked
    mode), or Done after the protocol's last phase."""
    phases = s._p.phases
    later = phases[phases.index(phase) + 1 :]
    return _IDLE[later[0]] if later else Done


class NothingToCheck(ServerState):
    """consistency_check outside masked mode: nobody is asked, nothing is checked."""

    phase = "consistency_check"

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        return following(s, "consistency_check")


class NothingToUnmask(ServerState):
    """unmasking outside masked mode: nobody is asked, the decrypted sum is the result."""

    phase = "unmasking"

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        return following(s, "unmasking")


class Done(ServerState):
    """Every phase closed: ``result()`` returns the sum."""

    phase = ""


class Aborted(ServerState):
    """The round cannot finish safely: every call raises the abort again."""

    phase = ""


_IDLE: dict[str, type[ServerState]] = {"consistency_check": NothingToCheck, "unmasking": NothingToUnmask}
