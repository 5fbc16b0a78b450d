"""Bad input from nodes: each bad reply makes only its sender a dropout, with a logged MessageRejected reason.

Covers malformed, oversized, replayed (other round or session), out-of-phase, misaddressed
and forged replies, a fuzz run of 10^4 random and mutated payloads through the server's
message handling, and requests a node must refuse.
"""

import logging

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import given
from hypothesis import strategies as st

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import ProtocolAborted
from securefed.flower import GridAggregator, SecureClient, SecureFedAvg, _envelope
from securefed.flower.aggregation import AggregationRound, input_phase
from securefed.flower.testing import InProcessGrid
from securefed.protocols.base import DropReason
from securefed.protocols.wire import HEADER_SIZE
from tests.flower import apps

FIRST = 1001
N = 4


def updates(p, rnd):
    return np.full(apps.dim(), (p + 1) / 8)  # inside SecAgg's default value range [-1, 1]


def protocols():
    return [sf.protocols.Plain(), sf.protocols.SecAggPlus()]


def one_round(protocol, tamper, *, max_payload_bytes=None, n=N):
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(n), tamper=tamper)
    agg = GridAggregator(protocol, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                         max_payload_bytes=max_payload_bytes)
    return agg.run(grid, grid.get_node_ids(), round_index=1, dim=apps.dim(), rng=RandomSource(3),
                   arrays=apps.model(), config=ConfigRecord({"server-round": 1}))


def with_record(reply, **changes):
    """The reply with fields of its securefed record changed (None deletes a field)."""
    rec = dict(reply.content[_envelope.KEY])
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    reply.content = RecordDict({_envelope.KEY: ConfigRecord(rec)})
    return reply


BAD = {
    "malformed": lambda r: with_record(r, round=None),
    "wrong type": lambda r: with_record(r, client="1"),
    "bool for int": lambda r: with_record(r, round=True),
    "unknown field": lambda r: with_record(r, extra=b"x"),
    "other version": lambda r: with_record(r, v=_envelope.VERSION + 1),
    "extra record": lambda r: setattr(r, "content", RecordDict({**r.content, "arrays": ArrayRecord()})) or r,
    "no record": lambda r: setattr(r, "content", RecordDict()) or r,
    "oversized": lambda r: with_record(r, payload=bytes(4097)),
    "truncated": lambda r: with_record(r, payload=r.content[_envelope.KEY]["payload"][:-1]),
    "other round in envelope": lambda r: with_record(r, round=2),
    "other session in envelope": lambda r: with_record(r, session=bytes(32)),
    "out of phase": lambda r: with_record(r, phase="unmasking"),
    "other client in envelope": lambda r: with_record(r, client=0),
    "auxiliary party in envelope": lambda r: with_record(r, party="decryptor"),
    "forged sender": lambda r: r.metadata.__dict__.__setitem__("_src_node_id", FIRST) or r,
}


@pytest.mark.parametrize("protocol", protocols(), ids=lambda p: p.name)
@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_reply_makes_only_its_sender_a_rejected_dropout(protocol, kind, caplog):
    victim = FIRST + 2
    train = input_phase(protocol)

    def tamper(node, reply):
        if node == victim and not reply.has_error() and reply.content[_envelope.KEY]["phase"] == train:
            return BAD[kind](reply)
        return reply

    with caplog.at_level(logging.WARNING, logger="securefed.flower"):
        out = one_round(protocol, tamper, max_payload_bytes=4096)
    assert out.dropped_nodes[victim].reason is DropReason.REJECTED
    assert out.dropped_nodes[victim].phase == train
    assert set(out.dropped_nodes) == {victim}
    assert out.included_nodes == tuple(v for v in range(FIRST, FIRST + N) if v != victim)
    np.testing.assert_allclose(out.result.total, np.full(apps.dim(), (1.0 + 2 + 4) / 8), atol=protocol.error_bound(N))
    assert any(f"node {victim}" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("protocol", protocols(), ids=lambda p: p.name)
@pytest.mark.parametrize("whole", [False, True], ids=["payload in a new envelope", "whole reply"])
def test_a_payload_replayed_from_round_1_in_round_2_drops_only_its_sender(protocol, whole):
    victim = FIRST + 1
    train = input_phase(protocol)
    saved = {}

    def tamper(node, reply):
        if node != victim or reply.has_error() or reply.content[_envelope.KEY]["phase"] != train:
            return reply
        rnd = reply.content[_envelope.KEY]["round"]
        if rnd == 1:
            saved["content"] = reply.content
        elif whole:
            reply.content = saved["content"]
        else:
            with_record(reply, payload=saved["content"][_envelope.KEY]["payload"])
        return reply

    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N), tamper=tamper)
    strategy = SecureFedAvg(protocol=protocol, weighting="uniform", seed=5, phase_timeout=0.05, train_timeout=0.05,
                            poll_interval=0.01, cooldown_rounds=0)
    res = strategy.start(grid, apps.model(), num_rounds=2)
    r1, r2 = res.rounds
    assert r1.included == tuple(range(FIRST, FIRST + N)) and not r1.dropped
    assert {v: (d.phase, d.reason) for v, d in r2.dropped.items()} == {victim: (train, DropReason.REJECTED)}
    assert r2.included == tuple(v for v in range(FIRST, FIRST + N) if v != victim)
    # Round 1 moved the model by the mean of all four updates, round 2 by the mean of the other three.
    expected = (np.mean([1, 2, 3, 4]) + np.mean([1, 3, 4])) / 8
    np.testing.assert_allclose(apps.vector(res.arrays), expected, atol=2 * protocol.error_bound(N))


