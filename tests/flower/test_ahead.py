"""The next round's setup riding on this round's messages (GridAggregator.run(..., next_nodes=...)), in process:
two messages per node per steady-state round, sums as without riding, dropouts between rounds, membership
changes and a restarted server (protocols/flower.md section 3, proofs/flower.md Lemma F-ahead)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected
from securefed.flower import _envelope
from securefed.flower.testing import InProcessGrid
from securefed.protocols.base import DropReason
from tests.flower import apps

PROTOCOLS = [sf.protocols.SecAggPlus(), sf.protocols.SecAgg()]


def delta(p: int, rnd: int) -> np.ndarray:
    return np.full(apps.dim(), (p + 1) / 16 + rnd / 32)


def expected(members, rnd: int) -> np.ndarray:
    return sum(delta(v - apps.FIRST, rnd) for v in members)


class Recorder:
    """deliver hook: records the message types and the envelope keys each node receives, per round."""

    def __init__(self, offline=()):
        self.offline = set(offline)
        self.log: list[tuple[int, int, str, frozenset[str]]] = []

    def __call__(self, node, msg):
        rnd = int(msg.content[_envelope.KEY]["round"])
        self.log.append((rnd, node, msg.metadata.message_type, frozenset(msg.content.keys())))
        return node not in self.offline

    def per_node(self, rnd):
        out: dict[int, list[str]] = {}
        for r, node, kind, _ in self.log:
            if r == rnd:
                out.setdefault(node, []).append(kind)
        return out


def run(agg, grid, members, rnd, next_nodes=None, seed=None):
    return agg.run(grid, sorted(members), round_index=rnd, dim=apps.dim(), rng=RandomSource(seed or rnd),
                   arrays=apps.model(), config=ConfigRecord({"server-round": rnd}), next_nodes=next_nodes)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_steady_state_rounds_take_two_messages_per_node_with_their_own_sessions(protocol):
    n, rounds = 5, 4
    rec = Recorder()
    grid = InProcessGrid(apps.client_app(protocol, delta), apps.nodes(n), deliver=rec)
    agg = apps.aggregator(protocol)
    members = list(apps.nodes(n))
    outs = [run(agg, grid, members, r, next_nodes=members if r < rounds else None) for r in range(1, rounds + 1)]
    for r, out in enumerate(outs, 1):
        assert out.included_nodes == tuple(members)
        np.testing.assert_allclose(out.result.total, expected(members, r), atol=protocol.error_bound(n))
    # Messages are logged by the round of their own request: round r's setup rode on round r-1's messages.
    first = rec.per_node(1)
    assert all(len(kinds) == 4 for kinds in first.values())  # round 1 pays the full setup
    for r in range(2, rounds + 1):
        assert rec.per_node(r) == {v: ["train", "query.unmasking"] for v in members}
    riding = [keys for r, _, _, keys in rec.log if r > 1 or _envelope.NEXT_KEY in keys]
    assert sum(_envelope.NEXT_KEY in keys for keys in riding) == 2 * n * (rounds - 1)
    assert sum(grid.sent.values()) == n * (4 + 2 * (rounds - 1))
    sessions = [out.result.spec.session_id for out in outs]
    assert len(set(sessions)) == rounds
    assert agg.prepared is None


def test_a_node_sampled_for_the_next_round_that_vanishes_drops_out_of_that_round_only():
    protocol = sf.protocols.SecAggPlus()
    members = list(apps.nodes(6))
    now, later = members[:5], members  # node 1006 is sampled for round 2 but never answers
    rec = Recorder(offline={1006})
    grid = InProcessGrid(apps.client_app(protocol, delta), apps.nodes(6), deliver=rec)
    agg = apps.aggregator(protocol)
    out1 = run(agg, grid, now, 1, next_nodes=later)
    assert out1.included_nodes == tuple(now)
    np.testing.assert_allclose(out1.result.total, expected(now, 1), atol=protocol.error_bound(5))
    assert agg.prepared is not None and agg.prepared.nodes == tuple(later)
    out2 = run(agg, grid, later, 2)
    assert out2.included_nodes == tuple(now)
    assert {v: (d.phase, d.reason) for v, d in out2.dropped_nodes.items()} == {
        1006: ("advertise_keys", DropReason.NO_REPLY)}
    np.testing.assert_allclose(out2.result.total, expected(now, 2), atol=protocol.error_bound(6))
    # 1006 got its round-2 setup as messages of its own (it is not in round 1); the others got it riding.
    assert [k for r, v, k, _ in rec.log if v == 1006] == ["query.advertise_keys"]


def test_a_node_in_both_rounds_that_vanishes_after_its_input_stays_in_this_sum_and_leaves_the_next():
    protocol = sf.protocols.SecAggPlus()
    members = list(apps.nodes(5))
    gone = {"after": False}

    def deliver(node, msg):
        if node == 1003 and msg.metadata.message_type == "query.unmasking":
            gone["after"] = True
        return not (node == 1003 and gone["after"])

    grid = InProcessGrid(apps.client_app(protocol, delta), apps.nodes(5), deliver=deliver)
    agg = apps.aggregator(protocol)
    out1 = run(agg, grid, members, 1, next_nodes=members)
    assert out1.included_nodes == tuple(members)  # its masked input is in; the others unmask without it
    np.testing.assert_allclose(out1.result.total, expected(members, 1), atol=protocol.error_bound(5))
    out2 = run(agg, grid, members, 2)
    assert out2.dropped_nodes[1003].phase == "share_keys"
    rest = [v for v in members if v != 1003]
    assert out2.included_nodes == tuple(rest)
    np.testing.assert_allclose(out2.result.total, expected(rest, 2), atol=protocol.error_bound(5))


def test_other_nodes_or_a_restarted_server_discard_what_ran_ahead_and_pay_the_full_setup():
    protocol = sf.protocols.SecAggPlus()
    members = list(apps.nodes(6))
    rec = Recorder()
    grid = InProcessGrid(apps.client_app(protocol, delta), apps.nodes(6), deliver=rec)
    agg = apps.aggregator(protocol)
    run(agg, grid, members[:5], 1, next_nodes=members[:5])
    out2 = run(agg, grid, members[1:], 2, next_nodes=members[1:])  # membership changed: full setup
    np.testing.assert_allclose(out2.result.total, expected(members[1:], 2), atol=protocol.error_bound(5))
    assert all(len(kinds) == 4 for kinds in rec.per_node(2).values())
    # A server restarted from a checkpoint has nothing prepared: round 3 reruns its setup with a new session
    # while the nodes still hold the setup state of the discarded one.
    fresh = apps.aggregator(protocol)
    out3 = run(fresh, grid, members[1:], 3)
    assert out3.result.spec.session_id != agg.prepared.spec.session_id
    np.testing.assert_allclose(out3.result.total, expected(members[1:], 3), atol=protocol.error_bound(5))
    assert all(len(kinds) == 4 for kinds in rec.per_node(3).values())


def test_a_refused_next_request_leaves_this_rounds_answer():
    protocol = sf.protocols.SecAggPlus()
    members = list(apps.nodes(5))
    grid = InProcessGrid(apps.client_app(protocol, delta, num_nodes=5), apps.nodes(6))
    agg = apps.aggregator(protocol)
    # Round 2's sample has six nodes: every node expects at most five (num_nodes) and refuses that part only.
    out1 = run(agg, grid, members, 1, next_nodes=list(apps.nodes(6)))
    np.testing.assert_allclose(out1.result.total, expected(members, 1), atol=protocol.error_bound(5))
    assert agg.prepared is None  # round 2's advertise_keys aborted: nothing prepared


@pytest.mark.parametrize("protocol", [sf.protocols.Plain(), sf.protocols.CKKS(key_holder="clients")],
                         ids=lambda p: p.name)
def test_protocols_without_a_setup_or_with_he_run_nothing_ahead(protocol):
    assert apps.aggregator(protocol)._ahead_round(apps.nodes(3), 2, apps.dim(), RandomSource(0), 0) is None


def test_a_riding_request_of_an_earlier_round_is_refused():
    protocol = sf.protocols.SecAggPlus()
    agg = apps.aggregator(protocol)
    ahead = agg._ahead_round(list(apps.nodes(3)), 1, apps.dim(), RandomSource(0), 0)
    current = agg._ahead_round(list(apps.nodes(3)), 2, apps.dim(), RandomSource(1), 0)
    carrier = current.messages("advertise_keys", ttl=10)[0]
    extra = ahead.messages("advertise_keys", ttl=10)[0]
    carrier.content[_envelope.NEXT_KEY] = extra.content[_envelope.KEY]
    req, _, _ = _envelope.parse_request(carrier.content, input_phase=False)
    with pytest.raises(MessageRejected, match="later round"):
        _envelope.parse_next(carrier.content, req)


def test_distributed_dp_rounds_ride_along_with_each_rounds_own_noise_encoder():
    """With distributed DP the round protocol depends on the session (its noise encoder): the riding setup
    uses the next round's, and every node's parameters check (a mismatch would be refused, not summed)."""
    from securefed.privacy import DistributedDP

    protocol, privacy = sf.protocols.SecAggPlus(), DistributedDP(noise_multiplier=0.1, clipping=0.5)
    members = list(apps.nodes(5))
    rec = Recorder()
    grid = InProcessGrid(apps.client_app(protocol, delta, privacy=privacy), apps.nodes(5), deliver=rec)
    agg = apps.aggregator(protocol, privacy=privacy)
    outs = [run(agg, grid, members, r, next_nodes=members if r < 3 else None) for r in (1, 2, 3)]
    assert all(out.included_nodes == tuple(members) for out in outs)
    assert rec.per_node(3) == {v: ["train", "query.unmasking"] for v in members}


def test_the_active_variant_rides_along_on_its_three_exchanges():
    """Active SecAgg: advertise_keys rides on masked_input and share_keys on consistency_check, so a steady
    round is three messages per node; signatures check against each round's own directory."""
    from tests.flower.test_identities import federation

    protocol = sf.protocols.SecAgg(adversary="active")
    members = list(apps.nodes(6))
    keys = federation(members)
    rec = Recorder()
    app = apps.client_app(protocol, delta, identities=lambda context: keys.restricted_to(context.node_id))
    grid = InProcessGrid(app, apps.nodes(6), deliver=rec)
    agg = apps.aggregator(protocol, identities=keys.public_only())
    outs = [run(agg, grid, members, r, next_nodes=members if r < 3 else None) for r in (1, 2, 3)]
    for r, out in enumerate(outs, 1):
        np.testing.assert_allclose(out.result.total, expected(members, r), atol=protocol.error_bound(6))
    for r in (2, 3):
        assert rec.per_node(r) == {v: ["train", "query.consistency_check", "query.unmasking"] for v in members}


