import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import securefed as sf
from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import (
    Accountant,
    DDGEvent,
    GaussianEvent,
    SkellamEvent,
    compute_epsilon,
    event_from_dict,
    rdp_orders,
)

rates = st.floats(1e-3, 1.0)
multipliers = st.floats(0.5, 20.0)
steps = st.integers(1, 10_000)
deltas = st.sampled_from([1e-3, 1e-5, 1e-7, 1e-9])


def dpa_event(q, z, t):
    inner = dpa.GaussianDpEvent(z)
    if q < 1.0:
        inner = dpa.PoissonSampledDpEvent(q, inner)
    return dpa.SelfComposedDpEvent(inner, t)


@settings(max_examples=25)  # each example runs dp-accounting twice (~50 ms each)
@given(rates, multipliers, steps, deltas)
def test_gaussian_rdp_is_dp_accounting_or_tighter(q, z, t, delta):
    """dp-accounting's RDP at every integer order; at fractional orders of a subsampled Gaussian its series
    (unsigned, or infinite where it gives up) is replaced by the signed one, which is never larger.
    tests/privacy/test_accountant_reference.py compares with Opacus and with quadrature."""
    ref = dpa.rdp.RdpAccountant()
    ref.compose(dpa_event(q, z, t))
    ours = compute_epsilon(noise_multiplier=z, sampling_rate=q, steps=t, delta=delta)
    assert ours <= ref.get_epsilon(delta) * (1 + 1e-9) + 1e-12
    if q == 1.0:  # no sampling: the closed form alpha / (2 z^2) at every order
        assert ours == pytest.approx(ref.get_epsilon(delta), rel=1e-6, abs=1e-12)


def test_integer_orders_are_dp_accountings():
    acc = Accountant("rdp")
    acc.record(GaussianEvent(noise_multiplier=1.0, sampling_rate=0.25, steps=599))
    ref = dpa.rdp.RdpAccountant(orders=list(rdp_orders()))
    ref.compose(dpa_event(0.25, 1.0, 599))
    integer = rdp_orders() == np.round(rdp_orders())
    assert np.array_equal(acc._rdp[integer], np.asarray(ref._rdp)[integer])
    assert np.all(acc._rdp <= np.asarray(ref._rdp))
    assert np.isinf(np.asarray(ref._rdp)[:6]).all() and np.isfinite(acc._rdp).all()  # orders 1.1-1.6


@settings(max_examples=6)  # PLD composition takes ~0.1-1 s per example
@given(st.floats(0.01, 1.0), st.floats(0.8, 10.0), st.integers(1, 500), deltas)
def test_gaussian_pld_equals_dp_accounting(q, z, t, delta):
    ref = dpa.pld.PLDAccountant()
    ref.compose(dpa_event(q, z, t))
    ours = compute_epsilon(noise_multiplier=z, sampling_rate=q, steps=t, delta=delta, accountant="pld")
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=1e-6, abs=1e-12)


def test_abadi_et_al_2016_setting():
    kw = dict(noise_multiplier=4.0, sampling_rate=0.01, steps=10_000, delta=1e-5)
    assert round(compute_epsilon(conversion="classic", **kw), 2) == 1.26  # the paper's moments accountant
    assert compute_epsilon(**kw) == pytest.approx(1.04, abs=0.01)  # dp-accounting's conversion
    assert compute_epsilon(accountant="pld", **kw) == pytest.approx(0.95, abs=0.01)


@settings(max_examples=10)
@given(st.lists(st.tuples(rates, multipliers, st.integers(1, 100)), min_size=1, max_size=3), deltas)
def test_rdp_composition_adds_and_is_dp_accounting_or_tighter(events, delta):
    ref = dpa.rdp.RdpAccountant()
    acc = Accountant("rdp")
    for q, z, t in events:
        ref.compose(dpa_event(q, z, t))
        acc.record(GaussianEvent(noise_multiplier=z, sampling_rate=q, steps=t))
    assert acc.epsilon(delta) <= ref.get_epsilon(delta) * (1 + 1e-9) + 1e-12


