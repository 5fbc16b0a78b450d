"""Trust boundaries of the Flower server's files: whoever can write the checkpoint folder or the audit log, but
does not hold the server's key, can neither reset the privacy ledger, nor get a false history signed, nor roll the
run back unseen by an auditor who pinned the log's head (protocols/flower.md, section 8; proofs/flower.md, F13).

Each test plays one of the attacks of the deployment-trust issue against real files of a real run.
"""

import json
import shutil

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.audit.keys import load_or_create_key
from securefed.errors import ConfigurationError, PrivacyBudgetExceeded
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.testing import InProcessGrid
from securefed.privacy import Accountant, CentralDP, event_from_dict
from tests.flower import apps

N, CLIP, Z = 4, 0.5, 1.0


def updates(p, rnd):
    return np.full(apps.dim(), 0.3 * (p + 1))


@pytest.fixture(scope="module")
def eps(tmp_path_factory):
    """Epsilon after 1, 2, 3 rounds of this run's central Gaussian events (from one reference round's event)."""
    path = tmp_path_factory.mktemp("reference")
    SecureFedAvg(protocol=sf.protocols.Plain(), privacy=CentralDP(noise_multiplier=Z, clipping=CLIP), seed=3,
                 phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                 checkpoint_dir=path / "ckpt").start(grid(None), apps.model(), num_rounds=1)
    (event,) = _checkpoint.load(path / "ckpt")[0]["ledger"]
    acc, out = Accountant("rdp"), []
    for _ in range(3):
        acc.record(event_from_dict(event))
        out.append(acc.epsilon(CentralDP(noise_multiplier=Z).delta))
    return out


@pytest.fixture(autouse=True)
def budget(eps, monkeypatch):
    """A budget that admits two rounds and refuses the third."""
    monkeypatch.setitem(BUDGET, "target", (eps[1] + eps[2]) / 2)


BUDGET: dict = {}


def privacy(target=True):
    return CentralDP(noise_multiplier=Z, clipping=CLIP, target_epsilon=BUDGET["target"] if target else None)


def strategy(tmp_path, *, audit=True, **kw):
    return SecureFedAvg(protocol=sf.protocols.Plain(), privacy=privacy(), seed=3, phase_timeout=0.05,
                        train_timeout=0.05, poll_interval=0.01, checkpoint_dir=tmp_path / "ckpt",
                        audit_log=tmp_path / "audit.jsonl" if audit else None, **kw)


def grid(config="budget"):
    node = privacy(target=config is not None)
    return InProcessGrid(apps.client_app(sf.protocols.Plain(), updates, privacy=node), apps.nodes(N))


def train(tmp_path, rounds, **kw):
    return strategy(tmp_path, **kw).start(grid(), apps.model(), num_rounds=rounds)


def state_file(tmp_path):
    return tmp_path / "ckpt" / "state.json"


def edit_state(tmp_path, change):
    """Change the body of state.json in place, keeping its (now wrong) signature: what an attacker can do."""
    doc = json.loads(state_file(tmp_path).read_text())
    change(doc["body"])
    state_file(tmp_path).write_text(json.dumps(doc))


def resign(tmp_path, change, key):
    """Change the checkpoint and sign it with `key`: a server bug, or an attacker holding that key."""
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    change(state)
    _checkpoint.touch(tmp_path / "ckpt", state, key=key, counter=state["counter"])


def server_key(tmp_path):
    return load_or_create_key(tmp_path / "audit.jsonl", None)


def cut_log(path, lines):
    """Drop the last `lines` lines of the log, at a line boundary (no torn line left to notice)."""
    kept = path.read_bytes().splitlines(keepends=True)[:-lines]
    path.write_bytes(b"".join(kept))


# -- attack 1: a checkpoint silently resets the privacy ledger --------------------------------------------


@pytest.mark.parametrize("audit", [True, False], ids=["with audit log", "without audit log"])
def test_a_reset_ledger_is_refused_and_the_budget_still_stops_round_three(tmp_path, audit, eps):
    res = train(tmp_path, 2, audit=audit)
    assert res.rounds[-1].epsilon == pytest.approx(eps[1])
    with pytest.raises(PrivacyBudgetExceeded):
        train(tmp_path, 3, audit=audit)
    edit_state(tmp_path, lambda body: body.update(ledger=[]))
    with pytest.raises(ConfigurationError, match="not signed by this server's checkpoint key"):
        train(tmp_path, 4, audit=audit)
    # Signed by a key of the attacker's own: refused the same way.
    resign(tmp_path, lambda s: s.update(ledger=[]), sf_key := load_or_create_key(tmp_path / "other.log", None))
    assert sf_key is not None
    with pytest.raises(ConfigurationError, match="not signed by this server's checkpoint key"):
        train(tmp_path, 4, audit=audit)


