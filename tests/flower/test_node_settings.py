"""A node's security settings are its own: the server's run configuration cannot seed a node, turn its DP off,
or grow the federation it expects (``protocols/flower.md``, section 5, "Trust boundaries"; issue 20, attack 5).

The attack: the example app's nodes used to take ``seed`` and ``dp`` from the run configuration, which whoever
submits ``flwr run`` chooses; with ``seed=5 dp=false`` the server replayed a node's protocol from the known seed
(its advertise_keys payloads came out byte-identical) and unmasked its update.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import securefed as sf
from securefed.errors import ConfigurationError, ProtocolAborted, SeededSecretsWarning
from securefed.flower import SecureClient
from securefed.flower.client import NodeContext
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES = {11 + p: {"partition-id": p, "num-partitions": 5} for p in range(3)}  # the node settings' defaults


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(APP))
    try:
        from securefed_app import client_app, server_app, task

        yield client_app, server_app, task
    finally:
        sys.path.remove(str(APP))


def attack(example, run_config, nodes, *, first_phase_only=False):
    """One round of the example's ServerApp under `run_config` (the server's choice) over `nodes` (node id ->
    node_config: each node's own settings). Returns each node's replies: (phase, payload bytes or error reason).

    ``first_phase_only``: only advertise_keys reaches the nodes (the round then aborts): what the tester compared."""
    client_app, server_app, _ = example
    cfg = {"num-server-rounds": 1, "min-nodes": 2, "phase-timeout": 0.05, "train-timeout": 0.05, "local-epochs": 1,
           "batch-size": 16, "lr": 0.1, "checkpoint-dir": "", "audit-log": "", **run_config}
    replies = {v: [] for v in nodes}
    phases = {}

    def deliver(node, msg):
        phases[msg.metadata.message_id] = msg.content["securefed"]["phase"]
        return not first_phase_only or phases[msg.metadata.message_id] == "advertise_keys"

    def tamper(node, reply):
        phase = phases[reply.metadata.reply_to_message_id]
        replies[node].append((phase, reply.error.reason if reply.has_error() else
                              reply.content["securefed"]["payload"]))
        return reply

    grid = InProcessGrid(client_app.app, nodes, run_config=cfg, deliver=deliver, tamper=tamper)
    server_app.app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg))
    return replies


def test_a_server_chosen_seed_and_dp_off_get_only_refusals(example):
    """The tester's run: ``seed=5 dp=false`` in the run configuration, nodes with their own defaults (no seed,
    DP on, 5 nodes). Every node refuses the round's first request; nothing is trained, nothing masked is sent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededSecretsWarning)  # the nodes never run seeded
        replies = attack(example, {"seed": 5, "dp": False, "num-nodes": 5}, NODES)
    for node, got in replies.items():
        assert [phase for phase, _ in got] == ["advertise_keys"], node
        (_, reason), = got
        assert isinstance(reason, str) and "not configured for" in reason


def test_a_server_chosen_seed_does_not_make_a_nodes_payloads_reproducible(example):
    """The server matches the nodes' DP (so they take part) and sets ``seed=5``: two runs with the same server
    seed (same nonce, session and requests) get different advertise_keys payloads from the nodes, which draw
    from the OS. Nodes seeded by their own node_config (a test run) give byte-identical ones, and warn."""
    server = {"seed": 5, "dp": True, "num-nodes": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededSecretsWarning)
        runs = [attack(example, server, NODES, first_phase_only=True) for _ in range(2)]
    for node in NODES:
        (phase_a, a), = runs[0][node]
        (phase_b, b), = runs[1][node]
        assert phase_a == phase_b == "advertise_keys" and isinstance(a, bytes) and isinstance(b, bytes)
        assert a != b, "a node's keys must not follow from the server's seed"

    seeded = {v: {**cfg, "seed": 5} for v, cfg in NODES.items()}
    with pytest.warns(SeededSecretsWarning, match="seed=5"):
        runs = [attack(example, server, seeded, first_phase_only=True) for _ in range(2)]
    for node in NODES:
        assert runs[0][node] == runs[1][node] and isinstance(runs[0][node][0][1], bytes)


