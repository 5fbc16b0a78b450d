"""The session binds what the server chooses per request (protocols/flower.md section 1; proofs/flower.md Lemma
F3 and F16): the red team's attacks on federated evaluation, which also hit weighted training rounds.

A malicious server gave every node but one ``max_examples = 2**62`` (their weights quantize to 0), or bounds of
1e90 (their metrics quantize to 0): one round over all nodes, with every node included, released one honest
node's exact input. Now each node checks that the session id binds the round index, ``dim``, ``max_examples``,
the privacy description and the evaluation's metrics it was given, so nodes shown different values are not in
one session: they refuse, and the round aborts without releasing anything. Plus the red team's other findings.
"""

import json

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, InvalidInput, ProtocolAborted
from securefed.flower import SecureFedAvg, _envelope
from securefed.flower import client as flower_client
from securefed.flower._evaluation import means
from securefed.flower.testing import InProcessGrid
from tests.flower import apps
from tests.flower.test_identities import federation

N = 6
METRICS = (("loss", 10.0), ("accuracy", 1.0))
EXAMPLES = {p: 5 * (p + 1) for p in range(N)}
CAP = 1000


def evaluate(p, w):
    return {"loss": 1.0 + 0.37 * p, "accuracy": 0.1 + 0.13 * p}


def updates(p, rnd):
    return np.full(apps.dim(), 0.01 * (p + 1)) + 0.001 * np.arange(apps.dim())


def max_examples_per_node(rec):
    rec["max_examples"] = 2**62


def bounds_per_node(rec):
    desc = json.loads(rec["params"])
    if "evaluate" in desc:
        desc["evaluate"] = [[k, 1e90] for k, _ in desc["evaluate"]]
        rec["params"] = json.dumps(desc, sort_keys=True, separators=(",", ":"))


class EvilGrid(InProcessGrid):
    """The server's grid: `change` edits every request's envelope except the target's (None: no attack)."""

    target = None
    change = None
    refusals: list[str]

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if self.target is not None and msg.metadata.dst_node_id != self.target and _envelope.KEY in msg.content:
                self.change(msg.content[_envelope.KEY])
        return super().push_messages(messages)


def federation_grid(protocol):
    members = list(apps.nodes(N))
    keys = federation(members)
    refusals = []
    app = apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate, seed=None,
                          identities=lambda context: keys.restricted_to(context.node_id))
    grid = EvilGrid(app, apps.nodes(N), tamper=lambda node, r: refusals.append(r.error.reason) or r
                    if r.has_error() else r)
    grid.refusals = refusals
    return members, grid, apps.aggregator(protocol, identities=keys.public_only())


def evaluation(agg, grid, members):
    return agg.evaluate(grid, members, round_index=1, metrics=METRICS, rng=RandomSource(1), arrays=apps.model(),
                        max_examples=CAP)


@pytest.mark.parametrize("change", [max_examples_per_node, bounds_per_node])
def test_per_node_weights_or_bounds_in_one_evaluation_round_release_nothing(change):
    protocol = sf.protocols.SecAgg(adversary="active")
    members, grid, agg = federation_grid(protocol)
    honest = means(METRICS, evaluation(agg, grid, members).result.total, CAP)  # no attack: the mean over all
    assert honest["num-examples"] == sum(EXAMPLES.values())
    members, grid, agg = federation_grid(protocol)  # fresh nodes (they evaluate round 1 once)
    grid.target, grid.change = members[2], change
    with pytest.raises(ProtocolAborted):
        evaluation(agg, grid, members)
    assert len(grid.refusals) == N - 1 and all("the session does not bind" in r for r in grid.refusals)


def test_per_node_weights_in_one_training_round_release_nothing():
    """The same attack on a training round weighted by examples gave one node's update (the red team:
    ``sum[:-1] / w`` equal to node 4's update, ``round(w 1000) = 15``, its example count)."""
    protocol = sf.protocols.SecAgg(adversary="active")
    members, grid, agg = federation_grid(protocol)
    grid.target, grid.change = members[4], max_examples_per_node
    with pytest.raises(ProtocolAborted):
        agg.run(grid, members, round_index=1, dim=apps.dim() + 1, rng=RandomSource(2), arrays=apps.model(),
                config=ConfigRecord({"server-round": 1}), max_examples=CAP)
    assert len(grid.refusals) == N - 1 and all("the session does not bind" in r for r in grid.refusals)


