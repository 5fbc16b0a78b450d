"""Federated evaluation with securely aggregated metrics (issue 24, point 4; protocols/flower.md section 6,
"Federated evaluation"; proofs/flower.md Lemma F16).

Each node evaluates the model on its own data; the protocol sums ``[w m / b ..., w]`` and the server
learns only the example-weighted means. Attacked here: a server that reruns an evaluation round over
subsets (differencing), one that mixes training and evaluation in one session, one that asks DP nodes
to evaluate; and the accounting of what a node sends.
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, InvalidInput, MessageRejected, ProtocolAborted
from securefed.flower import SecureFedAvg, _envelope
from securefed.flower._evaluation import means
from securefed.flower.aggregation import AggregationRound, evaluation_protocol
from securefed.flower.client import GIVEN_KEY, SecureClient
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

N = 4
METRICS = {"loss": 10.0, "accuracy": 1.0}
CAP = 12
EXAMPLES = {p: 5 * (p + 1) for p in range(N)}  # 5, 10, 15, 20: the last two are capped at CAP


def updates(p, rnd):
    return np.full(apps.dim(), 0.1 * (p + 1))


def evaluate(p, w):
    return {"loss": float(np.mean(w)) + p, "accuracy": 0.25 * p}


def expected(w, nodes=range(N)):
    """The example-weighted means (weights capped at CAP) of `evaluate` over `nodes` at model vector `w`."""
    wts = np.array([min(EXAMPLES[p], CAP) for p in nodes], float)
    got = [evaluate(p, w) for p in nodes]
    return {k: float(np.dot(wts, [g[k] for g in got]) / wts.sum()) for k in METRICS}


def strategy(protocol, **kw):
    kw.setdefault("evaluate_metrics", METRICS)
    kw.setdefault("max_examples", CAP)
    return SecureFedAvg(protocol=protocol, seed=3, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01, **kw)


def grid(protocol, **kw):
    return InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate, **kw),
                         apps.nodes(N))


PROTOCOLS = {
    "plain": sf.protocols.Plain(),
    "secagg": sf.protocols.SecAgg(),
    "secaggplus": sf.protocols.SecAggPlus(),
    "ckks": sf.protocols.CKKS(value_range=1.0, key_holder="clients", min_clients=2),
}


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_each_round_evaluates_the_released_model_and_the_means_are_the_weighted_means(name):
    protocol = PROTOCOLS[name]
    g = grid(protocol)
    res = strategy(protocol).start(g, apps.model(), num_rounds=2, evaluate_config=ConfigRecord({"batch": 4}))
    assert sorted(res.evaluate_metrics_clientapp) == [1, 2]
    # Each round's evaluation is of the model that round released: round 2's of the final one.
    final = float(apps.vector(res.arrays).mean())
    got = res.evaluate_metrics_clientapp[2]
    want = expected(np.full(apps.dim(), final))
    for k, bound in METRICS.items():
        assert abs(got[k] - want[k]) <= 1e-4 * bound, (k, got[k], want[k])
    assert got["num-examples"] == sum(min(e, CAP) for e in EXAMPLES.values())
    assert got["included"] == N
    assert res.rounds[1].metrics["federated_loss"] == got["loss"]  # the report (and the audit entry) has them


@given(values=st.lists(st.tuples(st.floats(-10, 10), st.floats(0, 1), st.integers(1, 40)), min_size=3, max_size=6))
def test_for_all_metrics_within_their_bounds_the_secure_means_match_the_weighted_means(values):
    """SecAgg+ at EVALUATION_BITS: |released mean - exact weighted mean| within the encoding's error."""
    n = len(values)
    protocol = sf.protocols.SecAggPlus()

    def ev(p, w):
        return {"loss": values[p][0], "accuracy": values[p][1]}

    examples = {p: v[2] for p, v in enumerate(values)}
    g = InProcessGrid(apps.client_app(protocol, updates, examples=examples, evaluate=ev), apps.nodes(n))
    out = apps.aggregator(protocol).evaluate(g, list(apps.nodes(n)), round_index=1, metrics=tuple(METRICS.items()),
                                             rng=RandomSource(1), arrays=apps.model(), max_examples=CAP)
    got = means(tuple(METRICS.items()), out.result.total, CAP)
    wts = np.array([min(v[2], CAP) / CAP for v in values])
    err = evaluation_protocol(protocol).error_bound(n)
    for i, (k, bound) in enumerate(METRICS.items()):
        want = float(np.dot(wts, [v[i] for v in values]) / wts.sum())
        tol = err * (bound + abs(want)) / (wts.sum() - err) + 1e-12
        assert abs(got[k] - want) <= tol, (k, got[k], want, tol)