# -- fuzzing the server's message handling ------------------------------------------------------


def trace(protocol, seed, round_index):
    """The valid replies of a whole round, by phase and node, and the nodes' ids."""
    replies = {}

    def tamper(node, reply):
        replies.setdefault(reply.content[_envelope.KEY]["phase"], {})[node] = reply
        return reply

    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N), tamper=tamper)
    agg = GridAggregator(protocol, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01)
    agg.run(grid, grid.get_node_ids(), round_index=round_index, dim=apps.dim(), rng=RandomSource(seed),
            arrays=apps.model(), config=ConfigRecord({"server-round": round_index}))
    return replies


def round_at(protocol, seed, replies, phase, *, messages=True):
    """A fresh server round (same seed as the trace) advanced to `phase` with the trace's valid replies.

    ``messages=False`` only advances the protocol's server (building Flower messages is the slow part)."""
    rnd = AggregationRound(protocol, range(FIRST, FIRST + N), round_index=1, dim=apps.dim(), rng=RandomSource(seed))
    for p in protocol.phases:
        if messages:
            msgs = {m.metadata.dst_node_id: m for m in rnd.messages(p, ttl=60)}
        else:
            msgs = dict(rnd.server.requests(p))
        if p == phase:
            return rnd, msgs
        for node, reply in replies.get(p, {}).items():
            rnd.receive(p, node, reply)
        rnd.finish_phase(p)
    raise AssertionError(phase)


def mutate(rng, payload, others):
    """(kind, new payload, must the server reject it)."""
    kind = int(rng.integers(7))
    if kind == 0:
        return "random", rng.bytes(int(rng.integers(0, 2 * len(payload) + 2))), True
    if kind == 1:
        buf = bytearray(payload)
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(HEADER_SIZE))] ^= 1 << int(rng.integers(8))
        return "header bit flips", bytes(buf), bytes(buf) != payload  # two flips of one bit cancel
    if kind == 2:
        return "truncated", payload[: int(rng.integers(len(payload)))], True
    if kind == 3:
        return "extended", payload + rng.bytes(int(rng.integers(1, 64))), True
    if kind == 4:
        return "replayed from elsewhere", others[int(rng.integers(len(others)))], True
    buf = bytearray(payload)
    for _ in range(int(rng.integers(1, 8))):
        buf[int(rng.integers(len(buf)))] ^= 1 << int(rng.integers(8))
    return "bit flips", bytes(buf), buf[:HEADER_SIZE] != payload[:HEADER_SIZE]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("protocol", "count"), [(sf.protocols.SecAggPlus(), 10_000), (sf.protocols.Plain(), 2_000)],
                         ids=["secagg+", "plain"])