def test_a_malformed_riding_request_still_leaves_the_carriers_answer():
    """A riding request whose params hold a 400-digit bound raised OverflowError after the carrier was answered:
    the node answered neither. Now it is MessageRejected, and only the riding part is refused."""
    protocol = sf.protocols.SecAgg()
    victim = apps.FIRST

    def deliver(node, msg):
        if node == victim and msg.metadata.message_type == "train" and _envelope.NEXT_KEY in msg.content:
            msg.content[_envelope.NEXT_KEY]["params"] = '{"evaluate":[["loss",' + "1" * 400 + "]]}"
        return True

    grid = InProcessGrid(apps.client_app(protocol, updates, seed=None), apps.nodes(4), deliver=deliver)
    members = list(apps.nodes(4))
    out = apps.aggregator(protocol).run(grid, members, round_index=1, dim=apps.dim(), rng=RandomSource(1),
                                        arrays=apps.model(), config=ConfigRecord({"server-round": 1}),
                                        next_nodes=members)
    assert victim in out.included_nodes


def poisoned(monkeypatch, weight):
    """Node 5 (one corrupt client) inputs [1, 1, weight, 0, 0, 0]: every coordinate within the encoder's [-1, 1]."""
    real = flower_client._metrics_input

    def corrupt(msg, context, fn, req, metrics):
        out = real(msg, context, fn, req, metrics)
        return np.array([1.0, 1.0, weight, 0, 0, 0]) if context.node_id == apps.FIRST + N - 1 else out

    monkeypatch.setattr(flower_client, "_metrics_input", corrupt)


@pytest.mark.parametrize("weight", [-1.0, -0.07])
def test_a_corrupt_nodes_impossible_sum_is_refused_and_the_run_goes_on(monkeypatch, weight):
    """A released sum no honest inputs give (means over their bounds, or a summed weight <= 0) is InvalidInput;
    in SecureFedAvg the evaluation is aborted and the run goes on (before, start() raised)."""
    poisoned(monkeypatch, weight)
    protocol = sf.protocols.SecAgg()
    grid = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N))
    out = apps.aggregator(protocol).evaluate(grid, list(apps.nodes(N)), round_index=1, metrics=METRICS,
                                             rng=RandomSource(1), arrays=apps.model(), max_examples=CAP)
    with pytest.raises(InvalidInput):
        means(METRICS, out.result.total, CAP, len(out.included_nodes))
    s = SecureFedAvg(protocol=protocol, seed=3, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                     max_examples=CAP, evaluate_metrics=dict(METRICS))
    grid = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N))
    res = s.start(grid, apps.model(), num_rounds=2)
    assert [r.metrics.get("federated_aborted") for r in res.rounds] == [1.0, 1.0]
    assert res.evaluate_metrics_clientapp == {} and all(r.aborted is None for r in res.rounds)


def test_means_are_exact_to_a_few_parts_per_million_with_a_large_max_examples():
    """Weights of 3 examples under max_examples = 10^6 had a few dozen fixed-point steps at 24 bits (means off by
    up to 5%); at 32 bits they have thousands."""
    protocol = sf.protocols.SecAggPlus()
    examples = dict.fromkeys(range(5), 3)
    grid = InProcessGrid(apps.client_app(protocol, updates, examples=examples, evaluate=evaluate), apps.nodes(5))
    out = apps.aggregator(protocol).evaluate(grid, list(apps.nodes(5)), round_index=1, metrics=METRICS,
                                             rng=RandomSource(1), arrays=apps.model(), max_examples=10**6)
    got = means(METRICS, out.result.total, 10**6)
    for k, _ in METRICS:
        want = float(np.mean([evaluate(p, None)[k] for p in range(5)]))
        assert abs(got[k] - want) <= 1e-3 * abs(want)


def test_an_evaluation_round_takes_payloads_as_large_as_its_training_round():
    """CKKS clients mode: the key dealer's reply (1.3 MB at n = 6) does not shrink with an evaluation round's
    k + 1 inputs; its payload limit is the one a training round of the model has (64 d + 1 MiB)."""
    protocol = sf.protocols.CKKS(value_range=1.0, key_holder="clients", min_clients=2)
    model = apps.model()
    model["big"] = Array(np.zeros(20_000, np.float32))  # a model of 20k values (the nodes evaluate w and b)
    grid = InProcessGrid(apps.client_app(protocol, updates, examples=EXAMPLES, evaluate=evaluate), apps.nodes(N))
    out = apps.aggregator(protocol).evaluate(grid, list(apps.nodes(N)), round_index=1, metrics=METRICS,
                                             rng=RandomSource(1), arrays=model, max_examples=CAP)
    assert len(out.included_nodes) == N


def test_options_that_would_give_wrong_or_overwritten_means_are_refused():
    with pytest.raises(ConfigurationError, match="value_range >= 1"):
        SecureFedAvg(protocol=sf.protocols.CKKS(value_range=0.5), evaluate_metrics=dict(METRICS))
    for name in ("included", "aborted", "num-examples"):
        with pytest.raises(ConfigurationError, match="reserved"):
            SecureFedAvg(protocol=sf.protocols.Plain(), evaluate_metrics={name: 1.0})


