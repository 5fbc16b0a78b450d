"""Trainer(privacy=...): budget, per-round epsilon, who took part, DP-FedAvg arithmetic, audit log."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import securefed as sf
from securefed.audit import verify
from securefed.audit.keys import key_paths
from securefed.cli import main
from securefed.crypto.random import RandomSource
from securefed.encoding import flatten
from securefed.errors import ConfigurationError, PrivacyBudgetExceeded
from securefed.privacy import (
    Accountant,
    AdaptiveClipping,
    CentralDP,
    DistributedDP,
    GaussianEvent,
    PrivacySession,
    SampleLevelDP,
    compute_epsilon,
)
from tests._toy import federation, model

DELTA = 1e-5


def params(m):
    return flatten(dict(m.named_parameters()))[0].astype(np.float64)


def trainer(privacy, data=None, **kw):
    return sf.Trainer(model(), data or federation(), privacy=privacy, progress=False, seed=1, **kw)


@pytest.mark.parametrize("clients_per_round", [4, 2])  # q = 1, and Poisson sampling at q = 1/2
def test_budget_stops_exactly_at_the_last_affordable_round(clients_per_round):
    z, q = 2.0, clients_per_round / 4
    spent = [compute_epsilon(noise_multiplier=z, sampling_rate=q, steps=r, delta=DELTA) for r in range(1, 8)]
    target = (spent[3] + spent[4]) / 2  # rounds 1-4 fit, round 5 would not
    snapshots = []
    t = trainer(CentralDP(noise_multiplier=z, clipping=1.0, target_epsilon=target, delta=DELTA),
                clients_per_round=clients_per_round, on_round=lambda r: snapshots.append(params(t.model)))
    with pytest.raises(PrivacyBudgetExceeded, match="spent so far: .* in 4 rounds"):
        t.fit(rounds=20)
    released = [r for r in t.history.rounds if r.included]  # a Poisson sample can be empty: skipped, free
    assert len(released) == 4 and [e["round"] for e in t.accountant.ledger] == [r.round for r in released]
    assert [r.epsilon for r in released] == pytest.approx(spent[:4], rel=1e-9)
    assert t.history.final.epsilon <= target < spent[4]
    np.testing.assert_array_equal(params(t.model), snapshots[-1])  # the refused round changed nothing
    assert len(t.accountant) == 4
    for _ in range(5):  # and it stays refused (an empty sample is skipped, at no cost)
        try:
            assert not t.run_round().included
        except PrivacyBudgetExceeded:
            pass
    assert len(t.accountant) == 4 and len([r for r in t.history.rounds if r.included]) == 4


@pytest.mark.filterwarnings("ignore::securefed.training.SeededSecretsWarning")
def test_history_epsilon_is_the_spend_so_far_and_the_ledger_recomputes_it():
    # Seeded secrets (simulation): Poisson samples at q = 3/4 that are never empty in these 4 rounds.
    t = trainer(CentralDP(noise_multiplier=1.5, clipping=0.5, delta=DELTA), clients_per_round=3,
                reproducible_secrets=True)
    h = t.fit(rounds=4)
    eps = [r.epsilon for r in h.rounds]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    ledger = t.accountant.ledger
    assert [e["round"] for e in ledger] == [1, 2, 3, 4]
    assert all(e == GaussianEvent(noise_multiplier=1.5, sampling_rate=0.75, num_clients=len(r.included),
                                  round=r.round).to_dict() for e, r in zip(ledger, h.rounds))
    for i in range(1, 5):
        assert Accountant.from_ledger(ledger[:i]).epsilon(DELTA) == eps[i - 1]


def test_distributed_dp_counts_who_really_took_part():
    z, c, t_min = 1.0, 0.5, 3
    protocol = sf.protocols.SecAgg(threshold=t_min)
    t = trainer(DistributedDP(noise_multiplier=z, clipping=c, delta=DELTA), protocol=protocol,
                dropouts=lambda r, parts: {parts[0]: "masked_input"} if r == 2 else {})
    h = t.fit(rounds=3)
    assert [len(r.included) for r in h.rounds] == [4, 3, 4]
    ledger = t.accountant.ledger
    assert [e["mechanism"] for e in ledger] == ["ddg"] * 3
    assert [e["num_clients"] for e in ledger] == [4, 3, 4]
    # Shares provisioned for t = 3: a sum of m shares has multiplier z sqrt(m / t).
    assert [e["noise_multiplier"] for e in ledger] == pytest.approx([z * math.sqrt(m / t_min) for m in (4, 3, 4)])
    assert h.final.epsilon == Accountant.from_ledger(ledger).epsilon(DELTA)
    # Had nobody dropped, the run would have cost less: fewer shares, less noise.
    everyone = [dict(e, num_clients=4, noise_multiplier=z * math.sqrt(4 / t_min)) for e in ledger]
    assert Accountant.from_ledger(everyone).epsilon(DELTA) < h.final.epsilon


def test_shares_of_clients_colluding_with_the_server_are_not_counted():
    protocol = sf.protocols.SecAgg(threshold=3)
    t = trainer(DistributedDP(noise_multiplier=1.0, clipping=0.5, colluding_fraction=0.25), protocol=protocol)
    t.fit(rounds=1)
    (event,) = t.accountant.ledger
    # C = ceil(0.25 * 4) = 1: noise provisioned for t - C = 2 honest shares, 4 - 1 = 3 honest shares summed.
    assert event["num_clients"] == 3
    assert event["noise_multiplier"] == pytest.approx(math.sqrt(3 / 2))
    with pytest.raises(ConfigurationError, match="collud"):
        trainer(DistributedDP(noise_multiplier=1.0, colluding_fraction=0.5), protocol=sf.protocols.SecAgg(threshold=2))


def test_distributed_budget_is_checked_against_the_threshold_worst_case():
    protocol = sf.protocols.SecAgg(threshold=2)
    per_round_worst = compute_epsilon(mechanism="ddg", noise_multiplier=1.0, delta=DELTA, l2_clip=0.5,
                                      dimension=67, granularity=sf.privacy.default_granularity(0.5, 67),
                                      num_clients=2)
    t = trainer(DistributedDP(noise_multiplier=1.0, clipping=0.5, delta=DELTA, target_epsilon=2.5 * per_round_worst),
                protocol=protocol)
    with pytest.raises(PrivacyBudgetExceeded):
        t.fit(rounds=20)
    spent = t.history.final.epsilon
    assert spent <= 2.5 * per_round_worst
    worst = t.privacy_session.planned_event(len(t.history.rounds) + 1, 4)
    assert worst.noise_multiplier == pytest.approx(1.0)  # the noise of t = 2 shares
    assert t.accountant.epsilon_after(worst, DELTA) > 2.5 * per_round_worst


class _Threshold:
    """Just the protocol's threshold (any t, which SecAgg's own rules would restrict)."""

    def __init__(self, t):
        self.t = t

    def min_survivors(self, n):
        return self.t

    def with_encoder(self, encoder):
        return self


@settings(max_examples=30)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
       st.sampled_from(["ddg", "skellam"]), st.floats(0.05, 3.0), st.sampled_from([1.0, 0.2]))
def test_the_planned_event_costs_at_least_any_round_that_can_finish(n_t, mechanism, local_sigma, q):
    """Whoever of the n survives (t <= m <= n), the recorded event costs no more than the planned one,
    even with small shares where the discrete Gaussian's tau grows with the number of shares."""
    n, t_min = n_t
    d, c, z = 20, 1.0, 1.0
    gamma = z * c / (local_sigma * math.sqrt(t_min))  # shares of integer std local_sigma
    session = PrivacySession(DistributedDP(noise_multiplier=z, clipping=c, mechanism=mechanism, granularity=gamma),
                             protocol=_Threshold(t_min), population=n, clients_per_round=n,
                             dimension=d, local_steps=1, rng=RandomSource(0))
    session.sampling_rate = q
    planned = Accountant().epsilon_after(session.planned_event(1, n), DELTA)
    for m in {t_min, (t_min + n) // 2, n}:
        assert Accountant().epsilon_after(session._event(included=m, n=n, round=1), DELTA) <= planned * (1 + 1e-9)


def test_fedsgd_step_is_the_uniform_mean_of_clipped_updates():
    data = federation(sizes=(10, 30, 20))
    m = model()
    start = params(m)
    clip, lr, server_lr = 0.05, 0.1, 2.0
    expected = np.zeros_like(start)
    for d in data:
        local = model()
        opt = torch.optim.SGD(local.parameters(), lr=lr)
        x, y = d.tensors
        torch.nn.functional.cross_entropy(local(x), y).backward()
        opt.step()
        delta = params(local) - start
        expected += delta * min(1.0, clip / np.linalg.norm(delta))
    expected = start + server_lr * expected / len(data)
    sf.Trainer(m, data, algorithm="fedsgd", lr=lr, server_lr=server_lr, progress=False,
               privacy=CentralDP(noise_multiplier=1e-9, clipping=clip)).fit(1)
    np.testing.assert_allclose(params(m), expected, atol=1e-6)


def test_sample_level_dp_accounts_each_local_step():
    t = trainer(SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25, delta=DELTA),
                local_epochs=2, clients_per_round=2)
    h = t.fit(rounds=2)
    assert [e["steps"] for e in t.accountant.ledger] == [8, 8]  # 2 epochs of round(1 / 0.25) steps
    assert [e["sampling_rate"] for e in t.accountant.ledger] == [0.25, 0.25]
    assert h.final.epsilon == pytest.approx(compute_epsilon(noise_multiplier=1.0, sampling_rate=0.25, steps=16,
                                                            delta=DELTA), rel=1e-9)
    assert all(len(r.included) == 2 for r in h.rounds)  # client sampling unchanged at sample level


