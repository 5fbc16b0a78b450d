"""The coalition adversary (securefed/testing/coalition.py, issue 18): the server with C corrupt clients.

The broken rule's leak is found end to end in test_broken_protocols.py; here: the plans the search
predicts are exactly the runs that leak, the recovered vector is the victim's input, the shipped
rule leaves no plan, and the corrupt-holder bound is Bell et al.'s t1.
"""

import logging
import math

import numpy as np
import pytest

from securefed.protocols import SecAgg, SecAggPlus
from securefed.protocols.secagg import params as secagg_params
from securefed.testing import PROPERTIES, adversary, check_protocol, coalition
from securefed.testing.adversary import round_spec, run_round
from securefed.testing.coalition import (
    Split,
    SplitSurvivorLists,
    corrupt_holders_bound,
    execute,
    predict,
    splits,
)
from tests.testing.test_broken_protocols import OldThresholdRule

logging.getLogger("securefed.protocols.secagg").setLevel(logging.ERROR)  # the simulated-PKI warning


def graph_and_t(protocol, n, seed=0):
    r = adversary.RoundContext(protocol, round_spec(n, 4, seed)).round
    return r.graph, r.t


def inputs(n, dim=4, seed=0):
    return [np.random.default_rng([seed, i]).uniform(-1, 1, dim) for i in range(n)]


def test_the_kit_exposes_the_coalition():
    assert adversary.SplitSurvivorLists is SplitSurvivorLists
    assert "coalition" in PROPERTIES
    assert coalition.coalition_size(SecAggPlus(adversary="active"), 24) == 3


def test_the_coalition_unmasks_the_victims_input_under_the_old_rule():
    protocol = OldThresholdRule(adversary="active")
    graph, t = graph_and_t(protocol, 6)
    plan = next(splits(graph, t, 1))
    xs = inputs(6)
    dev = SplitSurvivorLists.from_split(plan)
    run = run_round(protocol, xs, [dev], seed=0, corrupt=plan.corrupt)
    rec = dev.recover(run)
    assert rec.b_valid and rec.s_valid and (rec.b_shares, rec.s_shares) == (t, t)
    np.testing.assert_allclose(rec.input, xs[plan.victim], rtol=0, atol=protocol.error_bound(1))
    assert not np.allclose(rec.input, xs[(plan.victim + 1) % 6], atol=0.01)
    assert f"client {plan.victim}'s input is" in dev.violation(run)
    # Every honest client that answered saw t valid signatures on the list it signed: none refused.
    assert all(d.reply is not None for d in run.deliveries if d.label == dev.name)


def test_predictions_are_exactly_the_runs_that_leak():
    """For one victim and corrupt client, every labelling of the 4 other clients (16 runs): the shares the
    coalition gets are those predict() counts, and the input leaks exactly when both reach t."""
    protocol = OldThresholdRule(adversary="active")
    graph, t = graph_and_t(protocol, 6)
    victim, corrupt = 0, (int(graph.neighbors(0)[0]),)
    others = [u for u in range(6) if u != victim and u not in corrupt]
    xs = inputs(6)
    leaks = 0
    for bits in range(1 << len(others)):
        a = (victim, *[u for j, u in enumerate(others) if bits >> j & 1])
        b = tuple(u for j, u in enumerate(others) if not bits >> j & 1)
        plan = Split(victim, corrupt, tuple(sorted(a)), b)
        got = predict(graph, t, plan)
        rec = execute(OldThresholdRule(adversary="active"), xs, plan)
        assert (rec.b_shares, rec.s_shares) == got, plan
        assert (rec.input is not None) == (min(got) >= t), plan
        leaks += rec.input is not None
    found = [p for p in splits(graph, t, 1, victims=[victim]) if p.corrupt == corrupt]
    assert leaks == len(found) > 0


