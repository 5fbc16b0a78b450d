"""Seeded nodes (tests and simulation only) bind the round number into their randomness.

A red-team finding: a seeded node's keys derived from (seed, session id, party, phase) only, so a server
that sent round 1's session id again for round 2 (no seed needed) got the same c_sk, s_sk and b twice:
round 1's unmasking reveals b, and claiming the node dropped in round 2 then yields its s_sk, so its
round-2 input. ``client_rng`` now binds the round number (protocols/flower.md section 5).
"""

from flwr.app import ConfigRecord

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.flower import _envelope
from securefed.flower.aggregation import AggregationRound
from securefed.flower.client import client_rng
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

N = 5


def advertise(grid, protocol, members, round_index):
    """Round `round_index`'s advertise_keys with a fixed server seed (so the same session id every time)."""
    rnd = AggregationRound(protocol, members, round_index=round_index, dim=apps.dim(), rng=RandomSource(7),
                           max_payload_bytes=None, max_examples=0, privacy=None, auxiliary=None, identities=None)
    messages = rnd.messages("advertise_keys", ttl=60, arrays=apps.model(),
                            config=ConfigRecord({"server-round": round_index}))
    ids = list(grid.push_messages(messages))
    replies = {m.metadata.dst_node_id: r for mid, m in zip(ids, messages) for r in grid.pull_messages([mid])}
    assert len(replies) == len(members) and not any(r.has_error() for r in replies.values())
    return rnd.spec.session_id, {v: bytes(r.content[_envelope.KEY]["payload"]) for v, r in replies.items()}


def test_a_session_id_sent_for_two_rounds_gets_fresh_keys_from_seeded_nodes():
    protocol = sf.protocols.SecAgg()
    nodes = apps.nodes(N)
    members = list(nodes)
    grid = InProcessGrid(apps.client_app(protocol, lambda p, r: None, seed=1), nodes)
    session1, first = advertise(grid, protocol, members, 1)
    session2, second = advertise(grid, protocol, members, 2)
    # The session now binds the round index (protocols/flower.md section 1): the same nonce and nodes give
    # another session, and round 1's session under round index 2 is refused at parsing.
    assert session1 != session2
    rnd = AggregationRound(protocol, members, round_index=1, dim=apps.dim(), rng=RandomSource(7))
    (msg, *_) = rnd.messages("advertise_keys", ttl=60)
    msg.content[_envelope.KEY]["round"] = 2
    (reply,) = grid.pull_messages(list(grid.push_messages([msg])))
    assert reply.has_error() and "the session does not bind" in reply.error.reason
    for v in members:  # each reply carries the node's two fresh X25519 public keys (64 bytes)
        differing = sum(a != b for a, b in zip(first[v], second[v]))
        assert differing >= 32, f"node {v} advertised (nearly) the same keys in rounds 1 and 2"


def test_seeded_randomness_depends_on_the_round_number():
    session = bytes(32)
    one = client_rng(1, session, 0, "advertise_keys", 1).token_bytes(32)
    assert one == client_rng(1, session, 0, "advertise_keys", 1).token_bytes(32)  # reproducible
    assert one != client_rng(1, session, 0, "advertise_keys", 2).token_bytes(32)
    assert client_rng(None, session, 0, "advertise_keys", 1).token_bytes(32) != one  # unseeded: the OS


def test_a_round_replayed_in_a_new_run_gets_fresh_keys_from_seeded_nodes():
    """A second red-team finding: a new Flower run starts each node with a fresh Context, so its
    one-input-per-round record is empty; a server replaying round 1's nonce and nodes in run 2 got the same
    keys. The run id is bound in too."""
    protocol = sf.protocols.SecAgg()
    nodes = apps.nodes(N)
    members = list(nodes)
    runs = [InProcessGrid(apps.client_app(protocol, lambda p, r: None, seed=1), nodes, run_id=run_id)
            for run_id in (1, 2)]
    (session1, first), (session2, second) = (advertise(grid, protocol, members, 1) for grid in runs)
    assert session1 == session2
    for v in members:
        assert sum(a != b for a, b in zip(first[v], second[v])) >= 32, f"node {v} reused its keys across runs"
    assert client_rng(1, bytes(32), 0, "advertise_keys", 1, 1).token_bytes(8) != \
        client_rng(1, bytes(32), 0, "advertise_keys", 1, 2).token_bytes(8)