def ddg(**kw):
    base = dict(noise_multiplier=1.2, sampling_rate=0.1, steps=10, num_clients=20, l2_clip=1.0, dimension=1000,
                granularity=1e-3, beta=0.0)
    return DDGEvent(**{**base, **kw})


def skellam(**kw):
    base = dict(noise_multiplier=1.2, sampling_rate=0.1, steps=10, l2_clip=1.0, dimension=1000, granularity=1e-3)
    return SkellamEvent(**{**base, **kw})


events = st.one_of(
    st.builds(GaussianEvent, noise_multiplier=multipliers, sampling_rate=rates, steps=st.integers(1, 1000),
              num_clients=st.none() | st.integers(1, 1000), round=st.none() | st.integers(0, 10**6)),
    st.builds(ddg, noise_multiplier=multipliers, num_clients=st.integers(1, 500), beta=st.floats(0.0, 0.9),
              round=st.none() | st.integers(0, 10**6)),
    st.builds(skellam, noise_multiplier=multipliers, granularity=st.floats(1e-5, 1.0),
              round=st.none() | st.integers(0, 9)),
)


@given(events)
def test_events_survive_json(event):
    d = json.loads(json.dumps(event.to_dict()))
    assert d["mechanism"] == event.mechanism
    assert event_from_dict(d) == event


@settings(max_examples=20)
@given(st.lists(events, min_size=1, max_size=4), deltas)
def test_ledger_recomputes_the_same_epsilon(evs, delta):
    acc = Accountant("rdp")
    for e in evs:
        acc.record(e)
    ledger = json.loads(json.dumps(acc.ledger))
    assert len(ledger) == len(evs) and all("mechanism" in d for d in ledger)
    again = Accountant.from_ledger(ledger, accountant="rdp")
    assert again.epsilon(delta) == acc.epsilon(delta)
    assert again.events == acc.events


@settings(max_examples=20)
@given(st.lists(events, max_size=3), events, deltas)
def test_epsilon_after_predicts_record_and_changes_nothing(evs, new, delta):
    acc = Accountant("rdp")
    for e in evs:
        acc.record(e)
    before = acc.epsilon(delta)
    predicted = acc.epsilon_after(new, delta)
    assert acc.epsilon(delta) == before and len(acc) == len(evs)
    acc.record(new)
    assert acc.epsilon(delta) == pytest.approx(predicted, rel=1e-12)
    assert predicted >= before - 1e-9


def test_pld_ledger_and_epsilon_after():
    acc = Accountant("pld")
    e = GaussianEvent(noise_multiplier=1.0, sampling_rate=0.05, steps=20, round=1)
    predicted = acc.epsilon_after(e, 1e-5)
    acc.record(e)
    assert acc.epsilon(1e-5) == pytest.approx(predicted)
    assert Accountant.from_ledger(acc.ledger, accountant="pld").epsilon(1e-5) == pytest.approx(predicted)


def test_empty_ledger_spends_nothing():
    assert Accountant().epsilon(1e-5) == 0.0
    assert Accountant("pld").epsilon(1e-5) == 0.0


@pytest.mark.parametrize("entry", [
    {"noise_multiplier": 1.0},
    {"mechanism": "laplace", "noise_multiplier": 1.0},
    {"mechanism": "gaussian", "noise_multiplier": 1.0, "colour": "red"},
    {"mechanism": "gaussian"},
    {"mechanism": "gaussian", "noise_multiplier": -1.0},
    {"mechanism": "gaussian", "noise_multiplier": 1.0, "sampling_rate": 1.5},
    {"mechanism": "ddg", "noise_multiplier": 1.0, "l2_clip": 1.0, "dimension": 10, "granularity": 0.1},
    {"mechanism": "skellam", "noise_multiplier": 1.0, "l2_clip": 1.0, "dimension": 0, "granularity": 0.1},
    "gaussian",
])
def test_malformed_ledger_entries_are_refused(entry):
    with pytest.raises(InvalidInput):
        Accountant.from_ledger([entry])


