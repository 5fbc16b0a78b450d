"""epsilon_unamplified: the same ledger with every sampling rate taken as 1 (protocols/dp.md section 1).

Amplification by subsampling holds only against a party that does not learn the sample; the server
draws it (DistributedDP's adversary) and Flower shows it to every participant of a round."""

import dataclasses
import logging

import dp_accounting
import numpy as np
import pytest

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.privacy import Accountant, CentralDP, DistributedDP, GaussianEvent, PrivacySession, event_from_dict
from tests._toy import federation, model

DELTA = 1e-5


def gaussian_ledger(q):
    return [GaussianEvent(noise_multiplier=z, sampling_rate=q, steps=s, round=r, num_clients=4)
            for r, (z, s) in enumerate([(1.0, 1), (1.3, 2), (0.9, 1), (1.0, 3)], start=1)]


def dp_accounting_epsilon(kind, events):
    """The ledger at q = 1, composed by dp-accounting directly (not through securefed)."""
    acc = (dp_accounting.rdp.RdpAccountant(orders=list(sf.privacy.accountant.rdp_orders())) if kind == "rdp"
           else dp_accounting.pld.PLDAccountant())
    for e in events:
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(e.noise_multiplier), e.steps))
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_unamplified_is_the_ledger_at_q_1_composed_by_dp_accounting(kind):
    acc = Accountant(kind)
    for e in gaussian_ledger(0.3):
        acc.record(e)
    plain = acc.epsilon(DELTA, amplified=False)
    assert plain == pytest.approx(dp_accounting_epsilon(kind, acc.events), rel=1e-9)
    assert plain > acc.epsilon(DELTA) * 1.5  # q = 0.3 amplifies a lot: the two differ, by far
    assert acc.unamplified().epsilon(DELTA) == pytest.approx(plain, rel=1e-12)
    assert [e.sampling_rate for e in acc.unamplified().events] == [1.0] * 4
    assert [e.sampling_rate for e in acc.events] == [0.3] * 4  # the ledger itself is unchanged
    acc.record(gaussian_ledger(0.3)[0])  # composed incrementally: a later event counts too
    assert acc.epsilon(DELTA, amplified=False) == pytest.approx(
        dp_accounting_epsilon(kind, acc.events), rel=1e-9)
    assert acc.epsilon(DELTA, amplified=False) > plain


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_unamplified_equals_epsilon_when_nothing_is_sampled(kind):
    acc = Accountant(kind)
    assert acc.epsilon(DELTA, amplified=False) == 0.0
    for e in gaussian_ledger(1.0):
        acc.record(e)
    assert acc.epsilon(DELTA, amplified=False) == acc.epsilon(DELTA)


def session(privacy, q, protocol=None):
    n = 10
    s = PrivacySession(privacy, protocol=protocol or sf.protocols.SecAgg(threshold=3), population=n,
                       clients_per_round=round(q * n), dimension=20, local_steps=1, rng=RandomSource(0))
    return s


@pytest.mark.parametrize("distributed", [False, True])
def test_session_unamplified_against_rebuilt_events_and_amplified(distributed):
    """The red team's setting (10 nodes, q = 0.5, z = 1, 12 rounds) as a sanity check: a nontrivial run
    at q < 1 is charged strictly more without amplification; at q = 1 the two are the same number."""
    cfg = (DistributedDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA) if distributed
           else CentralDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA))
    for q in (0.5, 1.0):
        s = session(cfg, q)
        for r in range(1, 13):
            s.before_round(r, 5)
            s.finish_round(np.zeros(s.input_size(20)), 5, 5 if q < 1 else 10, r)
        rebuilt = Accountant()
        for entry in s.accountant.ledger:
            rebuilt.record(dataclasses.replace(event_from_dict(entry), sampling_rate=1.0))
        assert s.epsilon_unamplified() == pytest.approx(rebuilt.epsilon(DELTA), rel=1e-12)
        if q < 1:
            assert s.epsilon_unamplified() > s.epsilon() * 1.05
            assert s.metrics["epsilon_unamplified"] == s.epsilon_unamplified()
        else:
            assert s.epsilon_unamplified() == s.epsilon()
            assert "epsilon_unamplified" not in s.metrics