def test_a_round_over_more_nodes_than_the_node_expects_is_refused():
    updates = {p: np.full(apps.dim(), 0.1 * p) for p in range(4)}
    app = apps.client_app(sf.protocols.SecAggPlus(), updates, seed=None, num_nodes=3)
    grid = InProcessGrid(app, apps.nodes(4))
    with pytest.raises(ProtocolAborted):
        apps.run(apps.aggregator(sf.protocols.SecAggPlus()), grid, apps.nodes(4))
    grid = InProcessGrid(app, apps.nodes(3))
    out = apps.run(apps.aggregator(sf.protocols.SecAggPlus()), grid, apps.nodes(3))
    np.testing.assert_allclose(out.result.total, sum(updates[p] for p in range(3)), atol=1e-3)


def test_the_node_refuses_more_nodes_with_a_reason():
    updates = {p: np.zeros(apps.dim()) for p in range(3)}
    reasons = []

    def tamper(node, reply):
        reasons.append(reply.error.reason if reply.has_error() else None)
        return reply

    grid = InProcessGrid(apps.client_app(sf.protocols.Plain(), updates, seed=None, num_nodes=2), apps.nodes(3),
                         tamper=tamper)
    with pytest.raises(ProtocolAborted):
        apps.run(apps.aggregator(sf.protocols.Plain()), grid, apps.nodes(3))
    assert len(reasons) == 3 and all("at most 2 (num_nodes)" in r for r in reasons)


def test_a_setting_factory_cannot_read_the_run_config_but_training_can():
    ctx = Context(run_id=1, node_id=7, node_config={"seed": 3}, state=RecordDict(), run_config={"seed": 5})
    view = NodeContext(ctx)
    assert (view.node_id, view.node_config, view.state) == (7, {"seed": 3}, ctx.state)
    with pytest.raises(ConfigurationError, match="node_config"):
        _ = view.run_config

    seen = []
    app = ClientApp()

    def train(msg, context):
        seen.append(context.run_config["lr"])  # the training function gets the real Context
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    protocol = sf.protocols.Plain()
    SecureClient(protocol, seed=lambda context: None).register(app, train)
    grid = InProcessGrid(app, apps.nodes(2), run_config={"lr": 0.5})
    apps.run(apps.aggregator(protocol), grid, apps.nodes(2))
    assert seen == [0.5, 0.5]

    reasons = []

    def tamper(node, reply):
        reasons.append(reply.error.reason)
        return reply

    app = ClientApp()
    SecureClient(protocol, seed=lambda context: context.run_config.get("seed")).register(app, train)
    grid = InProcessGrid(app, apps.nodes(2), run_config={"seed": 5}, tamper=tamper)
    with pytest.raises(ProtocolAborted):
        apps.run(apps.aggregator(protocol), grid, apps.nodes(2))
    assert len(reasons) == 2 and all("ConfigurationError" in r and "node_config" in r for r in reasons)


def test_the_example_node_takes_its_settings_from_node_config_with_safe_defaults(example):
    _, _, task = example
    assert task.node_settings({"partition-id": 0}) == {"seed": -1, "dp": True, "num-nodes": 5}
    # A virtual SuperNode (Simulation Engine) has only partition-id and num-partitions: the federation's size.
    assert task.node_settings({"partition-id": 0, "num-partitions": 20})["num-nodes"] == 20
    assert task.node_settings({"num-partitions": 20, "num-nodes": 7})["num-nodes"] == 7  # its own setting wins
    assert task.node_settings({"seed": 5, "dp": False, "num-nodes": 3}) == {"seed": 5, "dp": False, "num-nodes": 3}
    for bad in ({"seed": "5"}, {"dp": "false"}, {"num-nodes": 0}):
        with pytest.raises(ConfigurationError, match="--node-config"):
            task.node_settings({"partition-id": 0, **bad})