def test_evaluation_changes_nothing_in_training_and_costs_its_own_messages():
    """The training rounds (and their setup riding ahead) are the same with evaluation on; each evaluation
    round of SecAgg+ is its protocol's four exchanges."""
    protocol = sf.protocols.SecAggPlus()
    plain, ev = grid(protocol), grid(protocol)
    ref = strategy(protocol, evaluate_metrics=None).start(plain, apps.model(), num_rounds=3)
    res = strategy(protocol).start(ev, apps.model(), num_rounds=3)
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))
    assert all(v == 4 + 2 + 2 for v in plain.sent.values())  # full setup, then two messages per round
    assert all(v == 4 + 2 + 2 + 3 * 4 for v in ev.sent.values())


def test_the_server_receives_no_metric_of_one_node():
    """Every reply of an evaluation round holds only securefed's envelope: the user's metrics stay on the node."""
    protocol = sf.protocols.SecAggPlus()
    replies = []
    g = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N),
                      tamper=lambda node, reply: replies.append(reply) or reply)
    apps.aggregator(protocol).evaluate(g, list(apps.nodes(N)), round_index=1, metrics=tuple(METRICS.items()),
                                       rng=RandomSource(1), arrays=apps.model(), max_examples=CAP)
    assert len(replies) == 4 * N and not any(r.has_error() for r in replies)
    assert all(set(r.content.keys()) == {_envelope.KEY} for r in replies)
    assert not any(r.content.metric_records or r.content.array_records for r in replies)


class Rerun:
    """A server that runs evaluation round 1 over subsets of the nodes (a new session each time)."""

    def __init__(self, protocol, n=3):
        self.protocol, self.allowed, self.replies = protocol, set(), []
        self.clients = list(apps.nodes(n))
        self.values = {p: {"loss": 1.0 + p, "accuracy": 0.1 * p} for p in range(n)}
        self.grid = InProcessGrid(
            apps.client_app(protocol, updates, examples=dict.fromkeys(range(n), CAP),
                            evaluate=lambda p, w: self.values[p]),
            apps.nodes(n), deliver=lambda node, msg: node in self.allowed,
            tamper=lambda node, reply: self.replies.append(reply) or reply)

    def run(self, subset, seed):
        self.allowed = {self.clients[i] for i in subset}
        try:
            out = apps.aggregator(self.protocol).evaluate(
                self.grid, self.clients, round_index=1, metrics=tuple(METRICS.items()), rng=RandomSource(seed),
                arrays=apps.model(), max_examples=CAP)
        except ProtocolAborted:
            return None
        return out.result.total


@pytest.mark.parametrize("forgetful", [True, False])
def test_a_node_gives_one_evaluation_input_per_round_index(forgetful, monkeypatch):
    """Evaluation rounds over {0, 1, 2} and {1, 2} of one round index give node 0's metrics by differencing
    when nodes keep no record; with the record, the rerun is refused and releases nothing."""
    if forgetful:
        monkeypatch.setattr(SecureClient, "_once", staticmethod(lambda *args, **kwargs: None))
    attack = Rerun(sf.protocols.Plain())
    first, second = attack.run([0, 1, 2], seed=1), attack.run([1, 2], seed=2)
    if forgetful:
        leaked = (first - second)[0] * METRICS["loss"]
        assert abs(leaked - attack.values[0]["loss"]) < 1e-6
        return
    assert second is None
    refusals = [r for r in attack.replies if r.has_error()]
    assert refusals and all("already gave its evaluation input in round 1" in r.error.reason for r in refusals)
    given = attack.grid.context(attack.clients[1]).state[GIVEN_KEY]
    assert given["client@evaluate/round"] == 1 and "client/round" not in given


