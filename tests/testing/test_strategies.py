"""The hypothesis strategies of securefed.testing.strategies produce what they promise."""

import math

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import securefed as sf
from securefed.errors import ConfigurationError, InvalidInput
from securefed.protocols import BFV, CKKS, REGISTRY, Plain, SecAgg, SecAggPlus
from securefed.protocols.base import AggregationProtocol
from securefed.testing import _driver
from securefed.testing import adversary as adv
from securefed.testing import strategies as sfst

#: find() without shrinking: only whether an example exists matters.
FIND = settings(max_examples=500, database=None, phases=[Phase.generate])


@given(sfst.updates((1, 12), value_range=2.5))
def test_updates_stay_in_range(x):
    assert x.ndim == 1 and 1 <= x.size <= 12 and x.dtype in (np.float64, np.float32)
    assert np.isfinite(x).all() and (np.abs(x.astype(np.float64)) <= 2.5).all()


@given(sfst.updates(5, value_range=3.0, min_magnitude=0.75))
def test_updates_with_a_minimum_magnitude(x):
    assert x.size == 5 and (np.abs(x) >= 0.75).all() and (np.abs(x) <= 3.0).all()


def test_updates_reach_the_edges_of_the_range():
    one = sfst.updates(1, value_range=1.0, dtypes=(np.float64,))
    for edge in (1.0, -1.0, 0.0, 5e-324):
        find(one, lambda x, e=edge: x[0] == e and math.copysign(1, x[0]) == math.copysign(1, e), settings=FIND)


@given(sfst.invalid_updates(4, value_range=1.0), st.integers(0, 2))
def test_invalid_updates_are_refused_by_secagg(bad, i):
    what, x = bad
    xs = [np.zeros(4) for _ in range(3)]
    xs[i] = x
    with pytest.raises(InvalidInput):
        sf.simulate_aggregation(SecAgg(), xs, seed=0)


@settings(max_examples=10)
@given(sfst.populations((3, 5), (1, 4)))
def test_weighted_means_through_secagg(pop):
    """FedAvg's weighting inside the sum (as the trainer does): sum of w x and of w, then a division."""
    w = np.array(pop.weights, dtype=np.float64) / max(pop.weights)
    xs = [np.append(x * wi, wi) for x, wi in zip(pop.updates, w)]
    protocol = SecAgg()
    res = sf.simulate_aggregation(protocol, xs, seed=1)
    mean = res.total[:-1] / res.total[-1]
    eb = protocol.error_bound(len(xs))
    expect = np.average(np.array(pop.updates), axis=0, weights=pop.weights)
    assert np.all(np.abs(mean - expect) <= (eb + np.abs(expect) * eb) / (res.total[-1] - eb) + 1e-12)


@pytest.mark.parametrize("protocol", [Plain(), SecAgg(), SecAggPlus(adversary="active"),
                                      BFV(value_range=1.0, key_holder="masked")], ids=lambda p: p.name)
@given(data=st.data())
def test_dropout_schedules(protocol, data):
    n = data.draw(st.sampled_from([n for n in range(1, 9) if _accepts(protocol, n)]))
    t, phases = protocol.min_survivors(n), protocol.phases
    k = sfst.input_phase_index(protocol)
    anything = data.draw(sfst.dropout_schedules(protocol, n))
    allowed = data.draw(sfst.dropout_schedules(protocol, n, too_many=False))
    too_many = data.draw(sfst.dropout_schedules(protocol, n, too_many=True))
    for schedule in (anything, allowed, too_many):
        assert set(schedule) <= set(range(n)) and set(schedule.values()) <= set(phases)
    assert len(allowed) <= n - t
    assert sum(phases.index(p) <= k for p in too_many.values()) > n - t


def _accepts(protocol, n):
    try:
        protocol.min_survivors(n)
    except ConfigurationError:
        return False
    return True


@pytest.mark.parametrize("cls", [Plain, SecAgg, SecAggPlus, CKKS, BFV])
@settings(max_examples=40)
@given(data=st.data())
def test_configurations_match_the_protocols_rules(cls, data):
    """Parameter sets labelled outside are refused with ConfigurationError, those within run; the
    protocols' own auditor (check_description) agrees with the parameters in force."""
    config = data.draw(sfst.configurations(cls, n=(1, 12)))
    try:
        protocol = config.build()
        t = protocol.min_survivors(config.n)
        description = protocol.describe(config.n)
    except ConfigurationError:
        assert config.expected != "within", config
        return
    assert config.expected != "outside", config
    assert cls.check_description(description) == []
    assert 1 <= t <= config.n
    if cls in (SecAgg, SecAggPlus, Plain):  # cheap enough to run a round with every configuration
        xs = [np.full(2, 0.5) for _ in range(config.n)]
        res = sf.simulate_aggregation(protocol, xs, seed=0)
        assert np.abs(res.total - 0.5 * config.n).max() <= protocol.error_bound(config.n)


