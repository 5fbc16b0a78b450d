"""Differential privacy on Flower: clipping on the nodes, noise, the accountant's ledger, the budget, and resume."""

import json
import math

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.crypto.random import RandomSource
from securefed.errors import PrivacyBudgetExceeded
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.testing import InProcessGrid
from securefed.privacy import (
    Accountant,
    CentralDP,
    DistributedDP,
    PrivacySession,
    event_from_dict,
)
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
