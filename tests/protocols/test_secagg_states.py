"""The SecAgg server's states (protocols/secagg.md, "Server states"): phase order, aborts, drop reasons."""

import numpy as np
import pytest

from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import DropReason, RoundSpec
from securefed.protocols.secagg import PHASES, SecAgg, SecAggPlus
from securefed.protocols.secagg import _server_states as S

STATES = [S.AwaitingKeys, S.AwaitingShares, S.AwaitingMasked, S.AwaitingConsistency, S.AwaitingUnmask]


def _round(protocol, n, seed=0):
    spec = RoundSpec(n=n, dim=6, session_id=RandomSource(seed).token_bytes(32))
    server = protocol.server(spec, rng=RandomSource(1))
    clients = [protocol.client(spec, i, np.full(6, 0.125), rng=RandomSource(10 + i)) for i in range(n)]
    return server, clients


@pytest.mark.parametrize("protocol", [SecAgg(), SecAggPlus(), SecAgg(adversary="active")],
                         ids=["complete", "harary", "active"])
def test_the_server_walks_one_state_per_phase_and_refuses_calls_out_of_order(protocol):
    server, clients = _round(protocol, 8)
    for p, phase in enumerate(PHASES):
        assert server.state is STATES[p]
        with pytest.raises(ProtocolAborted, match="out of order") as e:
            server.finish_phase(phase)  # not opened yet
        assert e.value.reason is AbortReason.INVALID_STATE
        if p + 1 < len(PHASES):
            with pytest.raises(ProtocolAborted, match="out of order"):
                server.requests(PHASES[p + 1])
        with pytest.raises(ProtocolAborted, match="before the unmasking phase finished") as e:
            server.result()
        assert e.value.reason is AbortReason.INVALID_STATE
        requests = server.requests(phase)
        with pytest.raises(ProtocolAborted, match="out of order"):
            server.requests(phase)  # opened once
        for u, request in requests.items():
            reply = clients[u].handle(phase, request)
            if p > 0:  # a reply labelled with the previous phase: refused, and the sender is not dropped for it
                with pytest.raises(MessageRejected, match="out of phase"):
                    server.receive(PHASES[p - 1], u, reply)
            server.receive(phase, u, reply)
            with pytest.raises(MessageRejected, match="replayed"):
                server.receive(phase, u, reply)
        server.finish_phase(phase)
    assert server.state is S.Done and not server.dropped
    total, included = server.result()
    assert included == tuple(range(8)) and np.allclose(total, 1.0, atol=protocol.error_bound(8))
    with pytest.raises(ProtocolAborted, match="out of order"):
        server.requests(PHASES[0])


def test_an_aborted_server_raises_its_abort_on_every_call():
    server, clients = _round(SecAgg(), 5)
    server.requests(PHASES[0])  # nobody answers
    with pytest.raises(ProtocolAborted, match="advertised keys") as first:
        server.finish_phase(PHASES[0])
    assert first.value.reason is AbortReason.TOO_FEW_SURVIVORS and server.state is S.Aborted
    for call in (lambda: server.requests(PHASES[1]), lambda: server.receive(PHASES[1], 0, b""),
                 lambda: server.finish_phase(PHASES[1]), server.result):
        with pytest.raises(ProtocolAborted) as again:
            call()
        assert again.value is first.value
    assert {u: d.reason for u, d in server.dropped.items()} == dict.fromkeys(range(5), DropReason.NO_REPLY)


def test_every_drop_carries_a_drop_reason():
    """Silent: no_reply; a reply that fails a check: rejected (the detail says which); a client the server
    knows will refuse (fewer than t of its neighbourhood advertised keys): refused."""
    server, clients = _round(SecAggPlus(), 40)
    graph, t = server.round.graph, server.round.t
    peers = graph.neighbors(0).tolist()
    silent = set(peers[t - 2 :])  # client 0 keeps t - 2 neighbours: with itself, t - 1 holders
    bad = next(u for u in range(1, 40) if u not in silent)
    for u, request in server.requests(PHASES[0]).items():
        reply = clients[u].handle(PHASES[0], request)
        if u in silent:
            continue
        if u == bad:
            with pytest.raises(MessageRejected):
                server.receive(PHASES[0], u, reply[:-1])  # truncated
            continue
        server.receive(PHASES[0], u, reply)
    server.finish_phase(PHASES[0])
    gone = silent | {bad}
    requests = server.requests(PHASES[1])
    refusing = {u for u in requests if len(set(graph.closed_neighborhood(u).tolist()) - gone) < t}
    assert 0 in refusing
    for u, request in requests.items():
        if u in refusing:
            with pytest.raises(ProtocolAborted, match=f"t = {t}"):
                clients[u].handle(PHASES[1], request)
        else:
            server.receive(PHASES[1], u, clients[u].handle(PHASES[1], request))
    server.finish_phase(PHASES[1])
    dropped = server.dropped
    assert all(isinstance(d.reason, DropReason) for d in dropped.values())
    assert {u: (d.phase, d.reason) for u, d in dropped.items()} == {
        **dict.fromkeys(silent, (PHASES[0], DropReason.NO_REPLY)), bad: (PHASES[0], DropReason.REJECTED),
        **dict.fromkeys(refusing, (PHASES[1], DropReason.REFUSED))}
    assert dropped[bad].detail.startswith("invalid")