# -- through the strategy: SecureFedAvg.start passes each round the next round's sample --------------------------


def fedavg(protocol, rec, *, privacy=None, nodes=5, rounds=4, **kw):
    """SecureFedAvg.start over an in-process grid of `nodes` recorded by `rec`; returns its result."""
    app = apps.client_app(protocol, delta, privacy=privacy)
    grid = InProcessGrid(app, apps.nodes(nodes), deliver=rec)
    strategy = sf.flower.SecureFedAvg(protocol=protocol, privacy=privacy, seed=5, phase_timeout=0.05,
                                      train_timeout=0.05, poll_interval=0.01, **kw)
    return strategy.start(grid, apps.model(), num_rounds=rounds)


def without_riding(monkeypatch):
    from securefed.flower import strategy

    monkeypatch.setattr(strategy, "_next_sample", lambda *args: None)


def test_the_strategy_runs_steady_rounds_in_two_messages_per_node_with_the_same_results(monkeypatch):
    protocol, rounds = sf.protocols.SecAggPlus(), 4
    rec = Recorder()
    res = fedavg(protocol, rec, rounds=rounds, weighting="uniform")
    members = list(apps.nodes(5))
    assert all(len(kinds) == 4 for kinds in rec.per_node(1).values())
    for r in range(2, rounds + 1):
        assert rec.per_node(r) == {v: ["train", "query.unmasking"] for v in members}
    assert all(r.included == tuple(members) for r in res.rounds)
    # The model moved by the mean update of every round, within the protocol's error bound per round.
    moved = sum(expected(members, r) / len(members) for r in range(1, rounds + 1))
    np.testing.assert_allclose(apps.vector(res.arrays), moved, atol=rounds * protocol.error_bound(5) / 5 + 1e-6)
    # A run without the setup riding ahead pays it every round and ends with the same model (same sessions).
    without_riding(monkeypatch)
    ref_rec = Recorder()
    ref = fedavg(protocol, ref_rec, rounds=rounds, weighting="uniform")
    assert all(len(kinds) == 4 for r in range(1, rounds + 1) for kinds in ref_rec.per_node(r).values())
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))
    assert [r.included for r in ref.rounds] == [r.included for r in res.rounds]


