"""BFV with SecAgg+ masks inside the plaintext (``key_holder="masked"``): client and server.

A masking protocol (``SecAggPlus`` or ``SecAgg``) runs unchanged inside BFV's phases; its
messages travel as the payload of HE messages. Phase by phase:

    setup              SecAgg advertise_keys, and the decryptor's public context
    keys               SecAgg share_keys
    upload             SecAgg masked_input: the client masks its encoding modulo 2^k as SecAgg
                       does, then encrypts the masked vector (centered) under BFV instead of
                       sending it; the server adds ciphertexts
    decrypt            the decryptor releases the masked sum modulo 2^k
    consistency_check  SecAgg consistency_check (active adversary only)
    unmasking          SecAgg unmasking: the server removes the masks from the released sum

The server hands the masking server the released masked sum as the masked input of the
lowest included client and zeros for the others (the same modular sum), just before it
closes SecAgg's masked_input phase. See ``protocols/he.md`` ("Masked mode").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.encoding.packing import packed_size, unpack
from securefed.errors import AbortReason, InvalidInput, MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import ClientProtocol, DropRecord, Party, RoundSpec
from securefed.protocols.he import state
from securefed.protocols.he import tenseal as backend
from securefed.protocols.he.contract import MaskedScheme
from securefed.protocols.he.parties import signed_upload, verified_public
from securefed.protocols.he.server import AwaitingSetup, AwaitingSum, AwaitingUploads, Done, HEServer, ServerState
from securefed.protocols.he.tenseal import Ring
from securefed.protocols.he.wire import DECRYPTOR, Framer, Reader, sender_id
from securefed.protocols.secagg import round as secagg_round
from securefed.protocols.secagg.packed import column_pack, column_unpack

__all__ = ["INNER_PHASE", "MaskedClient", "MaskedServer"]

#: The masking protocol's phase carried by each HE phase.
INNER_PHASE = {
    "setup": "advertise_keys",
    "keys": "share_keys",
    "upload": "masked_input",
    "consistency_check": "consistency_check",
    "unmasking": "unmasking",
}
_OUTER_PHASE = {inner: outer for outer, inner in INNER_PHASE.items()}


def _masked_vector(masking: Any, spec: RoundSpec, client: int, message: bytes) -> np.ndarray:
    """The masked vector inside the masking protocol's masked_input message, as uint64 mod 2^k."""
    body = wire.unpack_message(message, tag=masking._TAG, version=secagg_round.VERSION,
                                phase=secagg_round.MASKED_INPUT, round_index=spec.round_index,
                                session_id=spec.session_id, sender=client)
    return column_unpack(body, masking.encoder.modulus_bits(spec.n), spec.dim).astype(np.uint64)


class MaskedClient(ClientProtocol):
    """A client of masked BFV: a masking client inside, BFV encryption of its masked input."""

    def __init__(self, protocol: MaskedScheme, spec: RoundSpec, ring: Ring, client: int, inner: ClientProtocol) -> None:
        self._p, self._spec, self._ring, self._id, self._inner = protocol, spec, ring, client, inner
        self._frame = Framer(protocol, spec)
        self._uploaded = False

    def set_input(self, x: np.ndarray) -> None:
        """Encode `x` (InvalidInput for a wrong shape or dtype, NaN/Inf or a value out of range)."""
        self._inner.set_input(x)

    def handle(self, phase: str, request: bytes) -> bytes | None:
        if phase not in INNER_PHASE:
            raise MessageRejected(f"invalid message: {phase!r} is out of order for this client")
        payload = self._frame.payload(request, phase, wire.SERVER)
        if phase != "upload":
            reply = self._inner.handle(INNER_PHASE[phase], bytes(payload))
            return None if reply is None else self._frame.message(phase, self._id, [reply])
        if self._uploaded:
            raise MessageRejected("invalid message: this client already uploaded")
        reader = Reader(payload)
        public, ctx = verified_public(self._p, self._spec, self._ring, reader)
        inner_request = bytes(reader.rest())
        inner_reply = self._inner.handle("masked_input", inner_request)
        assert inner_reply is not None, "a SecAgg client answers masked_input or raises"
        masked = _masked_vector(self._p.masking, self._spec, self._id, inner_reply)
        values = self._p._center(masked, self._spec)
        parts = backend.encrypt_chunks(ctx, self._ring, values)
        self._uploaded = True
        return self._frame.message(phase, self._id, signed_upload(self._p, self._spec, self._id,
                                                                  backend.key_id(public), parts))

    def dump(self) -> bytes:
        return state.dump(self._p, self._spec, state.ROLE_CLIENT, self._id, int(self._uploaded),
                          {state.F_INNER: self._inner.dump()})

    @classmethod
    def from_state(cls, protocol: MaskedScheme, spec: RoundSpec, party: int, stage: int, fields: dict[int, bytes],
                   rng: RandomSource) -> MaskedClient:
        """The masked client that :meth:`dump` saved; InvalidInput for a state that is not one."""
        if set(fields) != {state.F_INNER} or stage not in (0, 1):
            raise state.invalid(protocol)
        try:
            inner = protocol.masking.load_client(fields[state.F_INNER], rng=rng.child("masking"))
        except (MessageRejected, ProtocolAborted, ValueError):
            raise state.invalid(protocol) from None
        client = cls(protocol, spec, protocol._ring(spec.n), party, inner)
        client._uploaded = bool(stage)
        return client


