"""The graph beacon (``protocols/flower.md`` section 12): in active SecAgg+ rounds on a Harary graph the nodes'
committed-then-revealed randomness, not the server's nonce, decides the session id and so the masking graph.

Ten nodes: the smallest round where active SecAgg+ takes a Harary graph (degree 6) instead of the complete one.
"""

import hashlib
import os

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.errors import ConfigurationError, ProtocolAborted
from securefed.flower import SecureFedAvg, _beacon, _envelope
from securefed.flower.aggregation import AggregationRound
from securefed.flower.testing import InProcessGrid
from securefed.protocols.base import DropReason
from securefed.protocols.secagg.graph import MaskingGraph
from tests.flower import apps

N = 10
FIRST = apps.FIRST
PROTOCOL = sf.protocols.SecAggPlus(adversary="active")
NODES = list(apps.nodes(N))


def updates(p, rnd):
    return np.full(apps.dim(), (p + 1) / 16)


def federation(nodes=NODES):
    keys = KeyDirectory.generate(len(nodes), RandomSource(9))
    return KeyDirectory({v: keys.verify_key(i) for i, v in enumerate(nodes)},
                        {v: keys.signing_key(i) for i, v in enumerate(nodes)})


KEYS = federation()


def grid(*, seed=None, **hooks):
    """Nodes with the federation's keys; unseeded by default (their rho from the OS, as deployed)."""
    app = apps.client_app(PROTOCOL, updates, seed=seed, identities=lambda context: KEYS.restricted_to(context.node_id))
    return InProcessGrid(app, apps.nodes(N), **hooks)


def aggregator():
    return apps.aggregator(PROTOCOL, identities=KEYS.public_only())


def graph_of(session):
    return MaskingGraph.harary(N, PROTOCOL.parameters(N).degree, session)


def neighbourhoods(graph):
    return tuple(tuple(graph.neighbors(u).tolist()) for u in range(N))


def test_the_round_needs_the_beacon_exactly_for_active_secagg_plus_on_a_harary_graph():
    assert PROTOCOL.describe(N)["graph"] == "harary" and _beacon.required(PROTOCOL, N)
    assert not _beacon.required(PROTOCOL, 7)  # complete graph: the session does not choose it
    assert not _beacon.required(sf.protocols.SecAggPlus(), N)  # a semi-honest server draws its nonce honestly
    assert not _beacon.required(sf.protocols.SecAgg(adversary="active"), N)
    rnd = AggregationRound(PROTOCOL, NODES, round_index=1, dim=apps.dim(), rng=RandomSource(0),
                           identities=KEYS.public_only())
    assert rnd.phases == (*_beacon.PHASES, *PROTOCOL.phases)
    semi = AggregationRound(sf.protocols.SecAggPlus(), NODES, round_index=1, dim=apps.dim(), rng=RandomSource(0))
    assert semi.phases == PROTOCOL.phases and semi.spec.session_id == semi.pre_session


def test_an_honest_round_with_the_beacon_aggregates_and_uses_the_beacons_session():
    out = apps.run(aggregator(), grid(), NODES, round_index=1, seed=3)
    assert out.included_nodes == tuple(NODES) and not out.dropped_nodes
    np.testing.assert_allclose(out.result.total, np.full(apps.dim(), sum(range(1, N + 1)) / 16),
                               atol=PROTOCOL.error_bound(N))
    assert list(out.phase_seconds) == [*_beacon.PHASES, *PROTOCOL.phases]
    rnd = AggregationRound(PROTOCOL, NODES, round_index=1, dim=apps.dim(), rng=RandomSource(3),
                           identities=KEYS.public_only())  # the same server coins: the same nonce
    assert out.result.spec.session_id != rnd.pre_session  # the graph is not the nonce's


def test_an_honest_round_with_the_beacon_survives_a_dropout_in_the_protocol():
    g = grid(deliver=lambda node, msg: not (node == FIRST + 4 and msg.content["securefed"]["phase"] == "share_keys"))
    out = apps.run(aggregator(), g, NODES, round_index=1, seed=3)
    assert {v: d.phase for v, d in out.dropped_nodes.items()} == {FIRST + 4: "share_keys"}
    np.testing.assert_allclose(out.result.total, np.full(apps.dim(), (sum(range(1, N + 1)) - 5) / 16),
                               atol=PROTOCOL.error_bound(N))