def test_evaluation_after_training_in_one_round_index_is_taken_and_a_rollback_is_not():
    protocol = sf.protocols.SecAgg()
    g = grid(protocol)
    agg = apps.aggregator(protocol)
    apps.run(agg, g, list(apps.nodes(N)), round_index=2)
    ok = agg.evaluate(g, list(apps.nodes(N)), round_index=2, metrics=tuple(METRICS.items()), rng=RandomSource(5),
                      arrays=apps.model(), max_examples=CAP)
    assert len(ok.included_nodes) == N
    with pytest.raises(ProtocolAborted):  # round 1 is below the round in which every node gave
        agg.evaluate(g, list(apps.nodes(N)), round_index=1, metrics=tuple(METRICS.items()), rng=RandomSource(6),
                     arrays=apps.model(), max_examples=CAP)


def test_a_session_is_of_one_kind():
    """A request with evaluation params under a training session (or the reverse) is malformed: the
    session id's label names the kind, so one session never mixes trainers and evaluators."""
    protocol = sf.protocols.Plain()
    nodes = _envelope.pack_nodes([1, 2])
    nonce = bytes(32)
    train = _envelope.describe(protocol, 2)
    ev = _envelope.describe(evaluation_protocol(protocol), 2, None, tuple(METRICS.items()))

    def request(params, evaluate):
        bound = _envelope.binding(1, 6, CAP, None, tuple(METRICS.items()) if evaluate else None)
        session = _envelope.session_id(nonce, nodes, evaluate=evaluate, bound=bound)
        req = _envelope.Request("plain", params, "upload", 1, 2, 6, session, nonce, nodes, 0, "", CAP, b"")
        return RecordDict({_envelope.KEY: req.record()})

    assert _envelope.parse_request(request(ev, True), input_phase=False)[0].params == ev
    assert _envelope.parse_request(request(train, False), input_phase=False)[0].params == train
    for params, evaluate in ((ev, False), (train, True)):
        with pytest.raises(MessageRejected, match="session"):
            _envelope.parse_request(request(params, evaluate), input_phase=False)
    bad = ['{"evaluate":[["loss",-1]]}', '{"evaluate":[["loss",1e999]]}', '{"evaluate":[["loss",' + "9" * 400 + "]]}",
           '{"evaluate":' + "[" * 100_000 + "]" * 100_000 + "}", '{"evaluate":[["num-examples",1]]}',
           '{"evaluate":[["loss",1],["loss",2]]}', '{"evaluate":[]}', '{"evaluate":{"loss":1}}', "[1]", "nonsense"]
    for params in bad:  # never anything but MessageRejected (a node must not fail with another error)
        with pytest.raises(MessageRejected):
            _envelope.evaluation(params)