@pytest.mark.filterwarnings("ignore::securefed.training.SeededSecretsWarning")
@pytest.mark.parametrize("distributed", [False, True])
def test_adaptive_clipping_grows_a_small_clip_and_accounts_the_overall_multiplier(distributed):
    # Count noise 0.6 over 4 participants: the noised unclipped fraction stays far below the 0.5 target.
    clipping = AdaptiveClipping(initial_clip=1e-3, target_quantile=0.5, learning_rate=0.2, count_stddev=0.6)
    # Seeded secrets (simulation): with fresh count noise (std 0.15 on the fraction) a round goes above the
    # target with probability 4e-4, so a pinned run keeps the test deterministic.
    kw = {"reproducible_secrets": True}
    if distributed:  # the count bit rides in the same noisy integer vector (its joint norm checked by the encoder)
        t = trainer(DistributedDP(noise_multiplier=1.0, clipping=clipping, delta=DELTA),
                    protocol=sf.protocols.SecAgg(threshold=3), **kw)
    else:
        t = trainer(CentralDP(noise_multiplier=1.0, clipping=clipping, delta=DELTA), **kw)
    h = t.fit(rounds=4)
    clips = [r.metrics["l2_clip"] for r in h.rounds]
    assert clips[0] == 1e-3 and all(b > a for a, b in zip(clips, clips[1:]))  # everyone was clipped
    assert all(r.metrics["unclipped_fraction"] < 0.5 for r in h.rounds)
    assert clipping.bound == 1e-3  # the trainer works on its own copy
    if distributed:
        # Provisioned for t = 3, all 4 summed: multiplier sqrt(4 / 3) against the joint bound.
        assert [e["noise_multiplier"] for e in t.accountant.ledger] == pytest.approx([math.sqrt(4 / 3)] * 4)
        assert t.accountant.ledger[0]["l2_clip"] > 1e-3  # the joint bound of update and count bit
    else:
        assert h.final.epsilon == pytest.approx(compute_epsilon(noise_multiplier=1.0, steps=4, delta=DELTA))