def test_a_server_that_fixes_the_nonce_cannot_choose_the_graph():
    """The server grinds offline for a nonce whose graph (under the old derivation from the nonce) cuts the victim
    off from nodes 1, 2 and 3, then runs three rounds with that very nonce: the nodes' rho decide the graph."""
    victim, target = 0, {1, 2, 3}
    nodes = _envelope.pack_nodes(NODES)

    def pre(seed, r=1):  # the session the nonce gives round r (it binds the round: protocols/flower.md section 1)
        bound = _envelope.binding(r, apps.dim(), 0, None, None)
        return _envelope.session_id(RandomSource(seed).child("session").token_bytes(32), nodes, bound=bound)

    seed = next(s for s in range(10_000) if target.isdisjoint(graph_of(pre(s)).neighbors(victim).tolist()))
    sessions, graphs = [], []
    g = grid()
    for r in (1, 2, 3):
        out = apps.run(aggregator(), g, NODES, round_index=r, seed=seed)  # the same nonce every time
        assert out.included_nodes == tuple(NODES)
        sessions.append(out.result.spec.session_id)
        graphs.append(graph_of(out.result.spec.session_id))
    assert len(set(sessions)) == 3 and not {pre(seed, r) for r in (1, 2, 3)} & set(sessions)
    # 181440 Harary graphs H(10, 6); the victim misses exactly {1, 2, 3} in 1 of C(9, 6) = 84 of them
    assert len({neighbourhoods(gr) for gr in graphs}) == 3
    assert sum(target.isdisjoint(gr.neighbors(victim).tolist()) for gr in graphs) < 3


def test_seeded_nodes_repeat_their_rho_and_so_the_graph_simulation_only():
    """With ``seed=`` (tests and simulation), rho derives from the seed and the server's session: reproducible."""
    a = apps.run(aggregator(), grid(seed=1), NODES, round_index=1, seed=5)
    b = apps.run(aggregator(), grid(seed=1), NODES, round_index=1, seed=5)
    assert a.result.spec.session_id == b.result.spec.session_id


# -- a malicious server: nodes refuse before they advertise any key ---------------------------------


def edit(msg, **changes):
    """`msg` with fields of its securefed record changed (other records kept)."""
    rec = dict(msg.content[_envelope.KEY])
    rec.update(changes)
    msg.content[_envelope.KEY] = ConfigRecord(rec)
    return msg


def exchange(rnd, g, phase, tamper=None):
    """Send `phase`'s requests (through ``tamper(node, msg)`` first), take the replies; node -> reply."""
    msgs = rnd.messages(phase, ttl=60, arrays=apps.model(), config=ConfigRecord({"server-round": 1}))
    if tamper is not None:
        msgs = [tamper(m.metadata.dst_node_id, m) for m in msgs]
    ids = list(g.push_messages(msgs))
    replies = {r.metadata.src_node_id: r for r in g.pull_messages(ids)}
    for node, reply in replies.items():
        rnd.receive(phase, node, reply)
    return replies


def beacon_round(seed=7):
    return AggregationRound(PROTOCOL, NODES, round_index=1, dim=apps.dim(), rng=RandomSource(seed),
                            identities=KEYS.public_only())


def copy(msg, **changes):
    """A new request like `msg` with fields of its securefed record changed."""
    rec = ConfigRecord({**dict(msg.content[_envelope.KEY]), **changes})
    return Message(RecordDict({_envelope.KEY: rec}), msg.metadata.dst_node_id, msg.metadata.message_type, ttl=60,
                   group_id=msg.metadata.group_id)


def refused_everywhere(replies, why):
    assert len(replies) == N
    for node, reply in replies.items():
        assert reply.has_error(), node
        assert why in reply.error.reason, (node, reply.error.reason)


def with_field(rnd, field):
    """A protocol request whose beacon field is `field`, with the session recomputed from it (so the envelope
    parses and the node's own checks decide)."""
    list_hash, reveals_hash, _ = _beacon.split_field(field, N)
    session = _beacon.session(rnd.pre_session, 1, list_hash, reveals_hash)
    return lambda node, msg: edit(msg, beacon=field, session=session)


def run_beacon(rnd, g, reveal_tamper=None):
    exchange(rnd, g, _beacon.COMMIT)
    rnd.finish_phase(_beacon.COMMIT)
    exchange(rnd, g, _beacon.REVEAL, reveal_tamper)
    rnd.finish_phase(_beacon.REVEAL)