class MaskedServer(HEServer):
    """Adds BFV ciphertexts of masked inputs; a masking server routes keys and shares and unmasks.

    Its states (below) relay the masking protocol's phases to the masking server and reuse the HE
    server's for the uploads and the decryption."""

    def __init__(self, protocol: MaskedScheme, spec: RoundSpec, ring: Ring, rng: RandomSource) -> None:
        super().__init__(protocol, spec, ring)
        self._masking = protocol.masking
        self._inner = self._masking.server(spec, rng=rng)
        self._result: tuple[np.ndarray, tuple[int, ...]] | None = None
        self._state = _MaskedSetup

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        """Each client's first drop, in HE phase names (the masking server's and this server's)."""
        phases = self._p.phases
        out = {c: DropRecord(_OUTER_PHASE[r.phase], r.reason, r.detail) for c, r in self._inner.dropped.items()}
        for c, r in self._dropped.items():
            if c not in out or phases.index(r.phase) <= phases.index(out[c].phase):
                out[c] = r
        return out

    def _relay_requests(self, phase: str) -> dict[Party, bytes]:
        """The masking server's requests of `phase`'s inner phase, each as the payload of an HE message."""
        inner = self._inner.requests(INNER_PHASE[phase])
        return {c: self._frame.message(phase, wire.SERVER, [r]) for c, r in inner.items()}

    def _relay_reply(self, phase: str, party: Party, payload: bytes) -> None:
        message = bytes(self._frame.payload(payload, phase, sender_id(party)))
        self._inner.receive(INNER_PHASE[phase], party, message)  # it records its own drops

    def _feed_masked_sum(self) -> None:
        """The masking server sums masked inputs mod 2^k: give it the released sum once, zeros otherwise."""
        assert self._released is not None
        s = self._spec
        k = self._masking.encoder.modulus_bits(s.n)
        zeros = bytes(packed_size(s.dim, k))
        released = column_pack(unpack(self._released, k, s.dim), k)  # from the released layout to the masked input's
        for i, c in enumerate(self._included):
            body = released if i == 0 else zeros
            header = wire.pack_header(self._masking._TAG, secagg_round.VERSION, secagg_round.MASKED_INPUT,
                                       s.round_index, s.session_id, c, len(body))
            self._inner.receive("masked_input", c, header + body)

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        self._live()
        if self._result is None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the unmasking phase finished")
        return self._result


# -- states: a relay of the masking protocol, then the HE server's upload and decryption ------------------

class _Relay(ServerState):
    """A phase that only carries the masking protocol's (keys, consistency_check, unmasking)."""

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        assert isinstance(s, MaskedServer)
        return s._relay_requests(s._state.phase)

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        assert isinstance(s, MaskedServer)
        s._relay_reply(s._state.phase, party, payload)


class _MaskedSetup(ServerState):
    """setup: SecAgg advertise_keys, and the decryptor's signed public context."""

    phase = "setup"

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        assert isinstance(s, MaskedServer)
        out = s._relay_requests("setup")
        out[DECRYPTOR] = s._frame.message("setup", wire.SERVER, [])
        return out

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        assert isinstance(s, MaskedServer)
        if party == DECRYPTOR:
            AwaitingSetup.receive(s, party, payload)
        else:
            s._relay_reply("setup", party, payload)

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        s._inner.finish_phase("advertise_keys")
        AwaitingSetup.finish(s)
        return _MaskedKeys


class _MaskedKeys(_Relay):
    """keys: SecAgg share_keys."""

    phase = "keys"

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        s._inner.finish_phase("share_keys")
        return _MaskedUploads


class _MaskedUploads(AwaitingUploads):
    """upload: SecAgg's masked_input request behind the signed public context; BFV ciphertexts back."""

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        assert isinstance(s, MaskedServer)
        head = s._public_items()
        return {c: s._frame.message("upload", wire.SERVER, [*head, r])
                for c, r in s._inner.requests("masked_input").items()}

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        AwaitingUploads.finish(s)
        t = s._masking.min_survivors(s._spec.n)
        if len(s._uploaded) < t:  # abort before the decryptor is asked for anything
            raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS,
                                  f"only {len(s._uploaded)} masked inputs arrived; the round needs t = {t}",
                                  phase="upload")
        return _MaskedSum


class _MaskedSum(AwaitingSum):
    """decrypt: the decryptor releases the masked sum modulo 2^k, which goes to the masking server."""

    @staticmethod
    def requests(s: HEServer) -> dict[Party, bytes]:
        return {DECRYPTOR: s._aggregate_request()}

    @staticmethod
    def receive(s: HEServer, party: Party, payload: bytes) -> None:
        assert isinstance(s, MaskedServer)
        released = bytes(s._reader(party, payload).rest())
        if len(released) != s._p._released_size(s._spec):
            raise MessageRejected("invalid message: wrong length of the sum")
        try:  # strict: the released masked sum must be a valid packing of k-bit values
            unpack(released, s._masking.encoder.modulus_bits(s._spec.n), s._spec.dim)
        except InvalidInput:
            raise MessageRejected("invalid message: malformed sum") from None
        s._released = released

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        AwaitingSum.finish(s)
        s._feed_masked_sum()
        s._inner.finish_phase("masked_input")
        return _MaskedConsistency


class _MaskedConsistency(_Relay):
    """consistency_check: SecAgg's (active adversary only)."""

    phase = "consistency_check"

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        s._inner.finish_phase("consistency_check")
        return _MaskedUnmasking


class _MaskedUnmasking(_Relay):
    """unmasking: SecAgg's; the masking server removes the masks from the released sum."""

    phase = "unmasking"

    @staticmethod
    def finish(s: HEServer) -> type[ServerState]:
        assert isinstance(s, MaskedServer)
        s._inner.finish_phase("unmasking")
        total, included = s._inner.result()
        if included != s._included:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "the unmasked sum names other clients than "
                                  "the decrypted one", phase="unmasking")
        s._result = (total, included)
        return Done