def test_ten_thousand_fuzzed_payloads_give_rejections_only(protocol, count):
    seed = 11
    replies = trace(protocol, seed, 1)
    elsewhere = trace(protocol, seed + 1, 2)  # another round and session
    rng = np.random.default_rng(2024)  # the fuzzer's coins are not secret
    victim = FIRST + 1
    phases = [p for p in protocol.phases if victim in replies.get(p, {})]
    others = [r.content[_envelope.KEY]["payload"] for t in (replies, elsewhere) for ph in t.values()
              for v, r in ph.items() if v != victim or t is elsewhere]
    requests = {p: round_at(protocol, seed, replies, p)[1][victim] for p in phases}
    kinds = {}
    for i in range(count):
        phase = phases[i % len(phases)]
        rnd, _ = round_at(protocol, seed, replies, phase, messages=False)
        valid = replies[phase][victim].content[_envelope.KEY]
        kind, payload, must_reject = mutate(rng, valid["payload"], others)
        reply = Message(RecordDict({_envelope.KEY: ConfigRecord({**valid, "payload": payload})}),
                        reply_to=requests[phase])
        reply.metadata.__dict__["_src_node_id"] = victim
        rnd.receive(phase, victim, reply)
        drop = rnd.drops.get(rnd.nodes.index(victim))
        rejected = drop is not None
        assert rejected or not must_reject, (kind, i)
        if rejected:
            assert drop.reason is DropReason.REJECTED and drop.phase == phase
        kinds[kind] = kinds.get(kind, 0) + rejected
        if i % 50 == 0:  # the round still ends cleanly: a result, or a typed abort
            for node, r in replies[phase].items():
                if node != victim:
                    rnd.receive(phase, node, r)
            try:
                rnd.finish_phase(phase)
                for p in protocol.phases[protocol.phases.index(phase) + 1 :]:
                    rnd.server.requests(p)
                    for node, r in replies.get(p, {}).items():
                        rnd.receive(p, node, r)
                    rnd.finish_phase(p)
                rnd.outcome()
            except ProtocolAborted:
                pass
    assert kinds["random"] > 0 and kinds["header bit flips"] > 0


@given(st.dictionaries(st.sampled_from(sorted(_envelope._REPLY_FIELDS) + ["x", "payload2"]),
                       st.one_of(st.integers(-2, 2**40), st.text(max_size=8), st.binary(max_size=64),
                                 st.booleans(), st.floats(allow_nan=False)), max_size=8))
def test_arbitrary_envelopes_are_rejected(fields):
    protocol = sf.protocols.Plain()
    replies = _trace_cache(protocol)
    rnd, msgs = round_at(protocol, 11, replies, "upload")
    valid = replies["upload"][FIRST]
    reply = Message(RecordDict({_envelope.KEY: ConfigRecord(fields)}), reply_to=msgs[FIRST])
    reply.metadata.__dict__["_src_node_id"] = FIRST
    rnd.receive("upload", FIRST, reply)
    if 0 not in rnd.drops:  # only the exact valid envelope can be accepted
        assert dict(fields) == dict(valid.content[_envelope.KEY])


_TRACES = {}


def _trace_cache(protocol):
    if protocol.name not in _TRACES:
        _TRACES[protocol.name] = trace(protocol, 11, 1)
    return _TRACES[protocol.name]


# -- requests a node must refuse ----------------------------------------------------------------


def client_context(node=FIRST):
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config={})


@pytest.mark.parametrize("change", [
    {"protocol": "secagg+"}, {"params": "{}"}, {"round": -1}, {"session": b"short"}, {"client": 7},
    {"max_examples": -1}, {"payload": None}, {"phase": "unmasking"}, {"n": 0}, {"v": 1},
    # another node list or nonce than the session binds (a server showing nodes different lists)
    {"nodes": (FIRST + 1).to_bytes(8, "big")}, {"nonce": bytes(32)}, {"nodes": bytes(16), "n": 2},
    {"party": "decryptor"},  # a role this node was not configured to play
])
def test_a_node_refuses_bad_requests_with_an_error_reply(change):
    protocol = sf.protocols.Plain()
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(1))
    rnd = AggregationRound(protocol, [FIRST], round_index=1, dim=apps.dim(), rng=RandomSource(0))
    (msg,) = rnd.messages("upload", ttl=60, arrays=apps.model(), config=ConfigRecord({"server-round": 1}))
    rec = dict(msg.content[_envelope.KEY])
    rec.update({k: v for k, v in change.items() if v is not None})
    for k in (k for k, v in change.items() if v is None):
        rec.pop(k)
    msg.content[_envelope.KEY] = ConfigRecord(rec)
    grid.push_messages([msg])
    (reply,) = grid.pull_messages([msg.metadata.message_id])
    assert reply.has_error() and reply.error.reason.startswith("securefed: ")