def test_nodes_refuse_a_server_that_skips_the_beacon():
    """advertise_keys with the server's own session (no beacon field), to nodes that never saw a beacon."""
    rnd = beacon_round()
    run_beacon(rnd, grid())
    skip = lambda node, msg: edit(msg, beacon=b"", session=rnd.pre_session)
    refused_everywhere(exchange(rnd, grid(), "advertise_keys", skip), "the server skipped it")
    with pytest.raises(ProtocolAborted):
        rnd.finish_phase("advertise_keys")


def test_nodes_refuse_a_forged_reveal_before_advertising_keys():
    g = grid()
    rnd = beacon_round()
    run_beacon(rnd, g)
    field = bytearray(rnd.beacon.field(first=True))
    at = 2 * _beacon.HASH + 3 * _beacon.REVEAL_BYTES  # node 3's rho: as a corrupt node regenerating it would
    field[at] ^= 1
    rhos = b"".join(field[2 * _beacon.HASH + i * _beacon.REVEAL_BYTES:][:_beacon.RHO] for i in range(N))
    field[_beacon.HASH:2 * _beacon.HASH] = hashlib.sha256(rhos).digest()
    refused_everywhere(exchange(rnd, g, "advertise_keys", with_field(rnd, bytes(field))), "does not open")


def committed_with_a_forged_listing():
    """A fresh round after graph_commit, and its reveal request's listing with node 2's commitment replaced."""
    g = grid()
    rnd = beacon_round()
    exchange(rnd, g, _beacon.COMMIT)
    rnd.finish_phase(_beacon.COMMIT)
    (listing,) = set(rnd.beacon.requests(_beacon.REVEAL).values())
    return g, rnd, listing[:2 * _beacon.HASH] + os.urandom(_beacon.HASH) + listing[3 * _beacon.HASH:]


def test_nodes_refuse_a_forged_commitment():
    """Shown to every node, the forged entry makes its owner refuse to reveal (the round aborts in graph_reveal);
    shown to one node only, that node's reveal is signed over another list: if the server forwards it anyway,
    every node refuses before advertising keys."""
    g, rnd, forged = committed_with_a_forged_listing()
    replies = exchange(rnd, g, _beacon.REVEAL, lambda node, msg: edit(msg, payload=forged))
    assert [v for v, r in replies.items() if r.has_error()] == [FIRST + 2]
    assert "changes this node's commitment" in replies[FIRST + 2].error.reason
    with pytest.raises(ProtocolAborted) as e:
        rnd.finish_phase(_beacon.REVEAL)
    assert e.value.phase == _beacon.REVEAL and rnd.dropped_nodes[FIRST + 2].reason == DropReason.REFUSED

    g, rnd, forged = committed_with_a_forged_listing()
    replies = exchange(rnd, g, _beacon.REVEAL,
                       lambda node, msg: edit(msg, payload=forged) if node == FIRST + 5 else msg)
    assert not any(r.has_error() for r in replies.values())  # node 5 revealed, signing the list it saw
    assert {v: d.reason for v, d in rnd.dropped_nodes.items()} == {FIRST + 5: DropReason.REJECTED}
    forward_anyway(rnd, replies)
    refused_everywhere(exchange(rnd, g, "advertise_keys"), "graph beacon")


def forward_anyway(rnd, replies):
    """A malicious server: takes every reveal it got, valid or not, into the beacon field."""
    for node, reply in replies.items():
        payload = reply.content[_envelope.KEY]["payload"]
        rnd.beacon.reveals[node - FIRST] = (payload[:_beacon.RHO], payload[_beacon.RHO:])
    rnd.drops.clear()
    rnd.finish_phase(_beacon.REVEAL)


def test_nodes_shown_different_commitment_lists_refuse_before_advertising_keys():
    """Equivocation: node 9 plays a corrupt node colluding with the server and has a second commitment; nodes
    5-8 get the list with it, the others the list with its first. Every honest signature is over the list its
    signer saw, so no beacon field satisfies both halves: everybody refuses before advertising keys."""
    g = grid()
    rnd = beacon_round()
    exchange(rnd, g, _beacon.COMMIT)
    rnd.finish_phase(_beacon.COMMIT)
    corrupt = N - 1
    (listing,) = set(rnd.beacon.requests(_beacon.REVEAL).values())
    other = listing[:corrupt * _beacon.HASH] + _beacon.commitment(rnd.pre_session, 1, NODES[corrupt], os.urandom(32))
    replies = exchange(rnd, g, _beacon.REVEAL, lambda node, msg: edit(msg, payload=other)
                       if 5 <= node - FIRST < corrupt else msg)
    assert not any(r.has_error() for r in replies.values())  # each node saw a well-formed list
    assert set(rnd.dropped_nodes) == {FIRST + i for i in range(5, corrupt)}  # an honest server stops here
    forward_anyway(rnd, replies)
    refused_everywhere(exchange(rnd, g, "advertise_keys"), "graph beacon")