def test_a_train_message_with_evaluation_params_and_the_reverse_are_refused():
    """The server relabels an evaluation round's input messages as training (and a training round's as
    evaluation): the node refuses, since the params name the kind and the message type must match it."""
    protocol = sf.protocols.Plain()
    replies = []
    g = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(2),
                      tamper=lambda node, reply: replies.append(reply) or reply)
    rnd = AggregationRound(protocol, list(apps.nodes(2)), round_index=1, dim=6, rng=RandomSource(1),
                           max_examples=CAP, evaluate=tuple(METRICS.items()))
    messages = rnd.messages("upload", ttl=1.0, arrays=apps.model(), config=ConfigRecord())
    assert {m.metadata.message_type for m in messages} == {"evaluate"}
    relabelled = [Message(m.content, m.metadata.dst_node_id, "train", ttl=1.0) for m in messages]
    train = AggregationRound(protocol, list(apps.nodes(2)), round_index=1, dim=apps.dim(), rng=RandomSource(2),
                             max_examples=CAP).messages("upload", ttl=1.0, arrays=apps.model(), config=ConfigRecord())
    relabelled += [Message(m.content, m.metadata.dst_node_id, "evaluate", ttl=1.0) for m in train]
    list(g.push_messages(relabelled))
    assert len(replies) == 4 and all(r.has_error() and "wrong message type" in r.error.reason for r in replies)


def test_nodes_with_dp_refuse_evaluation_and_the_strategy_refuses_it_with_privacy():
    privacy = sf.privacy.CentralDP(noise_multiplier=1.0, clipping=1.0)
    with pytest.raises(ConfigurationError, match="privacy budget"):
        strategy(sf.protocols.SecAgg(), privacy=privacy)
    protocol = sf.protocols.SecAgg()
    replies = []
    g = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate, privacy=privacy),
                      apps.nodes(N), tamper=lambda node, reply: replies.append(reply) or reply)
    with pytest.raises(ProtocolAborted):  # the server runs one anyway, without DP on its side
        apps.aggregator(protocol).evaluate(g, list(apps.nodes(N)), round_index=1, metrics=tuple(METRICS.items()),
                                           rng=RandomSource(1), arrays=apps.model(), max_examples=CAP)
    assert replies and all(r.has_error() and "differential privacy" in r.error.reason for r in replies)


def test_a_metric_outside_its_bound_is_clamped_and_counted_and_a_missing_one_is_refused(caplog):
    """A node answers alike whatever its values: a metric over its bound is clamped and counted in the sum
    (``clipped:<metric>``), a non-finite one excludes the node's metrics (``excluded``). A red team read every
    node's exact metric from its refusal's reason, and then, with the reason fixed, from the refusal itself
    (a server varying the bound over rounds learned whether each node's loss was under it). Only a metric the
    node's code does not produce at all is refused, with a reason that shows no value."""
    protocol = sf.protocols.SecAggPlus()
    values = {0: {"loss": 9.87654321, "accuracy": 0.5}, 1: {"loss": 1.0}, 2: {"loss": float("nan"), "accuracy": 0.1},
              3: {"loss": 1.8, "accuracy": 0.25}, 4: {"loss": 1.9, "accuracy": 0.75}}
    examples = {0: 10, 1: 10, 2: 10, 3: 10, 4: 30}
    replies = []
    g = InProcessGrid(apps.client_app(protocol, updates, examples=examples, evaluate=lambda p, w: values[p]),
                      apps.nodes(5), tamper=lambda node, reply: replies.append((node, reply)) or reply)
    out = apps.aggregator(protocol).evaluate(g, list(apps.nodes(5)), round_index=1, metrics=(("loss", 5.0),
                                             ("accuracy", 1.0)), rng=RandomSource(1), arrays=apps.model(),
                                             max_examples=CAP)
    assert set(out.dropped_nodes) == {apps.FIRST + 1}  # no 'accuracy' at all: its code, not its data
    detail = out.dropped_nodes[apps.FIRST + 1].detail
    assert "failed a local check" in detail and "accuracy" not in detail
    assert "lacks the numbers ['accuracy']" in caplog.text  # the node's own log
    assert not any(r.has_error() for node, r in replies if node != apps.FIRST + 1)  # the others answer alike
    got = means((("loss", 5.0), ("accuracy", 1.0)), out.result.total, CAP, len(out.included_nodes),
                evaluation_protocol(protocol).error_bound(4))
    w = {0: 10, 3: 10, 4: 12}  # node 4's 30 examples capped at 12; node 2 excluded (NaN)
    want_loss = (10 * 5.0 + 10 * 1.8 + 12 * 1.9) / 32  # node 0's loss clamped to 5
    assert got["loss"] == pytest.approx(want_loss, abs=1e-6)
    assert got["accuracy"] == pytest.approx((10 * 0.5 + 10 * 0.25 + 12 * 0.75) / 32, abs=1e-6)
    assert (got["clipped:loss"], got["clipped:accuracy"], got["excluded"], got["num-examples"]) == (1, 0, 1, 32)
    assert sum(w.values()) == 32