def test_with_privacy_and_poisson_sampling_nodes_in_consecutive_samples_get_two_messages(monkeypatch):
    """Poisson samples change from round to round: a node in rounds r - 1 and r gets two messages in round r
    (its setup rode along), a node new to round r gets its setup as messages of its own, one after a skipped
    round pays the full setup; samples, ledger, epsilon and model equal a run without riding."""
    from securefed.privacy import DistributedDP

    protocol, privacy, rounds = sf.protocols.SecAggPlus(), DistributedDP(noise_multiplier=0.5, clipping=1.0), 6
    kw = {"privacy": privacy, "nodes": 6, "rounds": rounds, "fraction_train": 0.5, "min_train_nodes": 3,
          "min_available_nodes": 6}
    rec = Recorder()
    res = fedavg(protocol, rec, **kw)
    ran = {r.round: set(r.participants) for r in res.rounds if r.included}
    steady = 0
    for r, sample in ran.items():
        for v, kinds in rec.per_node(r).items():
            assert v in sample
            if r - 1 in ran and v in ran[r - 1]:
                assert kinds == ["train", "query.unmasking"]
                steady += 1
            else:
                assert kinds == ["query.advertise_keys", "query.share_keys", "train", "query.unmasking"]
    assert steady > 0 and len({frozenset(s) for s in ran.values()}) > 1  # this seed's coins give both kinds
    without_riding(monkeypatch)
    ref = fedavg(protocol, Recorder(), **kw)
    assert [(r.participants, r.included, r.aborted) for r in ref.rounds] == [
        (r.participants, r.included, r.aborted) for r in res.rounds]
    assert [r.epsilon for r in ref.rounds] == [r.epsilon for r in res.rounds]
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