def test_a_reset_ledger_signed_with_the_server_key_still_spends_from_the_audit_log(tmp_path, eps):
    """Even a checkpoint re-signed by the key holder cannot hide spend: with an audit log, every release is
    logged before its commit and the resumed accountant is the log's; a ledger not a prefix of it is refused."""
    train(tmp_path, 2)
    resign(tmp_path, lambda s: s.update(ledger=[]), server_key(tmp_path))
    with pytest.raises(PrivacyBudgetExceeded, match="spent so far: 7.077 in 2 rounds"):
        train(tmp_path, 4)
    resign(tmp_path, lambda s: s.update(ledger=s["ledger"][::-1] + s["ledger"][:1]), server_key(tmp_path))
    with pytest.raises(ConfigurationError, match="not a prefix"):
        train(tmp_path, 4)


# -- attack 2: the audit log is made to certify a false history -------------------------------------------


def test_a_forged_round_record_after_a_cut_log_is_refused_and_nothing_is_signed(tmp_path, eps):
    train(tmp_path, 2)
    log = tmp_path / "audit.jsonl"
    cut_log(log, 2)  # round 2 and run_end
    before = log.read_bytes()

    def forge(body):
        body["ledger"] = body["ledger"][:1]
        body["audit"]["metrics"]["eval_forged"] = 42.0
        body["audit"]["dp_events"], body["audit"]["epsilon"] = [], eps[0]

    edit_state(tmp_path, forge)
    with pytest.raises(ConfigurationError, match="not signed"):
        train(tmp_path, 3)
    assert log.read_bytes() == before  # refused before the log was touched: no resume, no forged round
    # Even re-signed by the key holder, the entry written for round 2 takes its DP events and epsilon from the
    # log's own release entries, not from the record: the budget stops round 3 at the true spend.
    resign(tmp_path, forge, server_key(tmp_path))
    with pytest.raises(PrivacyBudgetExceeded):
        train(tmp_path, 3)
    res = verify(log, allow_seeded=True)
    assert res.ok and res.rounds == 2 and res.epsilon == pytest.approx(eps[1]), res.summary()


def test_a_log_cut_below_the_head_the_checkpoint_recorded_is_refused(tmp_path):
    train(tmp_path, 2)
    log = tmp_path / "audit.jsonl"
    cut_log(log, 4)  # round 2, run_end, and round 1's two lines: below the checkpoint's head
    with pytest.raises(ConfigurationError, match="shorter than, or differs from"):
        train(tmp_path, 3)


def test_the_missing_round_is_written_from_the_servers_own_ledger(tmp_path, eps):
    """A crash between checkpoint and audit entry (simulated by the cut): the entry written on resume carries the
    ledger's events and the epsilon the server computes from it, and verifies."""
    train(tmp_path, 2)
    log = tmp_path / "audit.jsonl"
    cut_log(log, 2)
    with pytest.raises(PrivacyBudgetExceeded):
        train(tmp_path, 3)
    res = verify(log, allow_seeded=True, allow_incomplete=True)
    assert res.ok, res.summary()
    assert res.rounds == 2 and res.epsilon == pytest.approx(eps[1])
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert list(res.ledger) == state["ledger"]


# -- attack 3: rollback --------------------------------------------------------------------------------------


def snapshot(tmp_path, name):
    dest = tmp_path / name
    dest.mkdir()
    shutil.copytree(tmp_path / "ckpt", dest / "ckpt")
    shutil.copy(tmp_path / "audit.jsonl", dest / "audit.jsonl")


def restore(tmp_path, name, *, log=True):
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / name / "ckpt", tmp_path / "ckpt")
    if log:
        shutil.copy(tmp_path / name / "audit.jsonl", tmp_path / "audit.jsonl")


def test_an_older_checkpoint_with_the_current_log_is_refused(tmp_path):
    train(tmp_path, 1)
    snapshot(tmp_path, "after-1")
    train(tmp_path, 2)
    restore(tmp_path, "after-1", log=False)
    with pytest.raises(ConfigurationError, match="rolled back"):
        train(tmp_path, 2)


