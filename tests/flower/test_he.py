"""HE on Flower: the decryptor is a designated node that holds the round's key in its context."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

import securefed as sf
from securefed.audit import verify
from securefed.crypto.random import RandomSource
from securefed.errors import ProtocolAborted
from securefed.flower import GridAggregator, SecureFedAvg
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

N = 4
PHASES_CKKS = sf.protocols.CKKS.phases
DECRYPTOR = 2001  # a node id that is no client's


def updates(p, rnd):
    # float32 values: the model is float32, so the node's update (trained - global) is exactly this.
    return (np.linspace(-1.0, 1.0, apps.dim()) * (p + 1) / 8).astype(np.float32).astype(np.float64)


def decryptor_role(context):
    return {"decryptor"} if context.node_config.get("role") == "decryptor" else set()


def grid_with_decryptor(protocol, seen=None, role=decryptor_role):
    app = apps.client_app(protocol, updates, auxiliary=role)

    def deliver(node, msg):
        if seen is not None:
            seen.setdefault(node, []).append((msg.metadata.message_type, msg.content["securefed"]["party"]))
        return True

    return InProcessGrid(app, {**apps.nodes(N), DECRYPTOR: {"role": "decryptor"}}, deliver=deliver)


PROTOCOLS = {
    "ckks": lambda: sf.protocols.CKKS(value_range=1.0),
    "bfv-masked": lambda: sf.protocols.BFV(value_range=1.0, key_holder="masked"),
}


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
def test_a_round_with_a_decryptor_node_sums_what_the_simulation_sums(kind):
    protocol = PROTOCOLS[kind]()
    seen = {}
    grid = grid_with_decryptor(protocol, seen)
    clients = list(apps.nodes(N))
    out = apps.run(apps.aggregator(protocol, auxiliary={"decryptor": DECRYPTOR}), grid, clients, seed=3)
    sim = sf.simulate_aggregation(protocol, [updates(p, 1) for p in range(N)], seed=0)
    exact = sum(updates(p, 1) for p in range(N))
    assert out.included_nodes == tuple(clients) and not out.dropped_nodes
    assert out.result.included == sim.included
    bound = protocol.error_bound(N)
    np.testing.assert_allclose(out.result.total, exact, rtol=0, atol=bound)
    np.testing.assert_allclose(out.result.total, sim.total, rtol=0, atol=2 * bound)
    # The decryptor is asked for its public key and, once, to decrypt the aggregate: nothing else.
    assert seen[DECRYPTOR] == [("query.setup", "decryptor"), ("query.decrypt", "decryptor")]
    assert all(party == "" for node in clients for _, party in seen[node])


def test_the_strategy_never_samples_the_decryptor_and_the_audit_log_verifies(tmp_path):
    protocol = sf.protocols.CKKS(value_range=1.0)
    grid = grid_with_decryptor(protocol)
    strategy = SecureFedAvg(protocol=protocol, weighting="uniform", seed=2, phase_timeout=0.05, train_timeout=0.05,
                            poll_interval=0.01, auxiliary={"decryptor": DECRYPTOR}, audit_log=tmp_path / "audit.jsonl")
    res = strategy.start(grid, apps.model(), num_rounds=2)
    assert [r.participants for r in res.rounds] == [tuple(apps.nodes(N))] * 2
    assert all(r.included == tuple(apps.nodes(N)) and r.aborted is None for r in res.rounds)
    mean = np.mean([updates(p, 1) for p in range(N)], axis=0)
    np.testing.assert_allclose(apps.vector(res.arrays), 2 * mean, atol=1e-6)  # float32 model
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()


def test_a_node_not_configured_as_decryptor_refuses_and_the_round_aborts():
    protocol = sf.protocols.CKKS(value_range=1.0)
    grid = grid_with_decryptor(protocol, role=set())
    with pytest.raises(ProtocolAborted, match="public key"):
        apps.run(apps.aggregator(protocol, auxiliary={"decryptor": DECRYPTOR}), grid, apps.nodes(N), seed=3)


def test_a_protocol_with_a_decryptor_needs_its_node():
    protocol = sf.protocols.CKKS(value_range=1.0)
    grid = grid_with_decryptor(protocol)
    with pytest.raises(sf.errors.ConfigurationError, match="decryptor"):
        apps.run(apps.aggregator(protocol), grid, apps.nodes(N), seed=3)
    with pytest.raises(sf.errors.ConfigurationError, match="both"):
        GridAggregator(protocol, auxiliary={"decryptor": apps.FIRST}).run(
            grid, list(apps.nodes(N)), round_index=1, dim=apps.dim(), rng=RandomSource(3))


def test_a_clients_first_phase_may_be_the_upload_but_never_over_another_sessions_state():
    """In decryptor mode a client first hears of a round in its upload: it starts a state machine
    then, unless it holds state of that round for another session (refused, state untouched)."""
    from flwr.app import Context, Message, MetricRecord, RecordDict

    from securefed.flower import SecureClient, _envelope

    protocol = sf.protocols.CKKS(value_range=1.0)
    captured = {}

    def capture(node, msg):
        if node == apps.FIRST and msg.metadata.message_type == "train":
            captured["msg"] = msg
        return True

    app = apps.client_app(protocol, updates, auxiliary=decryptor_role)
    grid = InProcessGrid(app, {**apps.nodes(N), DECRYPTOR: {"role": "decryptor"}}, deliver=capture)
    apps.run(apps.aggregator(protocol, auxiliary={"decryptor": DECRYPTOR}), grid, apps.nodes(N), seed=3)
    msg = captured["msg"]

    def train(m, c):  # the model unchanged: an update of zeros
        return Message(RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=m)

    client = SecureClient(protocol, seed=0)
    for saved_round, session, refused in ((1, bytes(32), True), (0, bytes(32), False)):
        context = Context(run_id=1, node_id=apps.FIRST, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config={})
        saved = ConfigRecord({"round": saved_round, "session": session, "client": 0, "party": "", "state": b"s"})
        context.state[_envelope.KEY] = saved
        reply = client.handle(msg, context, train)
        assert reply.has_error() == refused, reply.error.reason if reply.has_error() else ""
        if refused:
            assert "out of phase" in reply.error.reason and dict(context.state[_envelope.KEY]) == dict(saved)


def test_a_round_with_real_identity_keys_and_a_signing_decryptor_node():
    """No simulated PKI: nodes hold their own signing keys by node id, the decryptor node its own; the
    round's directory is bound per round (with_identities) and keeps the decryptor's key."""
    from securefed.crypto.signing import (
        KeyDirectory,
        generate_signing_key,
        verify_key_bytes,
    )
    from securefed.protocols.he.wire import DECRYPTOR_ID

    nodes = list(apps.nodes(N))
    keys = KeyDirectory.generate(N, RandomSource(9))
    fed = KeyDirectory({v: keys.verify_key(i) for i, v in enumerate(nodes)},
                       {v: keys.signing_key(i) for i, v in enumerate(nodes)})
    sk = generate_signing_key(RandomSource(4))
    dec_public = KeyDirectory({DECRYPTOR_ID: verify_key_bytes(sk)})
    dec_private = KeyDirectory({DECRYPTOR_ID: verify_key_bytes(sk)}, {DECRYPTOR_ID: sk})

    def protocol(context):
        own = dec_private if context.node_config.get("role") == "decryptor" else dec_public
        return sf.protocols.CKKS(value_range=1.0, identities=own)

    def identities(context):
        return fed.public_only() if context.node_id == DECRYPTOR else fed.restricted_to(context.node_id)

    app = apps.client_app(protocol, updates, auxiliary=decryptor_role, identities=identities, phases=PHASES_CKKS)
    grid = InProcessGrid(app, {**apps.nodes(N), DECRYPTOR: {"role": "decryptor"}})
    server_side = sf.protocols.CKKS(value_range=1.0, identities=dec_public)
    agg = apps.aggregator(server_side, auxiliary={"decryptor": DECRYPTOR}, identities=fed.public_only())
    out = apps.run(agg, grid, nodes, seed=3)
    assert out.included_nodes == tuple(nodes) and not out.dropped_nodes
    np.testing.assert_allclose(out.result.total, sum(updates(p, 1) for p in range(N)), rtol=0,
                               atol=server_side.error_bound(N))