def test_ledger_must_be_a_list():
    with pytest.raises(InvalidInput):
        Accountant.from_ledger({"mechanism": "gaussian", "noise_multiplier": 1.0})


def test_pld_refuses_the_distributed_mechanisms():
    acc = Accountant("pld")
    assert not acc.supports(ddg()) and not acc.supports(skellam())
    with pytest.raises(ConfigurationError, match="rdp"):
        acc.record(ddg())
    with pytest.raises(ConfigurationError):
        compute_epsilon(mechanism="skellam", noise_multiplier=1.0, delta=1e-5, l2_clip=1.0, dimension=10,
                        granularity=0.01, accountant="pld")


@pytest.mark.parametrize("kwargs", [
    dict(mechanism="ddg", noise_multiplier=1.0, delta=1e-5, l2_clip=1.0, dimension=10, granularity=0.1),  # no n
    dict(mechanism="ddg", noise_multiplier=1.0, delta=1e-5, num_clients=3),
    dict(mechanism="gaussian", noise_multiplier=1.0, delta=1e-5, l2_clip=1.0),
    dict(mechanism="laplace", noise_multiplier=1.0, delta=1e-5),
    dict(noise_multiplier=1.0, delta=0.0),
    dict(noise_multiplier=1.0, delta=1.0),
    dict(noise_multiplier=0.0, delta=1e-5),
    dict(noise_multiplier=1.0, delta=1e-5, accountant="moments"),
    dict(noise_multiplier=1.0, delta=1e-5, accountant="pld", conversion="classic"),
])
def test_compute_epsilon_rejects_bad_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        compute_epsilon(**kwargs)


_ARRAY = np.array([1.0, 2.0])


@pytest.mark.parametrize("kwargs, words", [
    # numbers at float64's edges (were OverflowError, ZeroDivisionError, dp-accounting's ValueError)
    (dict(noise_multiplier=1e-300), "cannot evaluate"),
    (dict(noise_multiplier=1e300), "cannot evaluate"),
    (dict(noise_multiplier=1e300, accountant="pld"), "cannot evaluate"),
    (dict(noise_multiplier=1e-300, accountant="pld"), "cannot evaluate"),
    (dict(sampling_rate=1e-320, accountant="pld"), "cannot evaluate"),
    (dict(steps=2**64, accountant="pld"), "cannot evaluate"),
    # no finite epsilon (was inf)
    (dict(delta=1e-300, accountant="pld"), "no finite epsilon at delta=1e-300"),
    # a scaled clip that overflows: NaN RDP, which came out as epsilon 0.0
    (dict(mechanism="skellam", l2_clip=1e300, dimension=100, granularity=1e-300), "l2_clip / granularity = inf"),
    (dict(mechanism="ddg", l2_clip=1e-300, dimension=100, granularity=1e300, num_clients=10),
     "l2_clip / granularity = 0.0"),
    # an array where a name belongs (was numpy's "truth value of an array is ambiguous")
    (dict(mechanism=_ARRAY), "mechanism must be"),
    (dict(accountant=_ARRAY), "accountant must be"),
    (dict(conversion=_ARRAY), "conversion must be"),
    (dict(beta=_ARRAY), r"the gaussian mechanism takes no \['beta'\]"),
])
def test_compute_epsilon_at_the_edges_is_a_configuration_error(kwargs, words):
    with pytest.raises(ConfigurationError, match=words):
        compute_epsilon(**{"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5, **kwargs})


def test_dp_configurations_refuse_an_array_as_a_name():
    with pytest.raises(ConfigurationError, match="accountant must be"):
        sf.privacy.CentralDP(noise_multiplier=1.0, accountant=_ARRAY)
    with pytest.raises(ConfigurationError, match="mechanism must be"):
        sf.privacy.DistributedDP(noise_multiplier=1.0, mechanism=_ARRAY)


def test_public_names():
    assert sf.privacy.compute_epsilon is compute_epsilon
    assert issubclass(sf.errors.PrivacyBudgetExceeded, sf.errors.SecureFedError)
    assert math.isfinite(sf.privacy.compute_epsilon(noise_multiplier=1.0, delta=1e-5))