def test_a_rollback_of_checkpoint_and_log_together_fails_verify_against_a_pinned_head(tmp_path):
    train(tmp_path, 1)
    snapshot(tmp_path, "after-1")
    train(tmp_path, 2)
    log = tmp_path / "audit.jsonl"
    witnessed = verify(log, allow_seeded=True)
    assert witnessed.ok
    pin = (witnessed.entries, witnessed.head)  # what an auditor records: seq:sha256 of the last entry
    restore(tmp_path, "after-1")  # both files as they were after round 1: a consistent older state
    res = train(tmp_path, 2)  # round 2 is released again, against the old ledger
    assert [r.round for r in res.rounds] == [1, 2]
    assert verify(log, allow_seeded=True).ok  # nothing inside the files can tell
    pinned = verify(log, allow_seeded=True, pinned=[pin])
    assert not pinned.ok, "the pinned head must expose the rollback"
    # Every resume entry names the checkpoint it resumed from, with a counter that only grows.
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    resumes = [e["body"]["checkpoint"] for e in entries if e["type"] == "resume"]
    assert [c["round"] for c in resumes] == [1] and resumes[0]["counter"] >= 2


def test_every_commit_and_resume_grows_the_counter(tmp_path):
    train(tmp_path, 1)
    first = _checkpoint.load(tmp_path / "ckpt")[0]["counter"]
    train(tmp_path, 2)
    second = _checkpoint.load(tmp_path / "ckpt")[0]["counter"]
    assert second == first + 2  # the resume, then round 2's commit
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (resume,) = [e for e in entries if e["type"] == "resume"]
    assert resume["body"]["checkpoint"]["counter"] == first + 1
    head = resume["body"]["checkpoint"]["head"]
    # The log's head when round 1 was committed: its release entry (written before the commit).
    assert entries[head["seq"] - 1]["type"] == "release" and entries[head["seq"] - 1]["body"]["round"] == 1


# -- attack 4: checkpoint values are trusted ------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    pytest.param(lambda s: s.update(model="/etc/passwd"), id="absolute model path"),
    pytest.param(lambda s: s.update(model="../model-000001.npz"), id="relative model path"),
    pytest.param(lambda s: s.update(round="1"), id="round as a string"),
    pytest.param(lambda s: s.update(ledger={}), id="ledger as an object"),
    pytest.param(lambda s: s.update(names=[1, 2]), id="names as numbers"),
    pytest.param(lambda s: s.update(cooldown={"x": 1}), id="cooldown key not a node id"),
    pytest.param(lambda s: s.update(history=[{"round": 1}]), id="history entry missing fields"),
    pytest.param(lambda s: s.update(audit_head={"seq": "1"}), id="audit head malformed"),
    pytest.param(lambda s: s.update(counter=True), id="counter as a bool"),
])
def test_a_malformed_checkpoint_is_a_configuration_error_even_when_signed(tmp_path, change):
    train(tmp_path, 1, audit=False)
    resign(tmp_path, change, _checkpoint.load_key(tmp_path / "ckpt", None))
    with pytest.raises(ConfigurationError, match="malformed|version|model"):
        train(tmp_path, 2, audit=False)


def test_a_replaced_model_file_or_released_record_is_refused(tmp_path):
    train(tmp_path, 1, audit=False)
    model = next((tmp_path / "ckpt").glob("model-*.npz"))
    saved = model.read_bytes()
    with np.load(model) as npz:
        arrays = {k: npz[k] + 1 for k in npz.files}
    np.savez(model, **arrays)
    with pytest.raises(ConfigurationError, match="not the model file the checkpoint committed"):
        train(tmp_path, 2, audit=False)
    model.write_bytes(saved)
    (tmp_path / "ckpt" / "released.json").write_text(json.dumps({"body": {"round": 1, "events": []},
                                                                 "key": "00" * 32, "sig": "00" * 64}))
    with pytest.raises(ConfigurationError, match="not signed"):
        train(tmp_path, 2, audit=False)


def test_a_checkpoint_without_its_key_is_refused(tmp_path):
    train(tmp_path, 1, audit=False)
    (tmp_path / "ckpt.key").unlink()
    with pytest.raises(ConfigurationError, match="key"):
        train(tmp_path, 2, audit=False)
