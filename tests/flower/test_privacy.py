"""Differential privacy on Flower: clipping on the nodes, noise, the accountant's ledger, the budget, and resume."""

import json

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.errors import PrivacyBudgetExceeded
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.testing import InProcessGrid
from securefed.privacy import Accountant, CentralDP, DistributedDP, event_from_dict
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
    audit = verify(tmp_path / "audit.jsonl")
    assert audit.ok, audit.summary()
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


def test_the_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    """Before round k the server checks the worst case: only t = min_survivors(n) of its n nodes included."""
    from securefed.flower import _privacy

    protocol = sf.protocols.SecAggPlus()
    free = run(tmp_path / "free", protocol, ddg(), 2)
    ledger = _checkpoint.load(tmp_path / "free" / "ckpt")[0]["ledger"]
    noise = _privacy.noise(ddg(), protocol, apps.dim())
    t = noise.survivors(N)
    planned = [Accountant.from_ledger(ledger[: k - 1]).epsilon_after(noise.event(included=t, n=N, round=k), 1e-5)
               for k in (1, 2, 3)]
    assert planned[0] < planned[1] < planned[2]
    assert free.rounds[1].epsilon < planned[2]
    target = (planned[1] + planned[2]) / 2
    with pytest.raises(PrivacyBudgetExceeded, match="round 3"):
        run(tmp_path / "capped", protocol, ddg(target_epsilon=target), 5)
    state, _, _ = _checkpoint.load(tmp_path / "capped" / "ckpt")
    assert state["round"] == 2 and len(state["ledger"]) == 2


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
    audit = verify(tmp_path / "audit.jsonl")
    assert audit.ok, audit.summary()
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
    assert [e["round"] for e in json.loads((tmp_path / "ckpt" / "released.json").read_text())] == [2]
    res = run(tmp_path, protocol, privacy, 3)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert [e["round"] for e in state["ledger"]] == [1, 2, 2, 3]
    assert not (tmp_path / "ckpt" / "released.json").exists()
    assert res.rounds[-1].epsilon == pytest.approx(Accountant.from_ledger(state["ledger"]).epsilon(privacy.delta))
    audit = verify(tmp_path / "audit.jsonl")
    assert audit.ok, audit.summary()
    assert [e["round"] for e in audit.ledger] == [1, 2, 2, 3]