def test_a_node_sampled_for_the_next_round_that_drops_out_cools_down_and_that_round_pays_its_setup(monkeypatch):
    """Node 1003 is silent in round 2 only: it drops out of round 2 and of round 3's riding setup; round 3's
    pool leaves it out (cool-down), so the prepared round is not taken and round 3 runs its full setup; in
    round 4 it is back, with its setup as messages of its own. The model equals a run without riding."""
    protocol, members, rounds = sf.protocols.SecAggPlus(), list(apps.nodes(6)), 4
    rec = Recorder()

    def deliver(node, msg):
        rec(node, msg)
        return not (node == 1003 and int(msg.content[_envelope.KEY]["round"]) == 2)

    res = fedavg(protocol, deliver, nodes=6, rounds=rounds, weighting="uniform")
    assert [set(r.dropped) for r in res.rounds] == [set(), {1003}, set(), set()]
    rest = tuple(v for v in members if v != 1003)
    assert [r.included for r in res.rounds] == [tuple(members), rest, rest, tuple(members)]
    assert rec.per_node(2) == {v: ["train", "query.unmasking"] for v in rest} | {1003: ["train"]}
    assert all(len(kinds) == 4 for kinds in rec.per_node(3).values()) and set(rec.per_node(3)) == set(rest)
    assert rec.per_node(4) == {v: ["train", "query.unmasking"] for v in rest} | {
        1003: ["query.advertise_keys", "query.share_keys", "train", "query.unmasking"]}
    without_riding(monkeypatch)
    ref = fedavg(protocol, deliver, nodes=6, rounds=rounds, weighting="uniform")
    assert [r.included for r in ref.rounds] == [r.included for r in res.rounds]
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


def test_a_resumed_run_discards_the_prepared_round_and_pays_the_full_setup_once(tmp_path):
    """The server stops after committing round 2, whose messages carried round 3's setup (the audit witness
    fails): the resumed run discards that prepared round, so round 3 runs its full setup (the nodes start it
    afresh), round 4 rides along again, and the model is the uninterrupted run's."""
    protocol, rounds = sf.protocols.SecAggPlus(), 4
    members = list(apps.nodes(5))
    ref = fedavg(protocol, Recorder(), rounds=rounds, weighting="uniform")
    rec = Recorder()
    grid = InProcessGrid(apps.client_app(protocol, delta), apps.nodes(5), deliver=rec)

    stopped = []

    def witness(seq, head):
        if not stopped and (prepared := strategy.aggregator.prepared) is not None and prepared.spec.round_index == 3:
            stopped.append(seq)
            raise RuntimeError("the witness is unreachable")

    strategy = sf.flower.SecureFedAvg(protocol=protocol, seed=5, phase_timeout=0.05, train_timeout=0.05,
                                      poll_interval=0.01, weighting="uniform", checkpoint_dir=tmp_path / "ckpt",
                                      audit_log=tmp_path / "audit.jsonl", audit_witness=witness)
    with pytest.raises(RuntimeError, match="witness"):
        strategy.start(grid, apps.model(), num_rounds=rounds)
    assert strategy.aggregator.prepared is not None  # round 3's setup had run ahead
    rec.log.clear()
    res = strategy.start(grid, apps.model(), num_rounds=rounds)
    assert [r.round for r in res.rounds] == [1, 2, 3, 4] and res.rounds[2].included == tuple(members)
    assert rec.per_node(3) == {v: ["query.advertise_keys", "query.share_keys", "train", "query.unmasking"]
                               for v in members}
    assert rec.per_node(4) == {v: ["train", "query.unmasking"] for v in members}
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))
