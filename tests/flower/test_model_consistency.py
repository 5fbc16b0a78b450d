"""Model consistency in the active SecAgg variants (protocols/flower.md section 1; proofs/flower.md Lemma F17).

The attack (Pasquini et al. 2022; the fourth red team's B1a): an active server sends ``lr = 0`` (or another
model) to every node but one, so the other inputs are zero and the sum is that node's update. Each node now
attests the model and config it was sent with its input; a node signs the survivor list only when every listed
client attested its own, so the round aborts before any share is revealed.
"""

import struct
import types

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.flower import _attest, _envelope, _identities, aggregation
from securefed.flower.testing import InconsistentModels, InProcessGrid, roundtrip
from tests.flower import apps
from tests.flower.test_identities import federation

N = 6
VICTIM = apps.FIRST + 2
METRICS = (("loss", 10.0), ("accuracy", 1.0))

ACTIVE = {
    "secagg": lambda: sf.protocols.SecAgg(adversary="active"),
    "secagg+": lambda: sf.protocols.SecAggPlus(adversary="active"),
}


def updates(p, rnd):
    return np.full(apps.dim(), 0.01 * (p + 1)) + 0.001 * np.arange(apps.dim())


def evaluate(p, w):
    return {"loss": 1.0 + 0.37 * p, "accuracy": 0.1 + 0.13 * p}


def federation_grid(protocol, grid=InProcessGrid, **options):
    """N nodes with identity keys on `grid`; returns members, the grid, the aggregator and the nodes' refusals."""
    members = list(apps.nodes(N))
    keys = federation(members)
    refusals = []

    def tamper(node, reply):
        if reply.has_error():
            refusals.append(reply.error.reason)
        return reply

    app = apps.client_app(protocol, updates, seed=None, evaluate=evaluate,
                          identities=lambda context: keys.restricted_to(context.node_id))
    g = grid(app, apps.nodes(N), tamper=options.pop("tamper", tamper), **options)
    return members, g, apps.aggregator(protocol, identities=keys.public_only()), refusals


@pytest.fixture
def malicious_server(monkeypatch):
    """The server's own check of each attestation against what it meant to send, switched off: a malicious
    server skips it (with it, securefed's server drops every input made from another model itself)."""
    proxy = types.SimpleNamespace(**{k: getattr(_attest, k) for k in _attest.__all__})
    proxy.check_input = lambda identities, client, session, model, attest, run: attest[32:]
    monkeypatch.setattr(aggregation, "_attest", proxy)


def expected(parties):
    return sum(updates(p, 1) for p in parties)


@pytest.mark.parametrize("name", ACTIVE)
def test_an_honest_active_round_sums_every_input_with_each_ones_attestation(name):
    protocol = ACTIVE[name]()
    members, grid, agg, refusals = federation_grid(protocol)
    out = apps.run(agg, grid, members)
    np.testing.assert_allclose(out.result.total, expected(range(N)), atol=protocol.error_bound(N))
    assert not refusals


@pytest.mark.parametrize("name", ACTIVE)
@pytest.mark.parametrize("attack", ["config", "model", "run_config"])
def test_a_server_sending_other_models_or_configs_to_all_but_one_node_gets_no_sum(name, attack, malicious_server):
    """``run_config``: the SuperLink serves each node its run (the red team's F1: ``local-epochs = 0``)."""
    protocol = ACTIVE[name]()
    change = {"config": {"config": {"lr": 0.0}}, "model": {"arrays": apps.model(0.5)},
              "run_config": {"run_config": {"local-epochs": 0}}}[attack]
    members, grid, agg, refusals = federation_grid(protocol, InconsistentModels, victim=VICTIM, **change)
    with pytest.raises(ProtocolAborted):
        apps.run(agg, grid, members)
    # every node refused at the consistency check, before signing the list (so before any share left it)
    assert len(refusals) == N
    assert all("consistency_check_failed" in r or "did not attest" in r for r in refusals), refusals
    assert "did not attest the model and configuration" in refusals[0]


@pytest.mark.parametrize("name", ACTIVE)
def test_securefeds_own_server_drops_inputs_made_from_a_model_it_did_not_mean_to_send(name):
    """Without the malicious server, the same tampering in transit (a compromised relay) costs the nodes that got
    the other model their place in the round: their inputs never enter the sum, and the round aborts."""
    protocol = ACTIVE[name]()
    members, grid, agg, refusals = federation_grid(protocol, InconsistentModels, victim=VICTIM, config={"lr": 0.0})
    with pytest.raises(ProtocolAborted):
        apps.run(agg, grid, members)
    assert set(agg.last_round.dropped_nodes) == set(members) - {VICTIM}


