"""The HE server: routes keys, checks and keeps the signed uploads, forwards them to the one key holder.

It never adds ciphertexts itself: the key holder must decrypt only a sum it formed from signed
uploads (``he/auth.py``), so the server's job is to check each upload completely (so a faulty
client is dropped, not the round) and pass the accepted ones on. It keeps the accepted uploads'
bytes until the decrypt request is built (memory: the accepted uploads, nothing loaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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

__all__ = ["HEServer"]


class HEServer(ServerProtocol):
    """Checks uploads as they arrive and forwards the accepted ones to the key holder; holds no secret key."""

    def __init__(self, protocol: HEScheme, spec: RoundSpec, ring: Ring) -> None:
        self._p, self._spec, self._ring = protocol, spec, ring
        self._frame = Framer(protocol, spec)
        self._ids = protocol.directory(spec.n)
        self._clients_mode = protocol.key_holder == "clients"
        self._next = 0  # index of the next phase to open
        self._open: str | None = None
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
            msg = self._frame.message(phase, wire.SERVER, [])
            return dict.fromkeys(range(self._spec.n), msg) if self._clients_mode else {DECRYPTOR: msg}
        if phase == "keys" and self._clients_mode:
            assert self._dealer is not None
            items = [u32(len(self._kex_keys))]
            for c, signed in sorted(self._kex_keys.items()):
                items += [u32(c), signed]
            return {self._dealer: self._frame.message(phase, wire.SERVER, items)}
        if phase == "upload":
            if self._clients_mode:
                assert self._dealer is not None
                tail = [u32(self._dealer), self._kex_keys[self._dealer]]
                return {c: self._frame.message(phase, wire.SERVER, self._public_items() + tail
                                               + [self._sealed.get(c, b"")])
                        for c in self._alive(sorted(self._kex_keys))}
            msg = self._frame.message(phase, wire.SERVER, self._public_items())
            return dict.fromkeys(self._alive(range(self._spec.n)), msg)
        if phase == "decrypt":
            # One key holder per key: two decryptions of different subsets would give their difference.
            if self._clients_mode:
                assert self._dealer is not None
                return {self._dealer: self._aggregate_request()} if self._dealer not in self._dropped else {}
            return {DECRYPTOR: self._aggregate_request()}
        return {}  # "keys" without a dealer; "consistency_check" and "unmasking" outside masked mode

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
        reader = Reader(self._frame.payload(payload, phase, sender_id(party)))
        getattr(self, "_receive_" + phase)(party, reader)

    def _receive_setup(self, party: Party, reader: Reader) -> None:
        tag, s = self._p._TAG, self._spec
        if self._clients_mode:
            pk = bytes(reader.take(kex.KEY_BYTES))
            sig = bytes(reader.take(auth.SIG))
            reader.end()
            auth.verify(self._ids, tag, s, int(party), pk, sig, purpose=auth.KEX)
            self._kex_keys[int(party)] = pk + sig
        else:
            sig = bytes(reader.take(auth.SIG))
            public = bytes(reader.rest())
            auth.verify(self._ids, tag, s, DECRYPTOR_ID, backend.key_id(public), sig, purpose=auth.CONTEXT)
            self._accept_public(public)
            self._public_sig = sig

    def _accept_public(self, public: bytes) -> None:
        self._ctx = backend.load_context(public, self._ring, secret=False)
        self._public, self._key_id = public, backend.key_id(public)

    def _receive_keys(self, party: Party, reader: Reader) -> None:
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
        self._sealed = sealed

    def _receive_upload(self, party: Party, reader: Reader) -> None:
        upload = reader.rest()
        assert self._key_id is not None
        body = auth.check_upload(self._ids, self._p._TAG, self._spec, int(party), upload, self._key_id)
        read_vectors(body, self._ctx, self._ring, self._spec.dim)  # a faulty upload drops its client, not the round
        body.end()
        assert self._uploads is not None
        self._uploads.append((int(party), bytes(upload)))
        self._uploaded.append(int(party))

    def _receive_decrypt(self, party: Party, reader: Reader) -> None:
        released = bytes(reader.rest())
        if len(released) != self._p._released_size(self._spec):
            raise MessageRejected("invalid message: wrong length of the sum")
        self._total = self._p._total(memoryview(released), self._spec, len(self._included))
        self._released = released

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
                if DEALER not in self._kex_keys:
                    # The dealer is fixed (clients refuse any other), so without it nobody can make the key.
                    raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                          f"client {DEALER}, the key dealer of every clients-mode round, did not "
                                          "advertise an exchange key; rerun the round", phase=phase)
                self._dealer = DEALER
            elif self._public is None:
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "the decryptor sent no public key", phase=phase)
        elif phase == "keys" and self._clients_mode and self._public is None:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  f"the key dealer (client {self._dealer}) left before delivering the key; "
                                  "rerun the round", phase=phase)
        elif phase == "upload" and self._clients_mode and self._dealer in self._dropped:
            # Only the dealer decrypts (one key, one decryption): abort before sending anyone's uploads on.
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  f"the key dealer (client {self._dealer}) left before decrypting; rerun the round",
                                  phase=phase)
        elif phase == "upload" and not self._uploaded:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client uploaded an input", phase=phase)
        elif phase == "upload" and len(self._uploaded) < (need := self._p.min_survivors(self._spec.n)):
            # The key holder would refuse: abort before asking it anything.
            raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS, f"only {len(self._uploaded)} uploads arrived; "
                                  f"the round needs {need}", phase=phase)
        elif phase == "decrypt" and self._released is None:
            who = f"the dealer (client {self._dealer})" if self._clients_mode else "the decryptor"
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"{who} did not decrypt the aggregate", phase=phase)

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        if self._total is None or self._open is not None or self._next != len(self._p.phases):
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the decrypt phase finished")
        return check_sum(self._total, len(self._included)), self._included  # finite inputs may overflow it