@pytest.mark.filterwarnings("ignore::securefed.training.SeededSecretsWarning")
@pytest.mark.parametrize("secagg", [False, True])
def test_a_sample_too_small_for_the_protocol_releases_and_spends_nothing(secagg):
    """Poisson samples at q = 1/2 of 4: empty ones (Plain), or below SecAgg's 3 clients, are skipped."""
    kw = dict(protocol=sf.protocols.SecAgg()) if secagg else {}
    privacy = DistributedDP(noise_multiplier=2.0, clipping=1.0) if secagg else CentralDP(noise_multiplier=2.0)
    # Seeded secrets (simulation): a sample sequence with two skipped rounds within 40.
    t = trainer(privacy, data=federation(sizes=(10, 10, 10, 10)), clients_per_round=2, reproducible_secrets=True,
                **kw)
    smallest = 3 if secagg else 1
    skipped = 0
    for _ in range(40):
        before, spent = params(t.model), len(t.accountant)
        r = t.run_round()
        if r.included:
            assert len(r.included) >= smallest and len(t.accountant) == spent + 1
            continue
        skipped += 1
        assert r.loss is None and r.metrics["skipped"] == 1.0
        np.testing.assert_array_equal(params(t.model), before)
        assert len(t.accountant) == spent and r.epsilon == t.accountant.epsilon(DELTA)
        if skipped == 2:
            break
    assert skipped == 2
    assert [e["round"] for e in t.accountant.ledger] == [r.round for r in t.history.rounds if r.included]