@pytest.mark.parametrize("cls,labels", [(SecAgg, ("within", "outside")), (SecAggPlus, ("outside", None)),
                                        (CKKS, ("outside", None)), (BFV, ("outside", None))])
def test_configurations_cover_both_sides(cls, labels):
    """SecAgg's rules decide every case; SecAgg+ and HE leave some to the protocol's derivations (None)."""
    for label in labels:
        find(sfst.configurations(cls, n=(3, 12)), lambda c, label=label: c.expected == label,
             settings=FIND)


def test_configurations_of_an_unknown_class_are_refused():
    with pytest.raises(ValueError, match="write a strategy"):
        sfst.configurations(type("Mine", (AggregationProtocol,), {}))


def _transcript(protocol=None, n=3, seed=2):
    xs = [np.full(2, 0.25 * (i + 1)) for i in range(n)]
    return _driver.run(protocol or SecAgg(), xs, seed=seed).replies


@given(data=st.data())
def test_tamperings_alter_what_they_say(data):
    transcript = _transcript()
    kind = data.draw(st.sampled_from([k for k in sfst.TAMPERING_KINDS if k != "other_round"]))
    t = data.draw(sfst.tamperings(transcript, kinds=[kind]))
    batch = [(p, payload, "honest") for p, ph, payload in transcript if ph == t.phase]
    before = [(p, ph, payload) for p, ph, payload in transcript if transcript.index((p, ph, payload)) <
              transcript.index(next(r for r in transcript if r[1] == t.phase))]
    out = t.alter(t.phase, batch, before + [(p, t.phase, payload) for p, payload, _ in batch])
    assert t.alter("not a phase", batch, before) == batch
    mine = {p: payload for p, payload, _ in batch}[t.party]
    altered = [payload for p, payload, label in out if label == kind]
    if kind == "reorder":
        assert sorted(out, key=repr) == sorted(batch, key=repr) and [r[0] for r in out] == \
            [t.order_of[k] for k in t.arg]
        return
    assert len(altered) == 1
    new = altered[0]
    if kind == "truncate":
        assert new == mine[: len(mine) - t.arg]
    elif kind == "extend":
        assert new.startswith(mine) and len(new) > len(mine)
    elif kind == "bit_flip":
        diff = np.unpackbits(np.frombuffer(new, np.uint8) ^ np.frombuffer(mine, np.uint8))
        assert diff.sum() == 1
    elif kind == "duplicate":
        assert new == mine and [p for p, _, _ in out].count(t.party) == 2
    elif kind == "other_client":
        assert new == {p: payload for p, payload, _ in batch}[t.arg] and t.arg != t.party
    elif kind == "other_phase":
        assert new in [payload for p, ph, payload in before if p == t.party and ph == t.arg]
    assert t.detail  # says what was done


def test_tamperings_need_another_round_for_other_round():
    transcript = _transcript(Plain())
    assert sfst.tamperings(transcript, kinds=["other_round", "other_phase"]).is_empty
    other = _transcript(Plain(), seed=3)  # another session: none of its replies is one of this round's
    t = find(sfst.tamperings(transcript, other_round=other, kinds=["other_round"]), lambda t: True, settings=FIND)
    assert t.arg in [payload for _, _, payload in other]
    assert t.arg not in [payload for _, _, payload in transcript]
    with pytest.raises(ValueError, match="unknown tampering kinds"):
        sfst.tamperings(transcript, kinds=["garble"])


@pytest.mark.parametrize("protocol,expected", [
    (Plain(), {adv.AskAgain}),
    (CKKS(), {adv.AskAgain}),
    (SecAgg(), {adv.AskAgain, adv.AskBothSecrets, adv.UnmaskBelowThreshold, adv.DropEveryone, adv.ReplayOldShares}),
    (SecAggPlus(adversary="active"), {adv.AskAgain, adv.AskBothSecrets, adv.UnmaskBelowThreshold, adv.DropEveryone,
                                      adv.ReplayOldShares, adv.InconsistentSurvivorLists, adv.SubstitutePublicKey}),
], ids=["plain", "ckks", "secagg", "secagg+-active"])
def test_deviations_apply_to_their_protocols(protocol, expected):
    strategy = sfst.deviations(protocol, 5)
    for cls in expected:
        find(strategy, lambda d, cls=cls: type(d) is cls, settings=FIND)
    with pytest.raises(NoSuchExample):
        find(strategy, lambda d: type(d) not in expected,
             settings=settings(FIND, max_examples=30))


def test_every_registered_protocol_has_a_configuration_strategy():
    for cls in REGISTRY.values():
        assert sfst.configurations(cls) is not None