def test_the_closest_plans_fail_against_the_shipped_rule():
    """n = 10, degree 6, t = 5, quorum 6, one corrupt holder: over every labelling of the other 8 clients, no plan
    gets t shares of both secrets; the plans closest to it (most shares of s_v with t of b_v, and the reverse) fail
    end to end with the shares predict() counts (the quorum included)."""
    protocol = SecAggPlus(adversary="active")
    graph, t = graph_and_t(protocol, 10)
    assert (graph.degree, t, protocol.quorum(10)) == (6, 5, 6)
    victim, corrupt = 0, (int(graph.neighbors(0)[0]),)
    others = [u for u in range(10) if u != victim and u not in corrupt]
    plans = []
    for bits in range(1 << len(others)):
        a = tuple(sorted((victim, *[u for j, u in enumerate(others) if bits >> j & 1])))
        plan = Split(victim, corrupt, a, tuple(u for j, u in enumerate(others) if not bits >> j & 1))
        plans.append((predict(graph, t, plan, protocol.quorum(10)), plan))
    assert all(min(got) < t for got, _ in plans)
    xs = inputs(10)
    for side in (0, 1):
        got, plan = max((p for p in plans if p[0][side] >= t), key=lambda p: p[0][1 - side])
        rec = execute(SecAggPlus(adversary="active"), xs, plan)
        assert (rec.b_shares, rec.s_shares) == got and rec.input is None
        assert (rec.b_valid, rec.s_valid) == (side == 0, side == 1)


@pytest.mark.parametrize("factory,clients", [
    (lambda: SecAggPlus(adversary="active"), (5, 24)),
    (lambda: SecAgg(adversary="active"), (3, 16)),
    (SecAggPlus, (3, 24)),
    (SecAgg, (2, 16)),
], ids=["secagg+-active", "secagg-active", "secagg+", "secagg"])
def test_the_shipped_rules_leave_no_plan(factory, clients):
    check_protocol(factory, properties=["coalition"], clients=clients)


def test_no_round_size_leaves_a_plan_within_the_threat_model():
    """Counting alone, up to n = 400: 2t > k + 1 + c (active) and t > c (semi-honest) for the corrupt holders c
    the threat model allows; splits() then has nothing to enumerate."""
    for adversary_ in ("active", "semi-honest"):
        protocol = SecAggPlus(adversary=adversary_)
        for n in range(5, 401):
            p = protocol.parameters(n)
            c = corrupt_holders_bound(n, p.degree, protocol.threat_model.corrupt(n))
            assert (2 * p.threshold > p.degree + 1 + c) if adversary_ == "active" else p.threshold > c, n


def test_graph_aware_corruption_beyond_t1_is_outside_the_threat_model():
    """At n = 241 a corrupt set chosen among one client's neighbours exceeds t1; the search keeps to t1."""
    protocol = SecAggPlus(adversary="active")
    p, c = protocol.parameters(241), protocol.threat_model.corrupt(241)
    bound = corrupt_holders_bound(241, p.degree, c)
    assert bound < c and 2 * p.threshold <= p.degree + 1 + min(c, p.degree)
    assert coalition.search(lambda: SecAggPlus(adversary="active"), 241).leak is None


@pytest.mark.parametrize("n,k,c", [(24, 10, 3), (50, 16, 5), (300, 40, 30), (1000, 60, 100), (1000, 60, 1)])
def test_the_corrupt_holder_bound_is_bell_et_al_t1(n, k, c):
    lf = secagg_params._log_factorials(n)
    t1 = secagg_params._upper_quantile(lf, n - 1, c, k, secagg_params._LOG_SECURITY - math.log(n))
    assert corrupt_holders_bound(n, k, c) == t1
    assert corrupt_holders_bound(n, n - 1, c) == c  # the complete graph


def test_a_split_keeps_the_victim_in_group_a():
    with pytest.raises(ValueError):
        Split(0, (1,), (2,), (0, 3))
    with pytest.raises(ValueError):
        Split(0, (1,), (0, 1), (3,))