@pytest.mark.filterwarnings("ignore::securefed.training.SeededSecretsWarning")
def test_a_skipped_round_is_in_the_trainers_audit_log(tmp_path, capsys):
    """protocols/audit.md, round_skipped: the trainer logs a too-small sample as the Flower strategy does, so
    every round number is in the log once and the log verifies; a skipped entry carries no DP event."""
    path = tmp_path / "skips.jsonl"
    t = trainer(DistributedDP(noise_multiplier=2.0, clipping=1.0), data=federation(sizes=(10, 10, 10, 10)),
                clients_per_round=2, reproducible_secrets=True, protocol=sf.protocols.SecAgg(), audit_log=path)
    with t.audit.session(config={}, privacy=t.privacy_session.audit_settings(), seeded_secrets=True):
        while sum(1 for r in t.history.rounds if not r.included) < 2:
            t.run_round()
    t.audit.close()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    rounds = [e["body"]["round"] for e in entries if e["type"] in ("round", "round_skipped")]
    assert rounds == [r.round for r in t.history.rounds]
    skipped = [e["body"] for e in entries if e["type"] == "round_skipped"]
    assert [b["round"] for b in skipped] == [r.round for r in t.history.rounds if not r.included]
    assert all(b["dp"]["events"] == [] and b["reason"] == "sample_too_small" for b in skipped)
    assert verify(path, allow_seeded=True).ok
    capsys.readouterr()
    assert main(["audit", "verify", str(path), "--allow-seeded", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2


def test_dp_configuration_errors():
    with pytest.raises(ConfigurationError, match="uniform"):
        trainer(CentralDP(noise_multiplier=1.0), weighting="examples")
    with pytest.raises(ConfigurationError):
        trainer(DistributedDP(noise_multiplier=1.0))  # Plain carries no integers
    with pytest.raises(ConfigurationError):
        trainer("central")
    with pytest.raises(ConfigurationError):
        DistributedDP(noise_multiplier=1.0, accountant="pld")
    with pytest.raises(ConfigurationError):
        CentralDP(noise_multiplier=1.0, delta=0.0)
    assert trainer(CentralDP(noise_multiplier=1.0)).weighting == "uniform"
    assert trainer(None).accountant is None


def test_audit_log_records_the_ledger_and_a_resumed_run_keeps_counting(tmp_path):
    path = tmp_path / "dp.jsonl"
    cfg = CentralDP(noise_multiplier=1.5, clipping=1.0, delta=DELTA)
    t = trainer(cfg, audit_log=path)
    t.fit(rounds=2)
    t.audit.close()
    t2 = trainer(cfg, audit_log=path)
    h = t2.fit(rounds=1)
    t2.audit.close()
    assert h.final.round == 3
    assert h.final.epsilon == pytest.approx(compute_epsilon(noise_multiplier=1.5, steps=3, delta=DELTA))
    res = verify(path, key_paths(path)[1])
    assert res.ok, res.summary()
    assert res.epsilon == pytest.approx(h.final.epsilon)