def test_a_node_that_does_not_reveal_aborts_the_round_before_any_key_is_advertised():
    sent = []

    def deliver(node, msg):
        phase = msg.content["securefed"]["phase"]
        sent.append(phase)
        return not (node == FIRST + 6 and phase == _beacon.REVEAL)

    with pytest.raises(ProtocolAborted) as e:
        apps.run(aggregator(), grid(deliver=deliver), NODES, round_index=1, seed=3)
    assert e.value.phase == _beacon.REVEAL and "needs every node" in str(e.value)
    assert "advertise_keys" not in sent


def test_nodes_reveal_once_per_commitment_and_only_in_their_round():
    g = grid()
    rnd = beacon_round()
    exchange(rnd, g, _beacon.COMMIT)
    rnd.finish_phase(_beacon.COMMIT)
    reveal = {m.metadata.dst_node_id: m for m in rnd.messages(_beacon.REVEAL, ttl=60)}
    listing = reveal[FIRST].content[_envelope.KEY]["payload"]
    exchange(rnd, g, _beacon.REVEAL)
    again = [copy(reveal[FIRST], payload=listing[:-1] + bytes([listing[-1] ^ 1])),  # another list: refused
             copy(reveal[FIRST + 1], round=2)]  # another round than the commitment's
    replies = {r.metadata.src_node_id: r for r in g.pull_messages(list(g.push_messages(again)))}
    assert "second, different list" in replies[FIRST].error.reason
    # The session binds the round index (spec section 1), so the other round's request is refused at parsing.
    assert "the session does not bind" in replies[FIRST + 1].error.reason


def test_beacon_configuration_errors_say_what_to_do():
    with pytest.raises(ConfigurationError, match="identities="):
        AggregationRound(PROTOCOL, NODES, round_index=1, dim=apps.dim(), rng=RandomSource(0))
    app = apps.client_app(PROTOCOL, updates, seed=None)  # nodes without identity keys
    rnd = beacon_round()
    refused_everywhere(exchange(rnd, InProcessGrid(app, apps.nodes(N)), _beacon.COMMIT), "identities=")
    # a beacon request in a round whose protocol needs none
    semi = AggregationRound(sf.protocols.SecAggPlus(), NODES, round_index=1, dim=apps.dim(), rng=RandomSource(0))
    semi.beacon = _beacon.ServerBeacon(semi.pre_session, 1, NODES, KEYS.public_only())
    semi_grid = InProcessGrid(apps.client_app(sf.protocols.SecAggPlus(), updates), apps.nodes(N))
    refused_everywhere(exchange(semi, semi_grid, _beacon.COMMIT), "needs no graph beacon")


def test_what_the_beacon_costs_per_node():
    """Payload bytes per node on top of the protocol's own (``message_sizes``): commit 0 down / 32 up, reveal
    32 n down / 96 up, the beacon field 64 + 96 n down in advertise_keys and 64 down in each later phase."""
    out = apps.run(aggregator(), grid(), NODES, round_index=1, seed=3)
    sizes = PROTOCOL.message_sizes(N, apps.dim())
    later = len(PROTOCOL.phases) - 1
    for node in NODES:
        assert out.bytes_to[node] == sum(d for d, _ in sizes.values()) + 32 * N + 64 + 96 * N + 64 * later
        assert out.bytes_from[node] == sum(u for _, u in sizes.values()) + 32 + 96


def test_the_strategy_runs_the_beacon_and_nodes_keep_no_beacon_state_after_the_round():
    g = grid()
    strategy = SecureFedAvg(protocol=PROTOCOL, weighting="uniform", seed=4, phase_timeout=0.05, train_timeout=0.05,
                            poll_interval=0.01, identities=KEYS.public_only())
    res = strategy.start(g, apps.model(), num_rounds=2)
    assert [r.included for r in res.rounds] == [tuple(NODES)] * 2
    assert all("seconds_graph_commit" in r.metrics and "seconds_graph_reveal" in r.metrics for r in res.rounds)
    assert all(_beacon.STATE_KEY not in g.context(v).state and _envelope.KEY not in g.context(v).state for v in NODES)