def test_a_node_refuses_a_round_that_puts_another_node_at_its_client_index():
    """The session binds the node list; a node also checks that the list names it at its index."""
    protocol = sf.protocols.Plain()
    client = SecureClient(protocol, seed=0)
    InProcessGrid(apps.client_app(protocol, updates), apps.nodes(1))  # sets Flower's task identity
    rnd = AggregationRound(protocol, [FIRST + 5, FIRST + 6], round_index=1, dim=apps.dim(), rng=RandomSource(0))
    msg = rnd.messages("upload", ttl=60, arrays=apps.model(), config=ConfigRecord({"server-round": 1}))[0]
    msg.metadata.__dict__["_message_id"] = "m"
    assert msg.content[_envelope.KEY]["session"] == rnd.spec.session_id
    reply = client.handle(msg, client_context(FIRST), lambda m, c: None)
    assert reply.has_error() and "another node" in reply.error.reason


def test_a_stale_request_leaves_the_nodes_round_state_alone():
    protocol = sf.protocols.Plain()
    client = SecureClient(protocol, seed=0)
    context = client_context()
    saved = ConfigRecord({"round": 5, "session": bytes(32), "client": 0, "party": "",
                          "state": b"state of round 5"})
    context.state[_envelope.KEY] = saved
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(1))  # sets Flower's task identity
    rnd = AggregationRound(protocol, [FIRST], round_index=4, dim=apps.dim(), rng=RandomSource(0))
    (msg,) = rnd.messages("upload", ttl=60, arrays=apps.model(), config=ConfigRecord({"server-round": 4}))
    msg.metadata.__dict__["_message_id"] = "m"
    reply = client.handle(msg, context, lambda m, c: None)
    assert reply.has_error() and "stale" in reply.error.reason
    assert dict(context.state[_envelope.KEY]) == dict(saved)
    assert grid.get_node_ids() == [FIRST]


def test_the_training_reply_must_hold_the_model_and_example_count():
    protocol = sf.protocols.Plain()
    bad_replies = [
        lambda m: None,
        lambda m: Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=m),
        lambda m: Message(RecordDict({"arrays": ArrayRecord([np.ones(3, np.float32)]),
                                      "metrics": MetricRecord({"num-examples": 3})}), reply_to=m),
        lambda m: Message(RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({"loss": 1.0})}),
                          reply_to=m),
    ]
    for make in bad_replies:
        client = SecureClient(protocol, seed=0)
        InProcessGrid(apps.client_app(protocol, updates), apps.nodes(1))
        rnd = AggregationRound(protocol, [FIRST], round_index=1, dim=apps.dim() + 1, rng=RandomSource(0),
                               max_examples=10)
        (msg,) = rnd.messages("upload", ttl=60, arrays=apps.model(), config=ConfigRecord({"server-round": 1}))
        msg.metadata.__dict__["_message_id"] = "m"
        reply = client.handle(msg, client_context(), lambda m, c: make(m))
        assert reply.has_error() and "InvalidInput" in reply.error.reason


def test_a_wrongly_signed_reply_drops_only_its_sender():
    """Active SecAgg+: every node signs its keys; a bad signature makes only its sender a dropout.

    Client indices are the ranks of the round's node ids, stable here (every node, every round),
    so each node holds the identity directory with its own signing key."""
    from securefed.crypto.signing import KeyDirectory

    n = 6  # the active threat model needs t > (n + corrupt) / 2 and t <= n - dropouts
    keys = KeyDirectory.generate(n, RandomSource(9))
    server_side = sf.protocols.SecAggPlus(adversary="active", identities=keys.public_only())

    def node_protocol(context):
        return sf.protocols.SecAggPlus(adversary="active", identities=keys.restricted_to(context.node_id - FIRST))

    victim = FIRST + 3

    def tamper(node, reply):
        rec = reply.content[_envelope.KEY]
        if node == victim and rec["phase"] == "advertise_keys":
            payload = bytearray(rec["payload"])
            payload[-1] ^= 1  # the last byte of the signature over its public keys
            with_record(reply, payload=bytes(payload))
        return reply

    app = apps.client_app(node_protocol, updates, phases=server_side.phases)
    grid = InProcessGrid(app, apps.nodes(n), tamper=tamper)
    agg = GridAggregator(server_side, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01)
    out = agg.run(grid, grid.get_node_ids(), round_index=1, dim=apps.dim(), rng=RandomSource(3),
                  arrays=apps.model(), config=ConfigRecord({"server-round": 1}))
    assert {v: (d.phase, d.reason) for v, d in out.dropped_nodes.items()} == {
        victim: ("advertise_keys", DropReason.REJECTED)}
    assert out.included_nodes == tuple(v for v in range(FIRST, FIRST + n) if v != victim)
    np.testing.assert_allclose(out.result.total, np.full(apps.dim(), (1 + 2 + 3 + 5 + 6) / 8),
                               atol=server_side.error_bound(n))
