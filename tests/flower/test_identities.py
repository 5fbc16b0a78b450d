"""Active SecAgg+ on Flower when participants change between rounds: each party builds the round's
identity directory (client i: the round's i-th node) from its own copy of the federation's keys."""

import numpy as np
import pytest

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.flower import SecureFedAvg, _envelope
from securefed.flower.testing import InProcessGrid
from securefed.protocols.base import DropReason
from tests.flower import apps
from tests.flower.test_bad_input import with_record

FIRST = apps.FIRST
TOTAL = 7  # the federation; each round takes 6 of them (the active threat model needs n >= 6 here)


def updates(p, rnd):
    return np.full(apps.dim(), (p + 1) / 8)


def federation(nodes):
    """Identity keys indexed by node id (as an operator would hand them out), all held here for the test."""
    keys = KeyDirectory.generate(len(nodes), RandomSource(9))
    return KeyDirectory({v: keys.verify_key(i) for i, v in enumerate(nodes)},
                        {v: keys.signing_key(i) for i, v in enumerate(nodes)})


def test_two_rounds_with_different_participants_and_a_wrongly_signed_reply_dropping_only_its_sender():
    protocol = sf.protocols.SecAggPlus(adversary="active")  # no identities=: the runtime binds them per round
    nodes = list(apps.nodes(TOTAL))
    keys = federation(nodes)
    victim, rnd2 = FIRST + 3, 2

    def tamper(node, reply):
        rec = reply.content[_envelope.KEY]
        if node == victim and rec["round"] == rnd2 and rec["phase"] == "advertise_keys":
            payload = bytearray(rec["payload"])
            payload[-1] ^= 1  # the last byte of the signature over its public keys
            with_record(reply, payload=bytes(payload))
        return reply

    app = apps.client_app(protocol, updates, identities=lambda context: keys.restricted_to(context.node_id))
    grid = InProcessGrid(app, apps.nodes(TOTAL), tamper=tamper)
    agg = apps.aggregator(protocol, identities=keys.public_only())
    rounds = {1: nodes[:6], rnd2: nodes[1:]}  # node FIRST + 1 is client 1, then client 0; FIRST + 6 joins
    outs = {r: apps.run(agg, grid, members, round_index=r, seed=r) for r, members in rounds.items()}
    assert outs[1].included_nodes == tuple(rounds[1]) and not outs[1].dropped_nodes
    np.testing.assert_allclose(outs[1].result.total, np.full(apps.dim(), sum(range(1, 7)) / 8),
                               atol=protocol.error_bound(6))
    assert {v: (d.phase, d.reason) for v, d in outs[rnd2].dropped_nodes.items()} == {
        victim: ("advertise_keys", DropReason.REJECTED)}
    assert outs[rnd2].included_nodes == tuple(v for v in rounds[rnd2] if v != victim)
    np.testing.assert_allclose(outs[rnd2].result.total, np.full(apps.dim(), (2 + 3 + 5 + 6 + 7) / 8),
                               atol=protocol.error_bound(6))


def test_without_per_round_binding_a_changed_participant_set_breaks_the_signatures():
    """What the binding fixes: a directory indexed by client for round 1's nodes is wrong for round 2's."""
    nodes = list(apps.nodes(TOTAL))
    keys = KeyDirectory.generate(6, RandomSource(9))  # client i = node FIRST + i, fixed
    server_side = sf.protocols.SecAggPlus(adversary="active", identities=keys.public_only())
    app = apps.client_app(lambda ctx: sf.protocols.SecAggPlus(
        adversary="active", identities=keys.restricted_to(min(ctx.node_id - FIRST, 5))), updates,
        phases=server_side.phases)
    grid = InProcessGrid(app, apps.nodes(TOTAL))
    with pytest.raises(sf.errors.ProtocolAborted):  # no node holds the signing key of its new index
        apps.run(apps.aggregator(server_side), grid, nodes[1:], round_index=2, seed=2)


def test_the_strategy_samples_only_nodes_with_identity_keys():
    protocol = sf.protocols.SecAggPlus(adversary="active")
    nodes = list(apps.nodes(TOTAL))
    keys = federation(nodes[:6])  # the seventh node has no registered identity
    app = apps.client_app(protocol, updates, identities=lambda context: keys.restricted_to(context.node_id))
    grid = InProcessGrid(app, apps.nodes(TOTAL))
    strategy = SecureFedAvg(protocol=protocol, weighting="uniform", seed=4, phase_timeout=0.05, train_timeout=0.05,
                            poll_interval=0.01, identities=keys.public_only())
    res = strategy.start(grid, apps.model(), num_rounds=1)
    assert res.rounds[0].participants == tuple(nodes[:6]) == res.rounds[0].included
