"""One round driven exactly as :func:`~securefed.protocols.base.simulate_aggregation` drives it,
with a hook that alters what reaches the server (for the message properties of the conformance suite).

Same key and coin derivation from the seed as ``simulate_aggregation``, so an unaltered
run gives its result; the suite checks that on every run it compares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import (
    AggregationProtocol,
    ClientProtocol,
    DropRecord,
    Party,
    RoundSpec,
    check_dropouts,
    check_inputs,
)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A reply handed to ``server.receive``: who it claims to be from, and whether it was accepted."""

    phase: str
    party: Party
    payload: bytes
    label: str
    accepted: bool
    error: str = ""


@dataclasses.dataclass
class Run:
    """What happened in one driven round."""

    spec: RoundSpec
    replies: list[tuple[Party, str, bytes]]  # every reply the parties produced, in order (the honest transcript)
    deliveries: list[Delivery]
    dropped: Mapping[int, DropRecord]
    result: tuple[np.ndarray, tuple[int, ...]] | None = None
    aborted: ProtocolAborted | None = None


#: ``alter(phase, batch, history)``: the ``(party, payload, label)`` list to hand the server in `phase`
#: instead of `batch`; `history` holds every ``(party, phase, payload)`` reply of the round so far.
Alter = Callable[[str, list[tuple[Party, bytes, str]], Sequence[tuple[Party, str, bytes]]],
                 list[tuple[Party, bytes, str]]]


def run(
    protocol: AggregationProtocol,
    inputs: Sequence[np.ndarray],
    *,
    dropouts: Mapping[int, str] | None = None,
    seed: int | bytes = 0,
    round_index: int = 0,
    alter: Alter | None = None,
) -> Run:
    """One round of `protocol`; the replies of each phase pass through `alter` before the server takes them.

    Raises only what the protocol raises outside ProtocolAborted (recorded in ``aborted``)
    and MessageRejected from ``server.receive`` (recorded per delivery).
    """
    xs = check_inputs(inputs)
    n, dim = len(xs), xs[0].size
    drop_at = check_dropouts(protocol, n, dropouts)
    rng = RandomSource(seed)
    spec = RoundSpec(n=n, dim=dim, session_id=rng.child("session").token_bytes(32), round_index=round_index)
    server = protocol.server(spec, rng=rng.child("server"))
    parties: dict[Party, ClientProtocol] = {
        i: protocol.client(spec, i, xs[i], rng=rng.child(f"client/{i}")) for i in range(n)
    }
    parties.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    out = Run(spec, [], [], {})
    try:
        for p, phase in enumerate(protocol.phases):
            batch: list[tuple[Party, bytes, str]] = []
            for party, request in server.requests(phase).items():
                if isinstance(party, int) and drop_at.get(party, len(protocol.phases)) <= p:
                    continue
                try:
                    reply = parties[party].handle(phase, request)
                except (ProtocolAborted, MessageRejected):
                    continue
                if reply is not None:
                    out.replies.append((party, phase, bytes(reply)))
                    batch.append((party, bytes(reply), "honest"))
            for party, payload, label in (alter(phase, batch, out.replies) if alter is not None else batch):
                try:
                    server.receive(phase, party, payload)
                    out.deliveries.append(Delivery(phase, party, payload, label, True))
                except MessageRejected as e:
                    out.deliveries.append(Delivery(phase, party, payload, label, False, str(e)))
            server.finish_phase(phase)
        total, included = server.result()
        if not included:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client input reached the aggregate")
        out.result = (np.asarray(total), tuple(included))
    except ProtocolAborted as e:
        out.aborted = e
    out.dropped = dict(server.dropped)  # some servers compute it on each access
    return out
