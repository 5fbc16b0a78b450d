"""Plain aggregation: clients upload their vectors in the clear. The baseline for tests and benchmarks.

No protection: the server sees every input. One phase, ``upload``. See
``protocols/plain.md``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import check_finite, check_sum, check_vector
from securefed.errors import AbortReason, InvalidInput, MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import (
    AggregationProtocol,
    ClientProtocol,
    DropReason,
    DropRecord,
    Party,
    RoundSpec,
    ServerProtocol,
)

__all__ = ["Plain"]

_TAG = b"SFPL"
_VERSION = 1
# Client state (dump/load): tag, version, n, dim, round, session, client, has_x; then dim <f8 if has_x.
_STATE = struct.Struct(">4sBIII32sIB")
_STATE_TAG = b"SFPc"


class Plain(AggregationProtocol):
    """No protection: each client sends its float64 vector; the server adds them in place."""

    name = "plain"
    phases = ("upload",)
    input_phase = "upload"

    def __repr__(self) -> str:
        return "Plain()"

    def server(self, spec: RoundSpec, *, rng: RandomSource) -> ServerProtocol:
        return _PlainServer(spec)

    def client(
        self, spec: RoundSpec, client: int, x: np.ndarray | None = None, *, rng: RandomSource
    ) -> ClientProtocol:
        return _PlainClient(spec, client, x)

    def load_client(self, data: bytes, *, rng: RandomSource) -> ClientProtocol:
        """Restore a client saved by ``dump()``; InvalidInput for bytes that are not such a state."""
        mv = memoryview(data)
        if len(mv) < _STATE.size:
            raise InvalidInput("invalid Plain client state: truncated")
        tag, version, n, dim, round_index, session, client, has_x = _STATE.unpack_from(mv)
        if tag != _STATE_TAG or version != _VERSION or has_x not in (0, 1) or not 0 <= client < n:
            raise InvalidInput("invalid Plain client state: wrong tag, version or fields")
        if len(mv) != _STATE.size + 8 * dim * has_x:
            raise InvalidInput("invalid Plain client state: wrong length")
        spec = RoundSpec(n=n, dim=dim, session_id=session, round_index=round_index)
        x = np.frombuffer(mv[_STATE.size :], dtype="<f8").astype(np.float64) if has_x else None
        return _PlainClient(spec, client, x)


def _header(spec: RoundSpec, sender: int, body_len: int) -> bytes:
    return wire.pack_header(_TAG, _VERSION, 0, spec.round_index, spec.session_id, sender, body_len)


def _body(data: bytes, spec: RoundSpec, sender: int) -> memoryview:
    return wire.unpack_message(
        data, tag=_TAG, version=_VERSION, phase=0, round_index=spec.round_index,
        session_id=spec.session_id, sender=sender,
    )


class _PlainClient(ClientProtocol):
    def __init__(self, spec: RoundSpec, client: int, x: np.ndarray | None) -> None:
        self._spec, self._id = spec, client
        self._x: np.ndarray | None = None
        self._sent = False
        if x is not None:
            self.set_input(x)

    def set_input(self, x: np.ndarray) -> None:
        x = check_vector(x, self._spec.dim)
        check_finite(x)
        self._x = x

    def handle(self, phase: str, request: bytes) -> bytes | None:
        if phase != "upload":
            raise MessageRejected(f"invalid message: Plain has no phase {phase!r}")
        _body(request, self._spec, wire.SERVER)
        if self._sent:  # the input is gone (the message was its only copy): a second upload is refused
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "this client already sent its input in this round")
        if self._x is None:
            raise InvalidInput("no input vector: call set_input before the upload phase")
        x, self._x, self._sent = self._x, None, True  # sent: the message is the only copy kept
        # A float64 input is joined to the header without a copy of its own (float32 is converted first).
        body = np.ascontiguousarray(x, dtype="<f8")
        return b"".join((_header(self._spec, self._id, body.nbytes), body.data))

    def dump(self) -> bytes:
        s = self._spec
        head = _STATE.pack(_STATE_TAG, _VERSION, s.n, s.dim, s.round_index, s.session_id, self._id, self._x is not None)
        return head if self._x is None else head + self._x.astype("<f8", copy=False).tobytes()


class _PlainServer(ServerProtocol):
    def __init__(self, spec: RoundSpec) -> None:
        self._spec = spec
        self._acc = np.zeros(spec.dim, dtype=np.float64)
        self._received: list[int] = []
        self._dropped: dict[int, DropRecord] = {}
        self._done = False

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        return self._dropped

    def requests(self, phase: str) -> Mapping[Party, bytes]:
        if phase != "upload" or self._done:
            raise MessageRejected(f"invalid phase {phase!r} for Plain")
        req = _header(self._spec, wire.SERVER, 0)
        return dict.fromkeys(range(self._spec.n), req)

    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        try:
            if phase != "upload" or self._done or not isinstance(party, int) or not 0 <= party < self._spec.n:
                raise MessageRejected("invalid message: out of phase or unknown sender")
            if party in self._received or party in self._dropped:
                raise MessageRejected("invalid message: replayed upload")
            body = _body(payload, self._spec, party)
            if len(body) != 8 * self._spec.dim:
                raise MessageRejected("invalid message: wrong vector length")
            x = np.frombuffer(body, dtype="<f8")
            try:
                check_finite(x)
            except InvalidInput:
                raise MessageRejected("invalid message: non-finite values") from None
        except MessageRejected as e:
            if isinstance(party, int) and 0 <= party < self._spec.n and party not in self._received:
                self._dropped.setdefault(party, DropRecord(phase, DropReason.REJECTED, str(e)))
            raise
        with np.errstate(over="ignore"):  # an overflowing sum is refused by result()
            self._acc += x  # numpy reads the unaligned body through a small buffer, not a full copy
        self._received.append(party)

    def finish_phase(self, phase: str) -> None:
        for c in range(self._spec.n):
            if c not in self._received:
                self._dropped.setdefault(c, DropRecord(phase, DropReason.NO_REPLY))
        self._done = True
        if not self._received:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client uploaded an input", phase=phase)

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        if not self._done:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the upload phase finished")
        return check_sum(self._acc, len(self._received)), tuple(sorted(self._received))
