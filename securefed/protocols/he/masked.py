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
from securefed.protocols.he.server import HEServer
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
    """Adds BFV ciphertexts of masked inputs; a masking server routes keys and shares and unmasks."""

    def __init__(self, protocol: MaskedScheme, spec: RoundSpec, ring: Ring, rng: RandomSource) -> None:
        super().__init__(protocol, spec, ring)
        self._masking = protocol.masking
        self._inner = self._masking.server(spec, rng=rng)
        self._result: tuple[np.ndarray, tuple[int, ...]] | None = None

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        """Each client's first drop, in HE phase names (the masking server's and this server's)."""
        phases = self._p.phases
        out = {c: DropRecord(_OUTER_PHASE[r.phase], r.reason, r.detail) for c, r in self._inner.dropped.items()}
        for c, r in self._dropped.items():
            if c not in out or phases.index(r.phase) <= phases.index(out[c].phase):
                out[c] = r
        return out

    def _build_requests(self, phase: str) -> dict[Party, bytes]:
        if phase == "decrypt":
            return {DECRYPTOR: self._aggregate_request()}
        inner = self._inner.requests(INNER_PHASE[phase])
        if phase == "upload":
            head = self._public_items()
            return {c: self._frame.message(phase, wire.SERVER, [*head, r]) for c, r in inner.items()}
        out: dict[Party, bytes] = {c: self._frame.message(phase, wire.SERVER, [r]) for c, r in inner.items()}
        if phase == "setup":
            out[DECRYPTOR] = self._frame.message(phase, wire.SERVER, [])
        return out

    def _dispatch(self, phase: str, party: Party, payload: bytes) -> None:
        if party == DECRYPTOR or phase in ("upload", "decrypt"):
            super()._dispatch(phase, party, payload)
            return
        message = bytes(self._frame.payload(payload, phase, sender_id(party)))
        self._inner.receive(INNER_PHASE[phase], party, message)  # it records its own drops

    def _receive_decrypt(self, party: Party, reader: Reader) -> None:
        released = bytes(reader.rest())
        if len(released) != self._p._released_size(self._spec):
            raise MessageRejected("invalid message: wrong length of the sum")
        try:  # strict: the released masked sum must be a valid packing of k-bit values
            unpack(released, self._masking.encoder.modulus_bits(self._spec.n), self._spec.dim)
        except InvalidInput:
            raise MessageRejected("invalid message: malformed sum") from None
        self._released = released

    def _close(self, phase: str) -> None:
        if phase == "setup":
            self._inner.finish_phase("advertise_keys")
            super()._close(phase)
        elif phase == "keys":
            self._inner.finish_phase("share_keys")
        elif phase == "upload":
            super()._close(phase)
            t = self._masking.min_survivors(self._spec.n)
            if len(self._uploaded) < t:  # abort before the decryptor is asked for anything
                raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS,
                                      f"only {len(self._uploaded)} masked inputs arrived; the round needs t = {t}",
                                      phase=phase)
        elif phase == "decrypt":
            super()._close(phase)
            self._feed_masked_sum()
            self._inner.finish_phase("masked_input")
        elif phase == "consistency_check":
            self._inner.finish_phase("consistency_check")
        else:
            self._inner.finish_phase("unmasking")
            total, included = self._inner.result()
            if included != self._included:
                raise ProtocolAborted(AbortReason.INVALID_STATE, "the unmasked sum names other clients than "
                                      "the decrypted one", phase=phase)
            self._result = (total, included)

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
        if self._result is None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the unmasking phase finished")
        return self._result

