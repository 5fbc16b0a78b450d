"""The red team's isolation attack on active SecAgg+ (securefed/testing/isolation.py: IsolateVictim).

The server forwards the victim only the shares of its corrupt neighbours and of a few honest partners W, so it
masks with them alone; the victim and W sign a list that names them (and drops the victim's other honest
neighbours), every other honest client a list that names the victim and drops W. With neighbourhood-only
signature checks (``NoQuorum``: the round's quorum set to 0) both lists pass, the revealed shares give b_v and
every s_w, and the server reads the victim's exact input. With the shipped quorum of floor((n + C)/2) + 1 the
victim's list carries too few signatures: it refuses, and nothing is recovered.
"""

import itertools
import logging

import numpy as np
import pytest

from securefed.errors import ConfigurationError
from securefed.protocols import SecAggPlus
from securefed.testing import (
    ConformanceError,
    adversary,
    check_protocol,
    coalition,
    isolation,
)
from securefed.testing.adversary import RoundContext, round_spec, run_round
from securefed.testing.isolation import (
    IsolateVictim,
    Isolation,
    execute_isolation,
    isolation_plan,
    isolations,
    predict_isolation,
)

logging.getLogger("securefed.protocols.secagg").setLevel(logging.ERROR)  # the simulated-PKI warning


class NoQuorum(SecAggPlus):
    """SecAgg+ before the isolation fix: an active client counts only the t signatures from its own
    neighbourhood (the round's ``quorum`` is 0); same graph, threshold and wire as the shipped protocol."""

    def quorum(self, n):
        return 0


def round_of(protocol, n, seed, dim=8):
    return RoundContext(protocol, round_spec(n, dim, seed)).round


def red_team_inputs(n, seed, dim=8):
    gen = np.random.default_rng(1234 + seed)  # as in the red team's attack_w.py
    return [gen.uniform(-1, 1, dim) for _ in range(n)]


def test_the_kit_exposes_the_isolation_attack():
    assert adversary.IsolateVictim is IsolateVictim
    assert {"IsolateVictim", "Isolation", "isolations", "search_isolation"} <= set(isolation.__all__)


def test_the_red_team_plan_at_n20_unmasks_the_victim_without_the_quorum():
    """The repro: n = 20 (k = 8, t = 6, C = 2), seed 0, corrupt {0, 1}, victim 9, partners {3, 15, 18}."""
    broken = NoQuorum(adversary="active")
    r = round_of(broken, 20, 0)
    assert (r.graph.degree, r.t, r.quorum, coalition.coalition_size(broken, 20)) == (8, 6, 0, 2)
    plan = isolation_plan(r.graph, 9, (0, 1), (3, 15, 18))
    b, s = predict_isolation(r.graph, r.t, plan)
    assert b >= r.t and min(s.values()) >= r.t
    xs = red_team_inputs(20, 0)
    dev = IsolateVictim(9, (0, 1), (3, 15, 18))
    run = run_round(broken, xs, [dev], seed=0, corrupt=(0, 1))
    rec = dev.recover(run)
    assert rec.b_valid and rec.s_valid and rec.b_shares == b and rec.s_shares == min(s.values())
    np.testing.assert_allclose(rec.input, xs[9], rtol=0, atol=broken.error_bound(1))
    assert not np.allclose(rec.input, xs[8], atol=0.01)
    assert "client 9's input is" in dev.violation(run)
    # The victim masked with its corrupt neighbours and the partners only, and answered the unmasking request.
    assert set(dev._victim["peers"]) == {3, 15, 18} | (set(r.graph.neighbors(9).tolist()) & {0, 1})
    assert any(d.reply is not None for d in run.outcomes("unmasking", 9, dev.name))


def test_the_red_team_plan_fails_against_the_quorum():
    shipped = SecAggPlus(adversary="active")
    r = round_of(shipped, 20, 0)
    assert (r.graph.degree, r.t, r.quorum) == (8, 6, 12)
    xs = red_team_inputs(20, 0)
    dev = IsolateVictim(9, (0, 1), (3, 15, 18))
    run = run_round(shipped, xs, [dev], seed=0, corrupt=(0, 1))
    rec = dev.recover(run)
    assert rec.input is None and not rec.b_valid and dev.violation(run) is None
    assert run.refused("unmasking", 9, dev.name)  # the victim's list: 6 signatures, the quorum is 12
    assert "quorum" in str(run.outcomes("unmasking", 9, dev.name)[0].error)
    b, s = predict_isolation(r.graph, r.t, dev.plan, r.quorum)
    assert (rec.b_shares, rec.s_shares) == (b, min(s.values())) and b < r.t


