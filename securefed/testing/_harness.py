"""The round driver of :mod:`securefed.testing.adversary` and :mod:`securefed.testing.coalition`.

:func:`run_round` drives one round like :func:`~securefed.protocols.base.simulate_aggregation`,
but every request the honest server produces passes through a list of :class:`Deviation`
objects first. Package-private: the public names are re-exported by ``adversary``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, MessageRejected, ProtocolAborted, SecureFedError
from securefed.protocols import wire
from securefed.protocols.base import (
    AggregationProtocol,
    ClientProtocol,
    Party,
    RoundSpec,
    ServerProtocol,
)
from securefed.protocols.secagg.round import Round

__all__ = ["AdversarialRun", "Delivery", "Deviation", "RoundContext", "Send", "round_spec", "run_round"]


@dataclasses.dataclass(frozen=True)
class Send:
    """One request to deliver; ``forward``: the reply goes to the honest server."""

    party: Party
    request: bytes
    forward: bool = True
    label: str = "honest"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A request delivered to a client and the outcome: a reply, silence, or a refusal."""

    phase: str
    party: Party
    label: str
    request: bytes
    reply: bytes | None
    error: SecureFedError | None

    @property
    def refused(self) -> bool:
        return self.error is not None


class RoundContext:
    """What a deviation may use: the round's spec and parameters, message builders, and the corrupt clients.

    ``corrupt`` maps each client the adversary controls to its (real) client object, whose state
    the adversary reads; empty for a server acting alone.
    """

    def __init__(self, protocol: AggregationProtocol, spec: RoundSpec,
                 corrupt: Mapping[Party, ClientProtocol] | None = None) -> None:
        self.protocol, self.spec = protocol, spec
        # The SecAgg family's round (graph, threshold, framing); None for other protocols.
        round_for = getattr(protocol, "_round", None)
        self.round: Round | None = round_for(spec) if round_for is not None else None
        self.phases = protocol.phases
        self.corrupt: Mapping[Party, ClientProtocol] = dict(corrupt or {})

    @property
    def secagg(self) -> Round:
        """The SecAgg family's round; ConfigurationError for other protocols."""
        if self.round is None:
            raise ConfigurationError(f"{self.protocol!r} is not of the SecAgg family: this deviation needs its round")
        return self.round

    def message(self, phase: str, body: bytes) -> bytes:
        """A server message of `phase` with `body` (valid header)."""
        return self.secagg.message(self.phases.index(phase), wire.SERVER, body)

    def body(self, phase: str, data: bytes, sender: int = wire.SERVER) -> memoryview:
        return self.secagg.body(data, self.phases.index(phase), sender)


class Deviation:
    """A named way for the server to depart from the protocol.

    Override :meth:`requests` to rewrite one phase's requests (default: unchanged)
    and :meth:`observe` to see deliveries (default: nothing).
    """

    name: ClassVar[str] = "honest"

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        return sends

    def observe(self, delivery: Delivery) -> None:
        return None

    def violation(self, run: AdversarialRun) -> str | None:
        """What honest parties did wrong against this deviation in `run` (None: they behaved)."""
        return None


@dataclasses.dataclass
class AdversarialRun:
    """Everything that happened in one adversarial round."""

    spec: RoundSpec
    server: ServerProtocol
    clients: dict[Party, ClientProtocol]
    deliveries: list[Delivery]
    aborted: ProtocolAborted | None = None
    result: tuple[np.ndarray, tuple[int, ...]] | None = None

    def outcomes(self, phase: str, party: Party, label: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if d.phase == phase and d.party == party
                and (label is None or d.label == label)]

    def refused(self, phase: str, party: Party, label: str | None = None) -> bool:
        """Whether `party` refused every matching request of `phase` (and at least one was sent)."""
        out = self.outcomes(phase, party, label)
        return bool(out) and all(d.refused for d in out)


def round_spec(n: int, dim: int, seed: int | bytes) -> RoundSpec:
    """The spec (session id included) of the round that :func:`run_round` plays with `seed`."""
    return RoundSpec(n=n, dim=dim, session_id=RandomSource(seed).child("session").token_bytes(32))


def run_round(
    protocol: AggregationProtocol,
    inputs: Sequence[np.ndarray],
    deviations: Sequence[Deviation] = (),
    *,
    seed: int | bytes = 0,
    dropouts: Mapping[int, str] | None = None,
    corrupt: Collection[int] = (),
) -> AdversarialRun:
    """One round of `protocol` with the server's requests rewritten by `deviations`.

    Honest clients answer; refusals (ProtocolAborted, MessageRejected) are recorded,
    not raised. Once the honest server aborts, the deviations still run the remaining
    phases (a malicious server ignores its own abort rules) and ``aborted`` holds why.
    `corrupt`: clients the adversary controls; the deviations read them through
    :attr:`RoundContext.corrupt` (they still get the requests the deviations leave them).
    """
    n, dim = len(inputs), int(np.asarray(inputs[0]).size)
    rng = RandomSource(seed)
    spec = round_spec(n, dim, seed)
    server = protocol.server(spec, rng=rng.child("server"))
    clients: dict[Party, ClientProtocol] = {
        i: protocol.client(spec, i, np.asarray(inputs[i]), rng=rng.child(f"client/{i}")) for i in range(n)
    }
    clients.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    ctx = RoundContext(protocol, spec, {c: clients[c] for c in corrupt})
    run = AdversarialRun(spec, server, clients, [])
    drop_at = {c: protocol.phases.index(p) for c, p in (dropouts or {}).items()}
    for p, phase in enumerate(protocol.phases):
        honest: Mapping[Party, bytes] = {}
        if run.aborted is None:
            try:
                honest = server.requests(phase)
            except ProtocolAborted as e:
                run.aborted = e
        sends = [Send(party, req) for party, req in honest.items()]
        for dev in deviations:
            sends = dev.requests(ctx, phase, sends)
        for s in sends:
            if isinstance(s.party, int) and drop_at.get(s.party, len(protocol.phases)) <= p:
                continue
            _deliver(run, clients, deviations, phase, s)
        if run.aborted is None:
            try:
                server.finish_phase(phase)
            except ProtocolAborted as e:
                run.aborted = e
    if run.aborted is None:
        run.result = server.result()
    return run


def _deliver(run: AdversarialRun, clients: Mapping[Party, ClientProtocol], deviations: Sequence[Deviation],
             phase: str, s: Send) -> None:
    try:
        reply, error = clients[s.party].handle(phase, s.request), None
    except (ProtocolAborted, MessageRejected) as e:
        reply, error = None, e
    delivery = Delivery(phase, s.party, s.label, s.request, reply, error)
    run.deliveries.append(delivery)
    for dev in deviations:
        dev.observe(delivery)
    if reply is not None and s.forward and run.aborted is None:
        try:
            run.server.receive(phase, s.party, reply)
        except MessageRejected:
            pass