def test_the_attack_is_real_the_semi_honest_variant_releases_the_victims_update(malicious_server):
    """Outside its threat model (no active server) the same grid gets the victim's exact update: the
    attack above is the one the attestation stops, not a round that would fail anyway."""
    protocol = sf.protocols.SecAgg()
    members, grid, agg, refusals = federation_grid(protocol, InconsistentModels, victim=VICTIM,
                                                   config={"lr": 0.0})
    out = apps.run(agg, grid, members)
    np.testing.assert_allclose(out.result.total, updates(VICTIM - apps.FIRST, 1), atol=protocol.error_bound(N))
    assert not refusals


@pytest.mark.parametrize("name", ACTIVE)
def test_an_evaluation_round_with_another_model_for_all_but_one_node_gets_no_means(name, malicious_server):
    protocol = ACTIVE[name]()
    members, grid, agg, refusals = federation_grid(protocol, InconsistentModels, victim=VICTIM,
                                                   arrays=apps.model(0.5))
    with pytest.raises(ProtocolAborted):
        agg.evaluate(grid, members, round_index=1, metrics=METRICS, rng=RandomSource(1), arrays=apps.model())
    assert len(refusals) == N and all("did not attest" in r or "consistency_check_failed" in r for r in refusals)


def test_a_node_that_drops_after_its_input_stays_in_the_sum_its_attestation_came_with_it():
    protocol = ACTIVE["secagg"]()
    gone = apps.FIRST + 4
    members, grid, agg, refusals = federation_grid(
        protocol, deliver=lambda node, msg: not (node == gone and msg.metadata.message_type in (
            "query.consistency_check", "query.unmasking")))
    out = apps.run(agg, grid, members)
    assert out.result.included == tuple(range(N))
    np.testing.assert_allclose(out.result.total, expected(range(N)), atol=protocol.error_bound(N))


@pytest.mark.parametrize("forge", ["missing", "other model", "other node"])
def test_an_input_without_a_valid_attestation_never_enters_the_sum(forge):
    """A corrupt node's input arrives without its attestation of the model the server sent: the server drops it
    before the sum takes it, and the honest nodes finish the round without it."""
    protocol = ACTIVE["secagg"]()
    corrupt = apps.FIRST + 1
    members = list(apps.nodes(N))
    keys = federation(members)
    directory = sf.crypto.signing.KeyDirectory({i: keys.verify_key(v) for i, v in enumerate(members)},
                                               {1: keys.signing_key(corrupt), 0: keys.signing_key(members[0])})

    def tamper(node, reply):
        if node == corrupt and reply.metadata.message_type == "train" and not reply.has_error():
            rec = reply.content[_envelope.KEY]
            forged = {"missing": b"", "other model": _attest.sign(directory, 1, rec["session"], bytes(32)),
                      "other node": _attest.sign(directory, 0, rec["session"], bytes(32))}[forge]
            rec["attest"] = forged
        return reply

    app = apps.client_app(protocol, updates, seed=None, identities=lambda context: keys.restricted_to(context.node_id))
    grid = InProcessGrid(app, apps.nodes(N), tamper=tamper)
    agg = apps.aggregator(protocol, identities=keys.public_only())
    out = apps.run(agg, grid, members)
    assert 1 not in out.result.included and len(out.result.included) == N - 1
    np.testing.assert_allclose(out.result.total, expected([p for p in range(N) if p != 1]),
                               atol=protocol.error_bound(N))


class EditAttestations(InProcessGrid):
    """A server that edits the attestations it forwards with the survivor list."""

    edit = None

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "query.consistency_check" and _envelope.KEY in msg.content:
                rec = msg.content[_envelope.KEY]
                rec["attest"] = self.edit(rec["attest"])
        return super().push_messages(messages)