@pytest.mark.parametrize("n,seed", [(20, 0), (12, 0), (16, 3), (31, 0)])
def test_the_search_finds_a_plan_that_leaks_exactly_and_the_quorum_stops_it(n, seed):
    broken, shipped = NoQuorum(adversary="active"), SecAggPlus(adversary="active")
    r = round_of(broken, n, seed)
    plan = next(isolations(r.graph, r.t, coalition.coalition_size(broken, n)))
    assert plan.corrupt == tuple(range(coalition.coalition_size(broken, n)))  # chosen before the graph
    xs = red_team_inputs(n, seed)
    rec = execute_isolation(broken, xs, plan, seed=seed)
    assert rec.both_secrets, rec.detail
    np.testing.assert_allclose(rec.input, xs[plan.victim], rtol=0, atol=broken.error_bound(1))
    # The shipped protocol: same graph and threshold, the quorum on top; the same plan recovers nothing.
    rs = round_of(shipped, n, seed)
    assert (rs.graph.degree, rs.t) == (r.graph.degree, r.t) and rs.quorum > 0
    assert list(isolations(rs.graph, rs.t, coalition.coalition_size(shipped, n), quorum=rs.quorum)) == []
    rec = execute_isolation(shipped, xs, plan, seed=seed)
    assert rec.input is None and not rec.b_valid


def test_predictions_match_the_search_and_the_runs():
    """n = 20, seed 0, corrupt {0, 1}, victim 9: the search yields exactly the partner sets whose template
    predict_isolation() counts t shares of every secret for, and a few runs get exactly the predicted shares."""
    r = round_of(NoQuorum(adversary="active"), 20, 0)
    found = {p.partners for p in isolations(r.graph, r.t, 2, corrupt_sets=[(0, 1)], victims=[9])}
    honest = [u for u in r.graph.neighbors(9).tolist() if u not in (0, 1)]
    feasible = set()
    for size in range(len(honest) + 1):
        for w in itertools.combinations(honest, size):
            b, s = predict_isolation(r.graph, r.t, isolation_plan(r.graph, 9, (0, 1), w))
            if b >= r.t and all(x >= r.t for x in s.values()):
                feasible.add(tuple(sorted(w)))
    assert found == feasible and (3, 15, 18) in found
    xs = red_team_inputs(20, 0)
    for w in [(3, 15, 18), tuple(honest[:2]), tuple(honest[:4])]:
        plan = isolation_plan(r.graph, 9, (0, 1), w)
        b, s = predict_isolation(r.graph, r.t, plan)
        rec = execute_isolation(NoQuorum(adversary="active"), xs, plan)
        assert (rec.b_shares, rec.s_shares) == (b, min(s.values(), default=r.t)), w
        assert (rec.input is not None) == (tuple(sorted(w)) in feasible), w


def test_the_coalition_property_flags_the_broken_variant():
    with pytest.raises(ConformanceError) as info:
        check_protocol(lambda: NoQuorum(adversary="active"), properties=["coalition"], clients=(20, 20))
    text = str(info.value)
    assert info.value.property == "coalition" and "n=20: the server with 2 corrupt clients [0, 1]" in text
    assert "every secret checked, input unmasked" in text and "Isolation(victim=" in text


def test_the_coalition_property_passes_the_quorum():
    """Sizes where the neighbourhood rule alone lets a plan through (12-20, 31): the property runs one
    end to end against the shipped protocol, and its clients refuse."""
    for n in (12, 20, 31):
        report = isolation.search_isolation(lambda: SecAggPlus(adversary="active"), n, seed=n, dim=8)
        assert report.leak is None and all(rec.input is None for _, rec in report.executed)
    check_protocol(lambda: SecAggPlus(adversary="active"), properties=["coalition"], clients=(12, 20))


def test_an_isolation_plan_keeps_its_parties_apart():
    with pytest.raises(ConfigurationError):
        Isolation(0, (0,), (2,), ((0, 2),), ((0, 0),))
    with pytest.raises(ConfigurationError):
        Isolation(0, (1,), (1,), ((0, 1),), ((0, 0),))
    with pytest.raises(ConfigurationError):
        Isolation(0, (1,), (2,), ((0, 2),), ((0, 1),))


def test_the_search_reports_whether_it_finished_within_its_budget():
    r = round_of(SecAggPlus(adversary="active"), 20, 0)
    full, cut = {}, {}
    plans = list(isolations(r.graph, r.t, 2, budget=None, stats=full))
    assert full["complete"] == 1 and full["tried"] > 10 and plans
    assert len(list(isolations(r.graph, r.t, 2, budget=10, stats=cut))) <= len(plans)
    assert cut == {"tried": 10, "complete": 0}
    report = isolation.search_isolation(lambda: SecAggPlus(adversary="active"), 41, seed=41)
    assert report.exhaustive and report.candidates == 0 and report.leak is None
