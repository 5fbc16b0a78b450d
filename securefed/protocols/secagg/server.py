"""The server of SecAgg / SecAgg+: routes keys and shares, sums masked inputs in place, unmasks the sum.

:class:`Server` is a thin facade over one state class per phase (``_server_states.py``, fcp/secagg
style): it checks that calls come in phase order and who may answer, records drops with their
:class:`DropReason`, and moves to the state each closed phase returns.

Memory: one modular accumulator of the vector's length plus O(n x degree) small
state (keys, sealed shares, revealed shares); masked inputs are added as they arrive,
four at a time in one pass over the accumulator (so up to three accepted inputs of at
most 8 MiB each are held, while enough replies are expected to fill the group, until the
fourth comes or the phase ends), and never kept. Before asking anyone to unmask, the server
checks that every secret it will need has t holders left, so a round that cannot
finish aborts before any share is revealed. See ``protocols/secagg.md`` (server).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from securefed.encoding.fixedpoint import check_sum
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import DropReason, DropRecord, Party, ServerProtocol
from securefed.protocols.secagg import _server_states as S
from securefed.protocols.secagg.packed import UnpackAdder
from securefed.protocols.secagg.round import PHASE_INDEX, Round

__all__ = ["Server"]


class Server(ServerProtocol):
    """The server of one round: routes keys and shares, sums masked inputs in place, unmasks the sum.

    ``state`` is the current phase's state class (``AwaitingKeys`` ... ``Done``, or ``Aborted``);
    ``data`` what the round keeps between phases."""

    def __init__(self, rnd: Round) -> None:
        self.round = rnd
        self.data = S.ServerData.new(rnd)
        self.state: type[S.State] = S.AwaitingKeys
        self._open = False  # whether the state's phase has been opened by requests()

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        return self.data.dropped

    def _live(self) -> S.ServerData:
        """The round's data; the abort again once the round has aborted."""
        if self.state is S.Aborted:
            assert self.data.aborted is not None
            raise self.data.aborted
        return self.data

    def requests(self, phase: str) -> Mapping[Party, bytes]:
        d = self._live()
        if PHASE_INDEX.get(phase) != self.state.phase or self._open:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"requests({phase!r}) out of order", phase=phase)
        reqs = self.state.requests(d)
        # SecAgg's parties are its clients: int ids
        d.expected, d.replied, self._open = {int(u) for u in reqs}, set(), True
        return reqs

    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        d = self._live()
        if not self._open or PHASE_INDEX.get(phase, -1) != self.state.phase or party not in d.expected:
            raise MessageRejected("invalid message: out of phase or unexpected sender")
        if party in d.replied:
            raise MessageRejected("invalid message: replayed reply")
        assert isinstance(party, int)
        try:
            self.state.receive(d, party, self.round.body(payload, self.state.phase, party))
        except MessageRejected as e:
            d.drop(party, DropRecord(phase, DropReason.REJECTED, str(e)))
            raise
        d.replied.add(party)

    def finish_phase(self, phase: str) -> None:
        d = self._live()
        if not self._open or PHASE_INDEX.get(phase, -1) != self.state.phase:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"finish_phase({phase!r}) out of order", phase=phase)
        for u in sorted(d.expected - d.replied):
            why = d.refusals.pop(u, None)
            d.drop(u, DropRecord(phase, DropReason.REFUSED, why) if why else DropRecord(phase, DropReason.NO_REPLY))
        self._open = False
        try:
            self.state = self.state.finish(d)
        except ProtocolAborted as e:
            self.state, d.aborted = S.Aborted, e
            raise

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        d = self._live()
        if self.state is not S.Done or d.result is None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the unmasking phase finished")
        check_sum(d.result[0], len(d.result[1]))  # finite inputs may still sum beyond float64
        return d.result

    # Views that tests and bench/secagg.py read (the states hold the logic).

    @property
    def _shares(self) -> dict[int, memoryview]:
        return self.data.shares

    @property
    def _adder(self) -> UnpackAdder | None:
        return self.data.adder

    def _route(self, senders: list[int]) -> list[tuple[int, tuple[bytes | memoryview, ...]]]:
        return S.route(self.data, senders)

    def _route_complete(self, senders: list[int]) -> np.ndarray:
        return S.route_complete(self.data, senders)

    def _masked_requests(self) -> dict[Party, bytes]:
        return S.AwaitingMasked.requests(self.data)