@pytest.mark.parametrize("edit", [
    lambda a: a[: -_attest.RECORD],  # one survivor's left out
    lambda a: a[_attest.RECORD:] + a[: _attest.RECORD],  # unsorted
    lambda a: a[:-1] + bytes([a[-1] ^ 1]),  # one altered
    lambda a: b"",  # none
])
def test_nodes_refuse_a_survivor_list_whose_attestations_are_incomplete_or_altered(edit):
    protocol = ACTIVE["secagg"]()
    members, grid, agg, refusals = federation_grid(protocol, EditAttestations)
    grid.edit = edit
    with pytest.raises(ProtocolAborted):
        apps.run(agg, grid, members)
    assert len(refusals) == N


def test_check_survivors_refuses_clients_outside_the_list_and_malformed_fields():
    members = list(range(4))
    keys = sf.crypto.signing.KeyDirectory.generate(4)
    session, model = bytes(range(32)), b"m" * 32
    payload = np.array([0, 1, 3])
    good = _attest.pack({c: _attest.sign(keys, c, session, model) for c in (0, 1, 3)})
    _attest.check_survivors(keys, session, model, payload, good)  # all listed, all over this model
    extra = _attest.pack({c: _attest.sign(keys, c, session, model) for c in members})
    with pytest.raises(ProtocolAborted) as e:
        _attest.check_survivors(keys, session, model, payload, extra)
    assert e.value.reason is AbortReason.CONSISTENCY_CHECK_FAILED
    with pytest.raises(ProtocolAborted):
        _attest.check_survivors(keys, session, b"n" * 32, payload, good)  # this node had another model
    with pytest.raises(ProtocolAborted):
        _attest.check_survivors(keys, bytes(32), model, payload, good)  # another session's
    with pytest.raises(MessageRejected):
        _attest.check_survivors(keys, session, model, payload, good + b"x")


_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                     st.text(max_size=8), st.binary(max_size=8))
_values = st.one_of(_scalars, st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),
                    st.lists(st.floats(allow_nan=False), max_size=4), st.lists(st.text(max_size=4), max_size=4))
_configs = st.dictionaries(st.text(min_size=1, max_size=6), _values, max_size=5)


def _canonical(value):
    """A config as typed values, floats by their bits (0.0 and -0.0 differ, as in the digest)."""
    if isinstance(value, dict):
        return sorted((k, _canonical(v)) for k, v in value.items())
    if isinstance(value, list):
        return ("list", [_canonical(v) for v in value])
    return (type(value).__name__, struct.pack(">d", value) if isinstance(value, float) else value)


@given(_configs, st.floats(-2.0, 2.0, allow_nan=False), st.data())
def test_the_digest_survives_flowers_transport_and_tells_configs_and_models_apart(a, value, data):
    arrays = apps.model(value)
    how = data.draw(st.sampled_from(["copy", "one entry", "other"]))
    if how == "copy":
        b = dict(a)
    elif how == "one entry":  # one value replaced (maybe by an equal one) or one entry added
        b = {**a, data.draw(st.sampled_from(sorted(a)) if a else st.just("k")): data.draw(_values)}
    else:
        b = data.draw(_configs)
    da = _attest.digest(arrays, ConfigRecord(a))
    # what the node computes from the inflated message is what the server computed from its records
    assert _attest.digest(roundtrip(arrays), roundtrip(ConfigRecord(a))) == da
    assert (_attest.digest(arrays, ConfigRecord(b)) == da) == (_canonical(a) == _canonical(b))
    assert _attest.digest(apps.model(value + 1.0), ConfigRecord(a)) != da
    assert _attest.digest(ArrayRecord(), ConfigRecord(a)) != da


def test_a_nan_of_another_sign_or_payload_is_another_config():
    """The red team's F2: ``float.hex`` gave every NaN one text, so configs differing in a NaN's sign had one
    digest; the digest takes a float's 8 bytes."""
    nan = float("nan")
    negative = struct.unpack(">d", bytes.fromhex("fff8000000000000"))[0]
    payload = struct.unpack(">d", bytes.fromhex("7ff8000000000001"))[0]
    digests = {_attest.digest(ArrayRecord(), ConfigRecord({"x": v})) for v in (nan, negative, payload)}
    assert len(digests) == 3
    assert _attest.run_digest({"x": 0.0}) != _attest.run_digest({"x": -0.0})


def test_values_of_other_types_or_splits_never_share_a_digest():
    configs = [{"x": True}, {"x": 1}, {"x": 1.0}, {"x": "1"}, {"x": b"1"}, {"x": [1]}, {"x": [True]}, {"x": ["1"]},
               {"x": []}, {"x": [1, 1]}, {"ab": "c"}, {"a": "bc"}, {"a": "b", "c": ""}, {}]
    digests = {_attest.digest(ArrayRecord(), ConfigRecord(c)) for c in configs}
    assert len(digests) == len(configs)
    assert len({_attest.run_digest(c) for c in configs}) == len(configs)