def test_varying_the_bound_over_rounds_tells_the_server_nothing_per_node():
    """The red team's oracle: the same model at round indices 1..6 with bounds narrowing on one node's loss.
    Every node answers every round without error, and only the count of clamped nodes changes."""
    protocol = sf.protocols.SecAgg()
    replies = []
    g = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N),
                      tamper=lambda node, reply: replies.append(reply) or reply)
    agg, clipped = apps.aggregator(protocol), []
    for r, bound in enumerate((8.0, 4.0, 3.0, 2.5, 1.5, 1.0), start=1):
        out = agg.evaluate(g, list(apps.nodes(N)), round_index=r, metrics=(("loss", bound), ("accuracy", 1.0)),
                           rng=RandomSource(r), arrays=apps.model(), max_examples=CAP)
        assert len(out.included_nodes) == N
        clipped.append(means((("loss", bound), ("accuracy", 1.0)), out.result.total, CAP)["clipped:loss"])
    assert not any(r.has_error() for r in replies)
    assert clipped == [0, 0, 0, 1, 2, 2]  # losses 0, 1, 2, 3 (evaluate at the zero model): counts, never whom


def test_evaluation_rounds_survive_a_dropout_and_report_what_they_included():
    protocol = sf.protocols.SecAggPlus()
    lost = apps.FIRST + 3
    g = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N),
                      deliver=lambda node, msg: not (node == lost and msg.metadata.message_type == "evaluate"))
    res = strategy(protocol).start(g, apps.model(), num_rounds=1)
    got = res.evaluate_metrics_clientapp[1]
    assert got["included"] == N - 1
    want = expected(np.full(apps.dim(), float(apps.vector(res.arrays).mean())), nodes=range(N - 1))
    assert abs(got["loss"] - want["loss"]) <= 1e-4 * METRICS["loss"]


def test_options_views_and_the_initial_central_evaluation():
    with pytest.raises(ConfigurationError, match="bound"):
        strategy(sf.protocols.Plain(), evaluate_metrics={"loss": 0})
    with pytest.raises(ConfigurationError, match="num-examples"):
        strategy(sf.protocols.Plain(), evaluate_metrics={"num-examples": 1.0})
    with pytest.raises(ConfigurationError, match="fraction_evaluate"):
        strategy(sf.protocols.Plain(), fraction_evaluate=1.5)
    with pytest.raises(ConfigurationError, match="evaluate_metrics"):
        strategy(sf.protocols.Plain(), evaluate_metrics=None).start(grid(sf.protocols.Plain()), apps.model(),
                                                                    num_rounds=1, evaluate_config=ConfigRecord())
    # fraction_evaluate = 0: no evaluation round; evaluate_fn also sees the initial model (round 0), as in Flower
    g = grid(sf.protocols.Plain())
    res = strategy(sf.protocols.Plain(), fraction_evaluate=0.0).start(
        g, apps.model(), num_rounds=1, evaluate_fn=lambda r, a: MetricRecord({"r": r}))
    assert res.evaluate_metrics_clientapp == {} and not any(k.startswith("federated") for k in res.rounds[0].metrics)
    assert sorted(res.evaluate_metrics_serverapp) == [0, 1]
    # configure_evaluate: the first exchange of a fresh evaluation round (SecAgg+: the key advertisement)
    s = strategy(sf.protocols.SecAggPlus(), fraction_evaluate=0.75)
    msgs = s.configure_evaluate(1, apps.model(), ConfigRecord(), grid(sf.protocols.SecAggPlus()))
    assert len(msgs) == 3 and {m.metadata.message_type for m in msgs} == {"query.advertise_keys"}
    assert strategy(sf.protocols.Plain(), evaluate_metrics=None).configure_evaluate(
        1, apps.model(), ConfigRecord(), g) == []
    # aggregate_evaluate: the means of what an evaluation round releases (two nodes, weights 0.5 and 1)
    total = [0.5 * 2.0 / 10.0 + 1.0 * 4.0 / 10.0, 0.5 * 0.5 + 1.0 * 0.25, 1.5, 0.0, 1.0, 0.0]
    reply = Message(RecordDict({"m": MetricRecord({"aggregate": total, "included": 2})}), dst_node_id=1,
                    message_type="evaluate")
    got = strategy(sf.protocols.Plain(), max_examples=2).aggregate_evaluate(1, [reply])
    assert got["loss"] == pytest.approx((0.5 * 2 + 4) / 1.5) and got["accuracy"] == pytest.approx(0.5 / 1.5)
    assert got["clipped:accuracy"] == 1 and got["num-examples"] == 3
    with pytest.raises(InvalidInput):
        strategy(sf.protocols.Plain()).aggregate_evaluate(1, [reply, reply])


