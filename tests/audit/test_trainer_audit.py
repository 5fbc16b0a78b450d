"""The trainer and the demo write logs that verify; any edit of the demo's log fails naming the entry."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import securefed as sf
from securefed.audit import verify
from securefed.audit.keys import key_paths
from securefed.audit.verifier import verify_data
from securefed.demo import run_demo
from securefed.errors import ProtocolAborted
from tests.audit.helpers import lines_of
from tests.audit.test_verifier import edit, first_entry


def federation(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(20, 5, generator=g)
        out.append(TensorDataset(x, (x.sum(dim=1) > 0).long()))
    return out


def trainer(path, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    return sf.Trainer(model, federation(), progress=False, seed=1, audit_log=path, **kw)


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.jsonl"
    run_demo(rounds=2, progress=False, audit_log=path)
    return path


def test_a_demo_run_with_audit_log_verifies(demo_log):
    res = verify(demo_log, key_paths(demo_log)[1])
    assert res.ok, res.summary()
    assert res.complete and res.rounds == 2
    entries = lines_of(demo_log.read_bytes())
    assert [e["type"] for e in entries] == ["run_start", "round", "round", "run_end"]
    assert entries[1]["body"]["participants"] == list(range(10))
    assert entries[1]["body"]["metrics"]["eval_accuracy"] > 0


@given(st.data())
def test_any_edit_of_the_demo_log_fails_naming_the_entry(demo_log, data):
    changed, entry = edit(demo_log.read_bytes(), data.draw)
    assert first_entry(verify_data(changed, key_paths(demo_log)[1])) == entry


def test_a_new_trainer_resumes_the_log_and_its_round_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    t = trainer(path)
    t.fit(rounds=2)
    t.audit.close()
    t2 = trainer(path)
    history = t2.fit(rounds=1)
    t2.audit.close()
    assert [r.round for r in history.rounds] == [3]
    res = verify(path, key_paths(path)[1])
    assert res.ok and res.rounds == 3, res.summary()
    entries = lines_of(path.read_bytes())
    assert [e["type"] for e in entries] == ["run_start", "round", "round", "run_end", "resume", "round", "run_end"]
    assert [e["body"]["round"] for e in entries if e["type"] == "round"] == [1, 2, 3]
    assert entries[0]["body"]["config"]["participants"] == 4


def test_an_aborted_round_is_recorded_and_the_session_ends_failed(tmp_path):
    path = tmp_path / "abort.jsonl"
    t = trainer(path, dropouts=lambda r, parts: dict.fromkeys(parts, "upload") if r == 2 else {})
    with pytest.raises(ProtocolAborted):
        t.fit(rounds=3)
    t.audit.close()
    entries = lines_of(path.read_bytes())
    assert [e["type"] for e in entries] == ["run_start", "round", "round_aborted", "run_end"]
    assert entries[2]["body"]["reason"] == "no_inputs"
    assert entries[3]["body"]["status"] == "failed" and "ProtocolAborted" in entries[3]["body"]["detail"]
    res = verify(path)
    assert res.ok and res.aborted == 1, res.summary()


def test_run_round_outside_fit_opens_a_session(tmp_path):
    path = tmp_path / "rr.jsonl"
    t = trainer(path)
    t.run_round()
    assert t.audit.in_session
    assert verify(path, allow_incomplete=True).ok
    t.audit.end()
    t.audit.close()
    assert verify(path).ok
    assert np.isfinite(t.history.final.loss)


def test_a_dp_trainer_logs_its_events_and_a_resumed_one_continues_the_spend(tmp_path):
    path = tmp_path / "dp.jsonl"
    privacy = sf.privacy.CentralDP(noise_multiplier=1.0, clipping=1.0)
    t = trainer(path, privacy=privacy, clients_per_round=2)
    # The Poisson coins are secret (OS randomness): an empty sample is skipped and not logged, so each
    # trainer goes on until it has released a round.
    first = t.fit(rounds=2)
    while not any(r.included for r in first.rounds):
        first = t.fit(rounds=1)
    t.audit.close()
    t2 = trainer(path, privacy=privacy, clients_per_round=2)
    second = t2.fit(rounds=1)
    while not any(r.included for r in second.rounds):
        second = t2.fit(rounds=1)
    t2.audit.close()
    res = verify(path, key_paths(path)[1])
    assert res.ok, res.summary()
    assert res.privacy == {"accountant": "rdp", "delta": 1e-5}
    entries = lines_of(path.read_bytes())
    claims = [e["body"]["dp"]["epsilon"] for e in entries if e["type"] in ("round", "round_aborted")]
    assert claims == [r.epsilon for r in first.rounds + second.rounds if r.included]
    released_first = sum(1 for r in first.rounds if r.included)
    assert claims[0] > 0 and all(b > a for a, b in zip(claims, claims[1:]))
    assert claims[released_first] > claims[released_first - 1]  # the resumed trainer spends on top of the ledger
    assert res.epsilon == pytest.approx(claims[-1], rel=1e-9) and len(res.ledger) == len(claims)
    assert res.ledger == tuple(t2.accountant.ledger)


def test_under_central_dp_the_log_hashes_the_noised_sum_never_the_raw_one(tmp_path, monkeypatch):
    """The raw sum's digest would let a reader of the log confirm a guess of the inputs (red team, issue 20)."""
    import hashlib

    path = tmp_path / "central.jsonl"
    t = trainer(path, privacy=sf.privacy.CentralDP(noise_multiplier=1.0, clipping=1.0), clients_per_round=4)
    raw = []
    real = t._aggregate

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        raw.append(np.ascontiguousarray(res.total, dtype="<f8").copy())
        return res

    monkeypatch.setattr(t, "_aggregate", spy)
    history = t.fit(rounds=3)
    t.audit.close()
    digests = [e["body"]["aggregate"]["sha256"] for e in lines_of(path.read_bytes()) if e["type"] == "round"]
    assert len(digests) == sum(1 for r in history.rounds if r.included) == len(raw) > 0
    for digest, total in zip(digests, raw):
        assert digest != hashlib.sha256(total.data).hexdigest()
    last = np.ascontiguousarray(t.privacy_session.released, dtype="<f8")
    assert digests[-1] == hashlib.sha256(last.data).hexdigest()
    assert verify(path, key_paths(path)[1]).ok
