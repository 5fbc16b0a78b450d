"""Differential privacy on Flower: clipping on the nodes, noise, the accountant's ledger, the budget, and resume."""

import json
import math

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, ConfigurationError, PrivacyBudgetExceeded, ProtocolAborted
from securefed.flower import SecureClient, SecureFedAvg, _checkpoint, _privacy
from securefed.flower.testing import InProcessGrid
from securefed.privacy import (
    Accountant,
    AdaptiveClipping,
    CentralDP,
    DistributedDP,
    PrivacySession,
    event_from_dict,
)
from securefed.rounds import RoundEngine
from tests.flower import apps
from tests.flower.test_resume import Crash, CrashingGrid

N = 5
CLIP = 0.5


def updates(p, rnd):
    return np.full(apps.dim(), 0.3 * (p + 1))  # norm 0.95 (p + 1): every node is clipped to CLIP


def ddg(**kw):
    return DistributedDP(noise_multiplier=2.0, clipping=CLIP, **kw)


def run(tmp_path, protocol, privacy, rounds, *, grid=None, node_privacy=None, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    app = apps.client_app(protocol, updates, privacy=node_privacy or privacy)
    grid = grid or InProcessGrid(app, apps.nodes(N))
    grid.client_app = app
    strategy = SecureFedAvg(protocol=protocol, privacy=privacy, seed=3, phase_timeout=0.05, train_timeout=0.05,
                            poll_interval=0.01, checkpoint_dir=tmp_path / "ckpt", audit_log=tmp_path / "audit.jsonl",
                            **kw)
    return strategy.start(grid, apps.model(), num_rounds=rounds)


def test_distributed_dp_in_secagg_plus_clips_noises_and_accounts_for_who_was_included(tmp_path):
    protocol, privacy = sf.protocols.SecAggPlus(), ddg()
    res = run(tmp_path, protocol, privacy, 2)
    # The ledger: one event per round with the nodes actually included; epsilon as the accountant says.
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    events = [event_from_dict(e) for e in state["ledger"]]
    assert [e.num_clients for e in events] == [N, N] and [e.round for e in events] == [1, 2]
    acc = Accountant.from_ledger(state["ledger"], "rdp")
    assert res.rounds[-1].epsilon == pytest.approx(acc.epsilon(privacy.delta), rel=1e-12)
    assert 0 < res.rounds[0].epsilon < res.rounds[1].epsilon
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()
    assert audit.epsilon == pytest.approx(res.rounds[-1].epsilon, rel=1e-9)
    assert list(audit.ledger) == state["ledger"]
    # Each round moved the model by the mean of the clipped updates plus noise of std z C / N per coordinate;
    # averaged over the coordinates, the noise of both rounds has std sqrt(2) z C / (N sqrt(dim)).
    clipped = np.mean([updates(p, 1) * min(1.0, CLIP / np.linalg.norm(updates(p, 1))) for p in range(N)], axis=0)
    unclipped = np.mean([updates(p, 1) for p in range(N)], axis=0)
    std = np.sqrt(2) * privacy.noise_multiplier * CLIP / N / np.sqrt(apps.dim())
    moved = apps.vector(res.arrays).mean()
    assert abs(moved - 2 * clipped.mean()) < 5 * std < abs(2 * unclipped.mean() - 2 * clipped.mean())


def test_central_dp_noises_on_the_server_and_records_gaussian_events(tmp_path):
    protocol, privacy = sf.protocols.Plain(), CentralDP(noise_multiplier=0.7, clipping=CLIP)
    res = run(tmp_path, protocol, privacy, 1)
    clipped = np.mean([updates(p, 1) * CLIP / np.linalg.norm(updates(p, 1)) for p in range(N)], axis=0)
    moved = apps.vector(res.arrays)
    assert not np.allclose(moved, clipped, atol=1e-9)  # noise was added
    np.testing.assert_allclose(moved, clipped, atol=6 * 0.7 * CLIP / N)
    (event,) = _checkpoint.load(tmp_path / "ckpt")[0]["ledger"]
    assert event["mechanism"] == "gaussian" and event["noise_multiplier"] == 0.7 and event["num_clients"] == N


@pytest.mark.parametrize(("colluding", "granularity"), [(0.0, None), (0.2, None), (0.0, 1.0)],
                         ids=["fine", "colluding", "small shares"])
def test_the_budget_check_and_ledger_are_the_trainers(tmp_path, colluding, granularity):
    """Flower refuses exactly the round the trainer's PrivacySession refuses, and records the same events.

    Round 2 loses a node (silent throughout), round 3 runs without it (cool-down): three rounds
    with (n, included) = (5, 5), (5, 4), (4, 4). The session's planned event bounds every way a
    round can finish (noise of t shares, and for shares this small, where the discrete Gaussian's
    tau matters, tau of all n shares), and counts only honest shares."""
    protocol, privacy = sf.protocols.SecAggPlus(), ddg(colluding_fraction=colluding, granularity=granularity)
    silent = apps.FIRST + 1

    def grid():
        app = apps.client_app(protocol, updates, privacy=privacy)
        return InProcessGrid(app, apps.nodes(N), deliver=lambda node, msg: not (
            node == silent and msg.content["securefed"]["round"] == 2))

    def session(ledger):
        s = PrivacySession(privacy, protocol=protocol, population=N, clients_per_round=N, dimension=apps.dim(),
                           local_steps=1, rng=RandomSource(0))
        s.resume(ledger)
        return s

    free = run(tmp_path / "free", protocol, privacy, 3, grid=grid())
    ledger = _checkpoint.load(tmp_path / "free" / "ckpt")[0]["ledger"]
    shape = [(len(r.participants), len(r.included)) for r in free.rounds]
    assert shape == [(5, 5), (5, 4), (4, 4)]
    assert ledger == [session([]).mechanism().event(included=m, n=n, round=k).to_dict()
                      for k, (n, m) in enumerate(shape, 1)]
    assert [e["num_clients"] for e in ledger] == [m - math.ceil(colluding * n - 1e-9) for n, m in shape]
    planned = [session(ledger[: k - 1]).accountant.epsilon_after(session([]).planned_event(k, n), privacy.delta)
               for k, (n, _) in enumerate(shape, 1)]
    assert all(r.epsilon < p for r, p in zip(free.rounds, planned))
    # Stop at the first round whose planned spend exceeds every earlier one's (tau of fewer shares can
    # make round 3's bound smaller than round 2's).
    stop = next(k for k in (2, 3) if planned[k - 1] > max(planned[: k - 1]))
    target = (max(planned[: stop - 1]) + planned[stop - 1]) / 2
    capped = ddg(colluding_fraction=colluding, granularity=granularity, target_epsilon=target)
    with pytest.raises(PrivacyBudgetExceeded, match=f"round {stop}"):
        run(tmp_path / "capped", protocol, capped, 5, grid=grid())
    state, _, _ = _checkpoint.load(tmp_path / "capped" / "ckpt")
    assert state["round"] == stop - 1 and state["ledger"] == ledger[: stop - 1]
    # The trainer's session, holding the same ledger, refuses the same round and accepts the one before.
    ref = PrivacySession(capped, protocol=protocol, population=N, clients_per_round=N, dimension=apps.dim(),
                         local_steps=1, rng=RandomSource(0))
    ref.resume(ledger[: stop - 2])
    ref.before_round(stop - 1, shape[stop - 2][0])
    ref.resume(ledger[: stop - 1])
    with pytest.raises(PrivacyBudgetExceeded, match=f"round {stop}"):
        ref.before_round(stop, shape[stop - 1][0])


def test_nodes_with_other_privacy_settings_refuse(tmp_path):
    protocol = sf.protocols.SecAggPlus()
    res = run(tmp_path, protocol, ddg(), 1, node_privacy=DistributedDP(noise_multiplier=0.1, clipping=CLIP))
    assert res.rounds[0].aborted is not None and not res.rounds[0].included
    assert _checkpoint.load(tmp_path / "ckpt")[0]["ledger"] == []  # nothing was released


@pytest.mark.parametrize("crash_round", [1, 2])
def test_a_resumed_run_has_the_ledger_of_an_uninterrupted_one(tmp_path, crash_round):
    protocol, privacy = sf.protocols.SecAggPlus(), ddg()
    ref = run(tmp_path / "ref", protocol, privacy, 3)
    ref_ledger = _checkpoint.load(tmp_path / "ref" / "ckpt")[0]["ledger"]
    app = apps.client_app(protocol, updates, privacy=privacy)
    grid = CrashingGrid(app, apps.nodes(N), crash_at=(crash_round, "masked_input"))
    with pytest.raises(Crash):
        run(tmp_path, protocol, privacy, 3, grid=grid)
    res = run(tmp_path, protocol, privacy, 3, grid=grid)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["ledger"] == ref_ledger  # same events, none twice
    assert [r.round for r in res.rounds] == [1, 2, 3]
    assert res.rounds[-1].epsilon == pytest.approx(ref.rounds[-1].epsilon, rel=1e-12)
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()
    assert list(audit.ledger) == ref_ledger
    # Seeded, the rerun repeats the interrupted round exactly: the same model as the uninterrupted run.
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


def test_an_aggregate_released_before_a_crash_stays_in_the_ledger(tmp_path, monkeypatch):
    """Decoded but not committed: the server saw it, so it is counted (once), and the rerun is counted too."""
    protocol, privacy = sf.protocols.SecAggPlus(), ddg()
    real = _checkpoint.save

    def dying(directory, *, round_index, **kw):
        if round_index == 2:
            raise Crash
        return real(directory, round_index=round_index, **kw)

    monkeypatch.setattr(_checkpoint, "save", dying)
    with pytest.raises(Crash):
        run(tmp_path, protocol, privacy, 3)
    monkeypatch.setattr(_checkpoint, "save", real)
    # With an audit log the release is logged before the commit (a release entry), and released.json never exists.
    assert not (tmp_path / "ckpt" / "released.json").exists()
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    releases = [(e["body"]["round"], [d["round"] for d in e["body"]["dp"]["events"]])
                for e in entries if e["type"] == "release"]
    assert releases == [(1, [1]), (2, [2])]
    res = run(tmp_path, protocol, privacy, 3)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert [e["round"] for e in state["ledger"]] == [1, 2, 2, 3]
    assert not (tmp_path / "ckpt" / "released.json").exists()
    assert res.rounds[-1].epsilon == pytest.approx(Accountant.from_ledger(state["ledger"]).epsilon(privacy.delta))
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok and audit.seeded_secrets, audit.summary()
    assert [e["round"] for e in audit.ledger] == [1, 2, 2, 3]


def adaptive(**kw):
    clip = AdaptiveClipping(initial_clip=1.5, target_quantile=0.5, learning_rate=0.3, count_stddev=1.0)
    return CentralDP(noise_multiplier=0.5, clipping=clip, **kw)


def test_adaptive_clipping_moves_the_clip_on_flower_as_the_trainers_session_does(tmp_path):
    """The strategy's clip follows the trainer's PrivacySession fed the same updates with the same coins
    (the strategy's seeded privacy randomness); the nodes clip at the clip the server sends."""
    protocol, privacy, rounds = sf.protocols.Plain(), adaptive(), 3
    res = run(tmp_path, protocol, privacy, rounds)
    ref = PrivacySession(privacy, protocol=protocol, population=N, clients_per_round=N, dimension=apps.dim(),
                         local_steps=1, rng=RandomSource(3).child("flower/privacy"))
    clips, fractions = [], []
    for r in range(1, rounds + 1):
        ref.before_round(r, N)
        total = sum(ref.client_input(updates(p, r), [6, 4]) for p in range(N))
        ref.finish_round(total, N, N, r)
        clips.append(ref.metrics["l2_clip"])
        fractions.append(ref.metrics["unclipped_fraction"])
    assert [r.metrics["l2_clip"] for r in res.rounds] == pytest.approx(clips, rel=1e-9)
    assert [r.metrics["unclipped_fraction"] for r in res.rounds] == pytest.approx(fractions, rel=1e-9, abs=1e-9)
    assert len(set(clips)) == rounds  # the clip moved every round
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["privacy"]["clip"] == pytest.approx(ref.clipping.bound, rel=1e-9)
    assert [e["num_clients"] for e in state["ledger"]] == [N] * rounds
    assert res.rounds[-1].epsilon == pytest.approx(ref.epsilon(), rel=1e-12)


def test_adaptive_clipping_with_distributed_noise_moves_the_clip_as_the_trainers_session_does(tmp_path, monkeypatch):
    """DistributedDP: each node's noise encoder is built for the round's clip (in every phase's params). The
    trainer's session, fed the sums the Flower server decoded, moves the clip as the strategy did and spends
    the same epsilon; each decoded sum is the session's inputs at that clip plus the nodes' noise."""
    from securefed.flower.aggregation import GridAggregator

    clip = AdaptiveClipping(initial_clip=1.5, target_quantile=0.5, learning_rate=0.3, count_stddev=1.0)
    protocol, privacy, rounds = sf.protocols.SecAggPlus(), DistributedDP(noise_multiplier=0.1, clipping=clip), 3
    totals, encoders, real = [], [], GridAggregator.run

    def recording(self, *args, **kw):
        out = real(self, *args, **kw)
        totals.append(np.array(out.result.total, dtype=np.float64))
        encoders.append(self.last_round.protocol.describe(N)["encoder"])  # the nodes' (their params check it)
        return out

    monkeypatch.setattr(GridAggregator, "run", recording)
    res = run(tmp_path, protocol, privacy, rounds)
    assert [r.included for r in res.rounds] == [tuple(apps.nodes(N))] * rounds and len(totals) == rounds
    ref = PrivacySession(privacy, protocol=protocol, population=N, clients_per_round=N, dimension=apps.dim(),
                         local_steps=1, rng=RandomSource(3).child("flower/privacy"))
    clips, fractions = [], []
    for r, total in enumerate(totals, 1):
        ref.before_round(r, N)
        inputs = sum(ref.client_input(updates(p, r), [6, 4]) for p in range(N))
        bound = ref.mechanism().l2_bound  # the noise's std per coordinate is z times the joint bound
        assert encoders[r - 1]["l2_clip"] == bound and encoders[r - 1]["noise_multiplier"] == privacy.noise_multiplier
        np.testing.assert_allclose(total, inputs, atol=6 * privacy.noise_multiplier * bound + 0.05)
        ref.finish_round(total, N, N, r)
        clips.append(ref.metrics["l2_clip"])
        fractions.append(ref.metrics["unclipped_fraction"])
    assert [r.metrics["l2_clip"] for r in res.rounds] == pytest.approx(clips, rel=1e-12)
    assert [r.metrics["unclipped_fraction"] for r in res.rounds] == pytest.approx(fractions, rel=1e-12, abs=1e-12)
    assert len(set(clips)) == rounds  # the clip moved every round
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["ledger"] == ref.accountant.ledger
    assert res.rounds[-1].epsilon == pytest.approx(ref.epsilon(), rel=1e-12)


def test_a_node_refuses_an_adaptive_distributed_round_whose_clip_is_missing_or_not_positive_finite():
    clip = AdaptiveClipping(initial_clip=1.5, target_quantile=0.5, learning_rate=0.3, count_stddev=1.0)
    privacy, protocol = DistributedDP(noise_multiplier=0.1, clipping=clip), sf.protocols.SecAggPlus()

    def params(round_values):
        desc = _privacy.describe(_privacy.RoundClip(privacy, 0.5, 1.0), protocol, N, apps.dim() + 1)
        desc["round"] = round_values
        return json.dumps({"privacy": desc})

    good = _privacy.for_request(privacy, params({"clip": 0.5, "count_stddev": 1.0}))
    assert (good.clip, good.count_stddev) == (0.5, 1.0)
    for bad in [None, {}, {"clip": 0.0, "count_stddev": 1.0}, {"clip": float("inf"), "count_stddev": 1.0},
                {"clip": float("nan"), "count_stddev": 1.0}, {"clip": -1.0, "count_stddev": 1.0},
                {"clip": 0.5, "count_stddev": 0.0}, {"clip": True, "count_stddev": 1.0},
                {"clip": 0.5, "count_stddev": 0.01}]:  # 2 x 0.01 <= z: no noise left for the update
        with pytest.raises(ProtocolAborted) as err:
            _privacy.for_request(privacy, params(bad))
        assert err.value.reason is AbortReason.REQUEST_REFUSED
    # The training configuration must carry the clip the round's encoder was made for.
    with pytest.raises(ProtocolAborted, match="not the one"):
        _privacy.client_input(good, updates(0, 1), [6, 4], {_privacy.CLIP_KEY: 0.6, _privacy.COUNT_STDDEV_KEY: 1.0})
    x = _privacy.client_input(good, updates(0, 1), [6, 4], {_privacy.CLIP_KEY: 0.5, _privacy.COUNT_STDDEV_KEY: 1.0})
    assert x.size == apps.dim() + 1 and np.linalg.norm(x[:-1]) == pytest.approx(0.5)


@pytest.mark.parametrize("noise", ["central", "distributed"])
@pytest.mark.parametrize("crash_round", [1, 2])
def test_a_resumed_adaptive_run_continues_the_clip_of_an_uninterrupted_one(tmp_path, crash_round, noise):
    protocol, privacy = sf.protocols.SecAggPlus(), adaptive()
    if noise == "distributed":  # each round's encoder at the resumed clip
        privacy = DistributedDP(noise_multiplier=privacy.noise_multiplier, clipping=privacy.clipping)
    ref = run(tmp_path / "ref", protocol, privacy, 3)
    app = apps.client_app(protocol, updates, privacy=privacy)
    grid = CrashingGrid(app, apps.nodes(N), crash_at=(crash_round, "masked_input"))
    with pytest.raises(Crash):
        run(tmp_path, protocol, privacy, 3, grid=grid)
    res = run(tmp_path, protocol, privacy, 3, grid=grid)
    assert [r.metrics["l2_clip"] for r in res.rounds] == [r.metrics["l2_clip"] for r in ref.rounds]
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["privacy"] == _checkpoint.load(tmp_path / "ref" / "ckpt")[0]["privacy"]
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


@pytest.mark.parametrize("bad", [None, 0.0, -1.0, float("nan"), float("inf"), True, "1.0"])
def test_a_node_refuses_a_round_whose_adaptive_clip_is_not_a_positive_finite_number(bad):
    values = {} if bad is None else {_privacy.CLIP_KEY: bad, _privacy.COUNT_STDDEV_KEY: 1.0}
    with pytest.raises(ProtocolAborted, match="positive finite") as err:
        _privacy.client_input(adaptive(), updates(0, 1), [6, 4], values)
    assert err.value.reason is AbortReason.REQUEST_REFUSED
    good = _privacy.client_input(adaptive(), updates(0, 1), [6, 4],
                                 {_privacy.CLIP_KEY: 0.5, _privacy.COUNT_STDDEV_KEY: 1.0})
    assert good.size == apps.dim() + 1 and np.linalg.norm(good[:-1]) == pytest.approx(0.5)


def test_a_node_refuses_a_count_noise_std_other_than_its_configured_one():
    """A red-team finding: the node took any positive count std from the server, so a server could shrink the
    count's noise below the node's configured count_stddev (1.0 here); with none configured the server's
    default (0.05 x the expected participants) is taken."""
    for bad in (0.26, 2.0):
        with pytest.raises(ProtocolAborted, match="configured count_stddev") as err:
            _privacy.client_input(adaptive(), updates(0, 1), [6, 4],
                                  {_privacy.CLIP_KEY: 0.5, _privacy.COUNT_STDDEV_KEY: bad})
        assert err.value.reason is AbortReason.REQUEST_REFUSED
    default = CentralDP(noise_multiplier=0.5, clipping=AdaptiveClipping(initial_clip=1.5))
    x = _privacy.client_input(default, updates(0, 1), [6, 4], {_privacy.CLIP_KEY: 0.5, _privacy.COUNT_STDDEV_KEY: 0.26})
    assert x.size == apps.dim() + 1
    distributed = DistributedDP(noise_multiplier=0.1, clipping=adaptive().clipping)
    params = json.dumps({"privacy": {"round": {"clip": 0.5, "count_stddev": 0.5}}})
    with pytest.raises(ProtocolAborted, match="configured count_stddev"):
        _privacy.for_request(distributed, params)


def test_poisson_sampling_on_flower_includes_each_node_independently_at_rate_q():
    """OS coins, so this is a statistical test: 20 nodes, q = 0.3, 500 rounds. Each bound below is 5.5
    standard deviations of a binomial; the chance any fails for a correct sampler is below 21 x 3.8e-8
    < 1e-6 (two-sided normal tails; the binomial's are lighter at these sizes)."""
    n, q, rounds = 20, 0.3, 500
    strategy = SecureFedAvg(protocol=sf.protocols.Plain(), privacy=CentralDP(noise_multiplier=1.0, clipping=1.0),
                            fraction_train=q, min_train_nodes=1)
    pool = list(range(2000, 2000 + n))
    engine = RoundEngine(strategy.protocol, _privacy.session(strategy.privacy, strategy.protocol, population=n,
                                                             fraction=q, dimension=4, rng=RandomSource(),
                                                             ledger=[], clip=None),
                         weighting="uniform", optimizer=sf.optim.FedAvg())
    picks = [strategy._sample(engine, pool, r) for r in range(1, rounds + 1)]
    counts = {v: sum(v in p for p in picks) for v in pool}
    per_node = 5.5 * math.sqrt(rounds * q * (1 - q))
    assert all(abs(c - rounds * q) < per_node for c in counts.values()), counts
    total = sum(counts.values())
    assert abs(total - n * rounds * q) < 5.5 * math.sqrt(n * rounds * q * (1 - q))
    sizes = np.array([len(p) for p in picks])
    assert sizes.var() > 1.0  # not a fixed-size sample (binomial variance n q (1 - q) = 4.2)
    assert all(p == sorted(p) and set(p) <= set(pool) for p in picks)


def test_flower_with_client_sampling_spends_the_trainers_epsilon(tmp_path):
    """q = 3/5, z, rounds the same: the trainer (clients_per_round=3 of 5) and the strategy (fraction_train=0.6)
    record the same events and the same epsilon; a too-small Poisson sample skips its round on both."""
    import torch

    privacy, rounds = CentralDP(noise_multiplier=1.0, clipping=CLIP), 4
    res = run(tmp_path, sf.protocols.Plain(), privacy, rounds, fraction_train=0.6, min_train_nodes=1,
              min_available_nodes=N)
    data = [torch.utils.data.TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(N)]
    trainer = sf.Trainer(torch.nn.Linear(3, 2), data, privacy=privacy, clients_per_round=3, progress=False)
    history = trainer.fit(rounds)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    ran = [r for r in res.rounds if r.included]
    rates = {e["sampling_rate"] for e in state["ledger"]} | {e["sampling_rate"] for e in trainer.accountant.ledger}
    assert rates == {0.6}
    assert len(state["ledger"]) == len(ran) and all(r.metrics.get("skipped") for r in res.rounds if not r.included)
    trained = [r for r in history.rounds if r.included]
    same = min(len(ran), len(trained))
    assert same >= 1
    flower_eps = Accountant.from_ledger(state["ledger"][:same]).epsilon(privacy.delta)
    trainer_eps = Accountant.from_ledger(trainer.accountant.ledger[:same]).epsilon(privacy.delta)
    assert flower_eps == pytest.approx(trainer_eps, rel=1e-12)
    if len(ran) == len(trained):
        assert res.rounds[-1].epsilon == pytest.approx(history.final.epsilon, rel=1e-12)


def test_a_poisson_sample_too_small_skips_its_round_releasing_and_spending_nothing(tmp_path):
    privacy = CentralDP(noise_multiplier=1.0, clipping=CLIP)
    res = run(tmp_path, sf.protocols.Plain(), privacy, 6, fraction_train=0.2)  # q = 1/5; min_train_nodes 2
    skipped = [r for r in res.rounds if r.metrics.get("skipped")]
    ran = [r for r in res.rounds if r.included]
    assert skipped and ran and len(skipped) + len(ran) == 6  # this seed's coins give both kinds
    assert all(len(r.participants) < 2 and r.aborted == "too_few_survivors" for r in skipped)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert [e["round"] for e in state["ledger"]] == [r.round for r in ran]
    epsilons = [0.0] + [r.epsilon for r in res.rounds]
    assert all(epsilons[r.round] == epsilons[r.round - 1] for r in skipped)
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)
    assert audit.ok, audit.summary()