@pytest.mark.parametrize("known", [True, False])
def test_a_corrupt_nodes_other_run_config_claim_is_dropped_when_the_server_knows_the_run_config(known):
    """With ``run_config=`` the server drops an input attested under another run configuration before the sum
    takes it; without it, the server takes the node's word, and the honest nodes refuse the round (spec
    section 1: pass the ServerApp's ``context.run_config``)."""
    protocol = ACTIVE["secagg"]()
    corrupt = apps.FIRST + 1
    members = list(apps.nodes(N))
    keys = federation(members)
    run = {"local-epochs": 1}

    def tamper(node, reply):
        if node == corrupt and reply.metadata.message_type == "train" and not reply.has_error():
            rec = reply.content[_envelope.KEY]
            other = _attest.run_digest({"local-epochs": 5})
            model = _attest.digest(apps.model(), ConfigRecord({"server-round": 1}))
            own = sf.crypto.signing.KeyDirectory({1: keys.verify_key(corrupt)}, {1: keys.signing_key(corrupt)})
            rec["attest"] = other + _attest.sign(own, 1, rec["session"], model + other)
        return reply

    app = apps.client_app(protocol, updates, seed=None, identities=lambda context: keys.restricted_to(context.node_id))
    grid = InProcessGrid(app, apps.nodes(N), tamper=tamper, run_config=run)
    agg = apps.aggregator(protocol, identities=keys.public_only(), run_config=run if known else None)
    if not known:
        with pytest.raises(ProtocolAborted):
            apps.run(agg, grid, members)
        return
    out = apps.run(agg, grid, members)
    assert out.result.included == tuple(p for p in range(N) if p != 1)
    np.testing.assert_allclose(out.result.total, expected([p for p in range(N) if p != 1]),
                               atol=protocol.error_bound(N))


def _masked_bfv(masking):
    return sf.protocols.BFV(value_range=1.0, key_holder="masked", masking=masking)


@pytest.mark.parametrize("name", ACTIVE)
def test_masked_bfv_with_an_active_masking_protocol_attests_too(name, malicious_server):
    """The red team's F3: BFV in masked mode runs its masking protocol's consistency check, and now the model
    attestation with it (the simulated PKI of one process stands in for the nodes' keys)."""
    decryptor = 2001
    nodes = {**apps.nodes(N), decryptor: {"role": "decryptor"}}
    members = list(apps.nodes(N))

    protocol = _masked_bfv(ACTIVE[name]())  # one object: its simulated PKI is the nodes' and the server's

    def app():
        return apps.client_app(protocol, updates, seed=None,
                               auxiliary=lambda c: {"decryptor"} if c.node_config.get("role") == "decryptor" else set())

    honest = apps.run(apps.aggregator(protocol, auxiliary={"decryptor": decryptor}), InProcessGrid(app(), nodes),
                      members)
    np.testing.assert_allclose(honest.result.total, expected(range(N)), atol=protocol.error_bound(N))
    refusals = []
    grid = InconsistentModels(app(), nodes, victim=VICTIM, config={"lr": 0.0},
                              tamper=lambda node, r: (refusals.append(r.error.reason) or r) if r.has_error() else r)
    with pytest.raises(ProtocolAborted):
        apps.run(apps.aggregator(protocol, auxiliary={"decryptor": decryptor}), grid, members)
    assert sum("did not attest" in r for r in refusals) >= N - 1, refusals


def test_masked_bfv_keeps_the_rounds_identities_through_the_dp_noise_encoder():
    """Red team 7: ``BFV.with_encoder`` (the DistributedDP noise encoder, applied after the round's identities
    are bound) rebuilt the masking protocol and lost them, so every such round aborted."""
    members = list(apps.nodes(N))
    keys = federation(members)
    protocol = _masked_bfv(ACTIVE["secagg"]())
    bound = _identities.bind(protocol, keys.public_only(), members)
    again = bound.with_encoder(bound.encoder)
    assert again.round_identities(N) is bound.round_identities(N) is not None
    assert again.round_identities(N).verify_key(2) == keys.verify_key(members[2])