def test_a_resumed_run_keeps_the_earlier_rounds_evaluations(tmp_path):
    protocol = sf.protocols.SecAggPlus()
    g = grid(protocol)
    first = strategy(protocol, checkpoint_dir=tmp_path / "ck").start(g, apps.model(), num_rounds=2)
    later = strategy(protocol, checkpoint_dir=tmp_path / "ck").start(g, apps.model(), num_rounds=3)
    assert sorted(later.evaluate_metrics_clientapp) == [1, 2, 3]
    assert dict(later.evaluate_metrics_clientapp[2]) == dict(first.evaluate_metrics_clientapp[2])


DEC = 2001  # the decryptor's node id


@pytest.mark.parametrize("scheme", ["ckks", "bfv", "bfv-masked"])
def test_he_decryptor_modes_evaluate_and_the_decryptor_decrypts_once_per_kind_and_round(scheme):
    """HE with a decryptor node: an evaluation round after a training round of the same index is decrypted
    (role ``decryptor@evaluate``), and a second evaluation round of that index is refused by the decryptor."""
    protocol = {"ckks": sf.protocols.CKKS(value_range=1.0), "bfv": sf.protocols.BFV(value_range=1.0),
                "bfv-masked": sf.protocols.BFV(value_range=1.0, key_holder="masked")}[scheme]
    nodes = {**apps.nodes(3), DEC: {"role": "decryptor"}}
    app = apps.client_app(protocol, updates, examples=dict.fromkeys(range(3), CAP), evaluate=evaluate,
                          auxiliary=lambda c: {"decryptor"} if c.node_config.get("role") == "decryptor" else set())
    g = InProcessGrid(app, nodes)
    agg = apps.aggregator(protocol, auxiliary={"decryptor": DEC})
    apps.run(agg, g, list(apps.nodes(3)), round_index=1)

    def evaluation(seed):
        return agg.evaluate(g, list(apps.nodes(3)), round_index=1, metrics=tuple(METRICS.items()),
                            rng=RandomSource(seed), arrays=apps.model(), max_examples=CAP)

    got = means(tuple(METRICS.items()), evaluation(2).result.total, CAP)
    want = {k: float(np.mean([evaluate(p, np.zeros(apps.dim()))[k] for p in range(3)])) for k in METRICS}
    for k, bound in METRICS.items():
        assert abs(got[k] - want[k]) <= 1e-4 * bound
    given = g.context(DEC).state[GIVEN_KEY]
    assert given["decryptor/round"] == 1 and given["decryptor@evaluate/round"] == 1
    with pytest.raises(ProtocolAborted):
        evaluation(3)