def test_adaptive_distributed_dp_on_flower_refuses_a_fixed_granularity():
    """A second red-team finding: nothing binds a round's params across nodes, so an active server could send
    the other nodes a smaller clip; with a fixed granularity their noise shares shrink with it (effective
    multiplier 0.785 against 1.581 accounted in its simulation). With granularity=None the rounding step
    follows each node's clip and the shares stay the same in integer units."""
    clip = AdaptiveClipping(initial_clip=1.5, target_quantile=0.5, learning_rate=0.3, count_stddev=1.0)
    fixed = DistributedDP(noise_multiplier=1.0, clipping=clip, granularity=1e-3)
    with pytest.raises(ConfigurationError, match="granularity=None"):
        _privacy.check(fixed)
    with pytest.raises(ConfigurationError, match="granularity=None"):
        SecureFedAvg(protocol=sf.protocols.SecAggPlus(), privacy=fixed)
    with pytest.raises(ConfigurationError, match="granularity=None"):
        SecureClient(protocol=sf.protocols.SecAggPlus(), privacy=fixed)
    _privacy.check(DistributedDP(noise_multiplier=1.0, clipping=clip))  # the default: accepted
    _privacy.check(DistributedDP(noise_multiplier=1.0, clipping=1.0, granularity=1e-3))  # a fixed clip: accepted