def trainer(privacy, clients_per_round, **kw):
    data = federation(sizes=(20,) * 10)
    return sf.Trainer(model(), data, privacy=privacy, progress=False, seed=1, clients_per_round=clients_per_round,
                      protocol=sf.protocols.SecAgg(threshold=3), **kw)


def test_trainer_reports_unamplified_on_every_released_round_and_warns_once_under_distributed(caplog):
    caplog.set_level(logging.WARNING, logger="securefed.privacy")
    t = trainer(DistributedDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA), 5)
    h = t.fit(rounds=6)
    released = [r for r in h.rounds if r.included]
    assert released
    acc = Accountant()
    for r in h.rounds:
        if not r.included:  # a sample too small to run releases nothing: no metric, no charge
            assert "epsilon_unamplified" not in r.metrics
            continue
        (entry,) = [e for e in t.accountant.ledger if e["round"] == r.round]
        acc.record(dataclasses.replace(event_from_dict(entry), sampling_rate=1.0))
        assert r.metrics["epsilon_unamplified"] == pytest.approx(acc.epsilon(DELTA), rel=1e-12)
        assert r.metrics["epsilon_unamplified"] > r.epsilon
    warnings = [rec for rec in caplog.records if "epsilon_unamplified" in rec.getMessage()]
    assert len(warnings) == 1 and "against the server" in warnings[0].getMessage()


def test_trainer_central_dp_reports_the_metric_without_the_server_warning_and_q_1_has_neither(caplog):
    caplog.set_level(logging.WARNING, logger="securefed.privacy")
    h = trainer(CentralDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA), 5).fit(rounds=3)
    assert all("epsilon_unamplified" in r.metrics for r in h.rounds if r.included)
    h = trainer(DistributedDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA), 10).fit(rounds=2)
    assert all("epsilon_unamplified" not in r.metrics for r in h.rounds)
    assert not [rec for rec in caplog.records if "epsilon_unamplified" in rec.getMessage()]


def test_secure_fed_avg_reports_unamplified_on_every_released_round_and_warns_once(tmp_path, caplog):
    """Flower: the same session through the same round engine; the metric matches the checkpoint's ledger."""
    from securefed.flower import SecureFedAvg, _checkpoint
    from securefed.flower.testing import InProcessGrid
    from tests.flower import apps

    caplog.set_level(logging.WARNING, logger="securefed.privacy")
    privacy = DistributedDP(noise_multiplier=1.0, clipping=0.5)
    protocol = sf.protocols.SecAggPlus()
    grid = InProcessGrid(apps.client_app(protocol, lambda p, r: np.full(apps.dim(), 0.3 * (p + 1)),
                                         privacy=privacy), apps.nodes(10))
    s = SecureFedAvg(protocol=protocol, privacy=privacy, fraction_train=0.5, min_train_nodes=3,
                     min_available_nodes=10, seed=3, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                     checkpoint_dir=tmp_path / "ckpt")
    res = s.start(grid, apps.model(), num_rounds=5)
    ledger = _checkpoint.load(tmp_path / "ckpt")[0]["ledger"]
    released = [r for r in res.rounds if r.included]
    assert released and len(released) == len(ledger)
    acc = Accountant()
    for r, entry in zip(released, ledger, strict=True):
        assert entry["round"] == r.round and entry["sampling_rate"] == 0.5
        acc.record(dataclasses.replace(event_from_dict(entry), sampling_rate=1.0))
        assert r.metrics["epsilon_unamplified"] == pytest.approx(acc.epsilon(privacy.delta), rel=1e-12)
        assert r.metrics["epsilon_unamplified"] > r.epsilon
    assert all("epsilon_unamplified" not in r.metrics for r in res.rounds if not r.included)
    assert len([rec for rec in caplog.records if "epsilon_unamplified" in rec.getMessage()]) == 1
