"""The parameter finder (protocols/secagg.md, parameters) against an independent exact computation."""

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.errors import ConfigurationError
from securefed.protocols.secagg.params import (
    ThreatModel,
    complete_graph_parameters,
    harary_parameters,
    harary_threshold_range,
    violations,
)
from tests.proofs._load import load_check

fractions = st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 1 / 3, 0.3])


exact_harary_range = load_check("secagg_harary").exact_harary_range


@given(st.integers(4, 160), fractions, fractions, st.sampled_from(["semi-honest", "active"]))
def test_harary_finder_matches_an_exact_recomputation_and_is_minimal(n, gamma, delta, adversary):
    threat = ThreatModel(adversary, gamma, delta)
    if not threat.harary_feasible():
        with pytest.raises(ConfigurationError):
            harary_parameters(n, threat)
        return
    try:
        p = harary_parameters(n, threat)
    except ConfigurationError:
        assert all((r := exact_harary_range(n, k, threat)) is None or r[0] > r[1] for k in range(2, n - 1, 2))
        return
    if p.complete:
        assert all((r := exact_harary_range(n, k, threat)) is None or r[0] > r[1] for k in range(2, n - 1, 2))
        return
    lo, hi = exact_harary_range(n, p.degree, threat)
    assert p.threshold == lo <= hi
    assert harary_threshold_range(n, p.degree, threat) == (lo, hi)
    for k in range(2, p.degree, 2):  # no smaller degree works
        r = exact_harary_range(n, k, threat)
        assert r is None or r[0] > r[1]
    assert violations(n, p.degree, p.threshold, threat, complete=False) == []
    assert violations(n, p.degree, p.threshold - 1, threat, complete=False)


@given(st.integers(1, 3000), fractions, fractions, st.sampled_from(["semi-honest", "active"]))
def test_complete_graph_threshold_is_the_smallest_that_meets_every_rule(n, gamma, delta, adversary):
    threat = ThreatModel(adversary, gamma, delta)
    g, d = Fraction(str(gamma)), Fraction(str(delta))

    def ok(t):
        sec = t > math.ceil((n + g * n) / 2) if adversary == "active" else t > math.ceil(g * n)
        return sec and 2 <= t <= n - math.ceil(d * n)

    allowed = [t for t in range(1, n + 1) if ok(t)]
    if not allowed:
        with pytest.raises(ConfigurationError):
            complete_graph_parameters(n, threat)
        return
    p = complete_graph_parameters(n, threat)
    assert p.threshold == allowed[0] and p.complete and p.degree == n - 1
    assert violations(n, n - 1, p.threshold, threat, complete=True) == []
    for t in (allowed[0] - 1, allowed[-1] + 1):
        assert violations(n, n - 1, t, threat, complete=True)
        with pytest.raises(ConfigurationError):
            complete_graph_parameters(n, threat, t)


def test_fractions_are_read_exactly_and_small_rounds_use_the_complete_graph():
    assert ThreatModel(corrupt_fraction=0.1).corrupt(30) == 3  # 0.1 * 30 == 3.0000000000000004 in floats
    assert ThreatModel(dropout_fraction=0.7).dropouts(10) == 7
    assert harary_parameters(4, ThreatModel()).complete
    assert not harary_parameters(100, ThreatModel()).complete
    for bad in (dict(adversary="evil"), dict(corrupt_fraction=1.0), dict(dropout_fraction=-0.1),
                dict(corrupt_fraction=True)):
        with pytest.raises(ConfigurationError):
            ThreatModel(**bad)
    with pytest.raises(ConfigurationError):
        harary_parameters(1000, ThreatModel("active", 0.3, 0.35))  # gamma + 2 delta > 0.9
    with pytest.raises(ConfigurationError):
        harary_parameters(1000, ThreatModel(), degree=4)  # the survivors' graph may disconnect
    assert violations(100, 22, 11, ThreatModel(), complete=True)  # a complete graph has degree n - 1
    assert violations(0, 2, 2, ThreatModel(), complete=True)