def test_the_plausibility_check_takes_the_encoding_error_and_each_nodes_least_weight():
    """Honest sums at the bound pass with the protocol's error bound (the view refused some: a red team's
    liveness finding), and a summed weight below one example per included node is refused (one corrupt node
    made num-examples 1 over 6 included nodes)."""
    from securefed.flower.aggregation import evaluation_protocol

    n, step = 200, 2.0**-31
    weight = n * 3 / CAP
    at_bound = np.array([weight * 0.5, weight + n * step, weight - n * step] + [0.0] * 3)  # accuracy 1.0 = its bound
    error = evaluation_protocol(sf.protocols.SecAggPlus()).error_bound(n)
    assert means(METRICS, at_bound, CAP, n, error)["accuracy"] == pytest.approx(1.0)
    with pytest.raises(InvalidInput, match="outside their bounds"):
        means(METRICS, at_bound, CAP, n, 0.0)
    least = np.array([0.0, 0.0, 1 / CAP, 0.0, 0.0, 0.0])
    with pytest.raises(InvalidInput, match="summed weight"):
        means(METRICS, least, CAP, 6, error)
    assert means(METRICS, least, CAP, 1, error)["num-examples"] == 1  # one node of one example: honest


def test_a_node_answers_alike_with_no_examples_a_huge_metric_or_a_failing_evaluation(caplog):
    """Fifth red team: a node with 0 examples refused (the server saw which node had an empty test split), an
    int metric of 2^1024 escaped as OverflowError, and an exception of the user's evaluation function reached
    the server with its text. Now 0 examples and non-finite values are excluded inside the sum, and a user's
    exception is refused with the fixed reason."""
    protocol = sf.protocols.SecAgg()
    values = {0: {"loss": float("nan"), "accuracy": 0.5}, 1: {"loss": 2**1024, "accuracy": 0.5},
              2: {"loss": 1.0, "accuracy": 0.5}, 3: {"loss": 2.0, "accuracy": 0.5}, 4: {"loss": 3.0, "accuracy": 0.5}}

    def ev(p, w):
        if p == 5:
            raise ZeroDivisionError("secret 1234.5678")
        return values[p]

    replies = []
    grid = InProcessGrid(apps.client_app(protocol, updates, examples={**EXAMPLES, 0: 0}, evaluate=ev),
                         apps.nodes(N), tamper=lambda node, r: replies.append((node, r)) or r)
    out = apps.aggregator(protocol).evaluate(grid, list(apps.nodes(N)), round_index=1, metrics=METRICS,
                                             rng=RandomSource(1), arrays=apps.model(), max_examples=CAP)
    assert set(out.dropped_nodes) == {apps.FIRST + 5}
    assert not any(r.has_error() for node, r in replies if node != apps.FIRST + 5)
    reasons = " ".join(r.error.reason for _, r in replies if r.has_error())
    assert "failed a local check" in reasons and "1234" not in reasons and "ZeroDivision" not in reasons
    assert "secret 1234.5678" in caplog.text  # the node's own log keeps the traceback
    got = means(METRICS, out.result.total, CAP, len(out.included_nodes))
    assert got["excluded"] == 2 and got["loss"] == pytest.approx((15 * 1.0 + 20 * 2.0 + 25 * 3.0) / 60, abs=1e-6)


def test_an_evaluation_sample_the_protocol_cannot_run_skips_the_evaluation_not_the_run():
    """Fifth red team: fraction_evaluate = 0.2 of 10 nodes sampled 2, too few for SecAgg's threshold; the
    ConfigurationError ended start() after round 1 had trained."""
    protocol = sf.protocols.SecAgg()
    grid = InProcessGrid(apps.client_app(protocol, updates, evaluate=evaluate), apps.nodes(10))
    s = SecureFedAvg(protocol=protocol, seed=3, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                     evaluate_metrics=dict(METRICS), fraction_evaluate=0.2)
    res = s.start(grid, apps.model(), num_rounds=2)
    assert [len(r.included) for r in res.rounds] == [10, 10]
    assert [r.metrics.get("federated_aborted") for r in res.rounds] == [1.0, 1.0]


def test_bounds_and_example_caps_that_would_lose_precision_are_refused():
    with pytest.raises(ConfigurationError, match="bound in"):
        SecureFedAvg(protocol=sf.protocols.Plain(), evaluate_metrics={"loss": 1e200})
    with pytest.raises(ConfigurationError, match="max_examples"):
        SecureFedAvg(protocol=sf.protocols.Plain(), evaluate_metrics=dict(METRICS), max_examples=10**8)
