"""An independent red team's attacks on the server's files (issue 20), each now a regression test of the claim it
broke (protocols/flower.md section 8, "Trust boundaries"; proofs/flower.md Lemma F13). All nine failed on 126af49:
deleting or replaying released.json after a crash, an older checkpoint alone in the commit-to-entry window, a
missing model file, a crash between commit and unlink, a release pending at a resume that runs no round, a
checkpoint made without a log, the un-noised central-DP sum on disk, a malformed record signed by the key holder."""
import hashlib
import json
import shutil

import numpy as np
import pytest

from securefed.audit import verify
from securefed.errors import ConfigurationError, PrivacyBudgetExceeded
from securefed.flower import _checkpoint, _resume
from tests.flower import apps
from tests.flower.test_checkpoint_trust import (
    BUDGET,
    CLIP,
    N,
    eps,  # noqa: F401 - the module-scoped fixture
    resign,
    server_key,
    train,
)

pytestmark = pytest.mark.filterwarnings("ignore::securefed.errors.SeededSecretsWarning")


@pytest.fixture(autouse=True)
def budget(eps, monkeypatch):  # noqa: F811 - the fixture imported above
    monkeypatch.setitem(BUDGET, "target", (eps[1] + eps[2]) / 2)


class Crash(Exception):
    pass


def crash_save(monkeypatch, at):
    real = _checkpoint.save

    def dying(directory, *, round_index, **kw):
        if round_index == at:
            raise Crash
        return real(directory, round_index=round_index, **kw)
    monkeypatch.setattr(_checkpoint, "save", dying)
    return real


def released(tmp_path):
    return json.loads((tmp_path / "ckpt" / "released.json").read_text())["body"]["events"]


def spent_events(tmp_path):
    return len(verify(tmp_path / "audit.jsonl", allow_seeded=True, allow_incomplete=True).ledger)


def test_deleting_released_json_after_a_crash_after_release_is_not_forgotten(tmp_path, monkeypatch):
    train(tmp_path, 1)
    real = crash_save(monkeypatch, 2)
    with pytest.raises(Crash):
        train(tmp_path, 3)
    monkeypatch.setattr(_checkpoint, "save", real)
    (tmp_path / "ckpt" / "released.json").unlink(missing_ok=True)  # the attack (with a log it was never written)
    with pytest.raises(PrivacyBudgetExceeded):
        train(tmp_path, 3)
    assert spent_events(tmp_path) == 2  # rounds 1 and 2 were released; the log holds both (release entries)


def test_repeated_crashes_after_release_are_all_counted(tmp_path, monkeypatch):
    monkeypatch.setitem(BUDGET, "target", 1e6)
    train(tmp_path, 1)
    real = crash_save(monkeypatch, 2)
    for _ in range(2):
        with pytest.raises(Crash):
            train(tmp_path, 2)
    monkeypatch.setattr(_checkpoint, "save", real)
    assert not (tmp_path / "ckpt" / "released.json").exists()  # nothing for an attacker to replay or delete
    train(tmp_path, 2)
    assert spent_events(tmp_path) == 4  # rounds 1, 2, 2, 2: every aggregate the server decoded


def test_an_older_checkpoint_alone_is_refused_when_the_log_lacks_the_committed_round(tmp_path, monkeypatch):
    train(tmp_path, 1)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "copy")
    real = _resume.write_round

    def dying(audit, rec, *a, **kw):
        if rec["round"] == 2:
            raise Crash
        return real(audit, rec, *a, **kw)
    monkeypatch.setattr(_resume, "write_round", dying)
    with pytest.raises(Crash):
        train(tmp_path, 3)
    monkeypatch.setattr(_resume, "write_round", real)
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "copy", tmp_path / "ckpt")   # the checkpoint alone goes back to round 1
    for _ in range(3):                                      # the attacker restarts the server a few times
        with pytest.raises((ConfigurationError, PrivacyBudgetExceeded)):
            train(tmp_path, 3)
        if spent_events(tmp_path) > 1:
            break
    # Round 2's release is in the log ahead of its commit: the rerun is refused by the budget, and the spend
    # counted is the true one (rounds 1 and 2), whatever checkpoint the attacker restored.
    assert spent_events(tmp_path) == 2


def test_a_missing_model_file_is_a_configuration_error(tmp_path):
    train(tmp_path, 1, audit=False)
    next((tmp_path / "ckpt").glob("model-*.npz")).unlink()
    with pytest.raises(ConfigurationError):
        train(tmp_path, 2, audit=False)


def test_a_crash_after_the_commit_before_released_json_is_removed_resumes(tmp_path, monkeypatch):
    import pathlib
    train(tmp_path, 1, audit=False)
    real = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "released.json":
            raise Crash
        return real(self, missing_ok=missing_ok)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    with pytest.raises(Crash):
        train(tmp_path, 2, audit=False)
    monkeypatch.setattr(pathlib.Path, "unlink", real)
    res = train(tmp_path, 2, audit=False)  # the stale record's events are in the committed ledger
    assert [r.round for r in res.rounds] == [1, 2]
    assert len(_checkpoint.load(tmp_path / "ckpt")[0]["ledger"]) == 2


def test_a_release_pending_at_a_resume_that_runs_no_round_is_still_logged(tmp_path, monkeypatch):
    train(tmp_path, 1)
    real = crash_save(monkeypatch, 2)
    with pytest.raises(Crash):
        train(tmp_path, 2)
    monkeypatch.setattr(_checkpoint, "save", real)
    train(tmp_path, 1)                                      # the operator stops at the committed round
    assert spent_events(tmp_path) == 2


def test_a_checkpoint_made_without_a_log_resumes_with_a_new_log_or_is_a_configuration_error(tmp_path):
    train(tmp_path, 1, audit=False)
    with pytest.raises(ConfigurationError, match="without an audit log"):
        train(tmp_path, 2, checkpoint_key=tmp_path / "ckpt.key")


def test_central_dp_does_not_persist_the_unnoised_sum(tmp_path):
    res = train(tmp_path, 1)
    st = _checkpoint.load(tmp_path / "ckpt")[0]
    with np.load(next((tmp_path / "ckpt").glob("model-*.npz"))) as npz:
        arrays = [npz[k] for k in npz.files]
    clipped_sum = N * (CLIP / np.sqrt(apps.dim())) * np.ones(apps.dim())
    assert not any(a.shape == clipped_sum.shape and np.allclose(a, clipped_sum) for a in arrays)
    entries = map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())
    entry = next(e for e in entries if e["type"] == "round")
    assert entry["body"]["aggregate"]["sha256"] != hashlib.sha256(clipped_sum.astype("<f8").data).hexdigest()
    assert st["aggregate"] and res.rounds[0].epsilon is not None  # an aggregate was kept: the noised one


def test_a_signed_malformed_audit_record_is_a_configuration_error(tmp_path):
    train(tmp_path, 2)
    resign(tmp_path, lambda s: s.update(audit={"round": 2}), server_key(tmp_path))
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-2]))
    with pytest.raises(ConfigurationError):
        train(tmp_path, 3)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_model_or_state_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    import os

    train(tmp_path, 1, audit=False)
    for name in ("state.json", next((tmp_path / "ckpt").glob("model-*.npz")).name):
        target = tmp_path / "ckpt" / name
        saved = target.read_bytes()
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)  # opening it for reading would block a plain open() forever
        elif kind == "symlink":
            (tmp_path / "elsewhere").write_bytes(saved)  # identical bytes outside the folder: still refused
            target.symlink_to(tmp_path / "elsewhere")
        else:
            target.mkdir()
        with pytest.raises(ConfigurationError, match="regular file|cannot open"):
            train(tmp_path, 2, audit=False)
        target.rmdir() if kind == "directory" else target.unlink()
        target.write_bytes(saved)


def test_an_older_checkpoint_is_refused_once_the_log_has_seen_a_later_counter(tmp_path):
    train(tmp_path, 1)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "copy")
    train(tmp_path, 2)  # a resume entry names counter 2, round 2's commit makes 3
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "copy", tmp_path / "ckpt")
    with pytest.raises(ConfigurationError, match="rolled back"):
        train(tmp_path, 3)


def test_a_planted_link_at_the_public_key_path_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "ckpt.pub").symlink_to(victim)
    train(tmp_path, 1, audit=False)
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "ckpt.pub").is_symlink()


# -- the second red team ---------------------------------------------------------------------------------------


def test_a_log_tail_cut_after_a_crashed_release_fails_verify_against_the_witnessed_head(tmp_path, monkeypatch):
    """Kill the server after round 2's release entry, cut the log back to round 1 (the live checkpoint matches):
    no file can show it, but the head handed to the witness after the release is gone from the log."""
    log, witnessed = tmp_path / "audit.jsonl", []
    train(tmp_path, 1, audit_witness=lambda seq, sha: witnessed.append((seq, sha)))
    kept = len(log.read_bytes().splitlines())
    real = crash_save(monkeypatch, 2)
    with pytest.raises(Crash):
        train(tmp_path, 3, audit_witness=lambda seq, sha: witnessed.append((seq, sha)))
    monkeypatch.setattr(_checkpoint, "save", real)
    assert [e["type"] for e in map(json.loads, log.read_text().splitlines())][kept + 1] == "release"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:kept]))  # the cut
    with pytest.raises(PrivacyBudgetExceeded):
        train(tmp_path, 3)
    assert verify(log, allow_seeded=True).ok  # nothing inside the files can tell
    assert not verify(log, allow_seeded=True, pinned=[witnessed[-1]]).ok  # the witness can


def test_a_checkpoint_made_with_a_log_is_not_resumed_without_it(tmp_path):
    train(tmp_path, 1)
    with pytest.raises(ConfigurationError, match="same audit_log"):
        train(tmp_path, 2, audit=False, checkpoint_key=tmp_path / "audit.jsonl.key")


def test_a_signed_ledger_that_cannot_be_accounted_is_a_configuration_error(tmp_path):
    train(tmp_path, 1, audit=False)
    resign(tmp_path, lambda s: s.update(ledger=[{"foo": 1}]), _checkpoint.load_key(tmp_path / "ckpt", None))
    with pytest.raises(ConfigurationError, match="cannot be accounted"):
        train(tmp_path, 2, audit=False)


def test_a_huge_state_file_is_refused_before_parsing(tmp_path, monkeypatch):
    train(tmp_path, 1, audit=False)
    monkeypatch.setattr(_checkpoint, "MAX_JSON_BYTES", 1 << 16)
    (tmp_path / "ckpt" / "state.json").write_text("[" + "{}," * 40000 + "{}]")
    with pytest.raises(ConfigurationError, match="larger than"):
        train(tmp_path, 2, audit=False)


def test_an_audit_log_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    train(tmp_path, 1)
    target = tmp_path / "precious.txt"
    target.write_bytes(b"no newline at the end")  # the writer would cut it as a torn line, through the link
    (tmp_path / "audit.jsonl").unlink()
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(ConfigurationError, match="link"):
        train(tmp_path, 2)
    assert target.read_bytes() == b"no newline at the end"


# -- the third red team --------------------------------------------------------------------------------------


def _run(tmp_path, rounds, *, checkpoint=True):
    from tests.flower.test_checkpoint_trust import grid, strategy

    s = strategy(tmp_path)
    if not checkpoint:
        s.checkpoint_dir = None
    return s.start(grid(), apps.model(), num_rounds=rounds)


@pytest.mark.parametrize("how", ["crash before the first commit", "checkpoint folder deleted", "no checkpoint"])
def test_releases_logged_before_any_round_entry_are_spent(tmp_path, monkeypatch, how):
    """Round 1 released (its release entry is in the log) but no round entry yet: a restart must start from the
    log's ledger, not from zero, or the budget is overrun."""
    from securefed.audit import AuditWriter

    if how == "crash before the first commit":
        target, name = _checkpoint, "save"
    elif how == "checkpoint folder deleted":
        target, name = _resume, "write_round"
    else:
        target, name = AuditWriter, "release"
    real = getattr(target, name)

    def dying(*a, **k):
        if how == "no checkpoint":
            real(*a, **k)  # the release entry is written, then the server dies
        raise Crash

    monkeypatch.setattr(target, name, dying)
    with pytest.raises(Crash):
        _run(tmp_path, 3, checkpoint=how != "no checkpoint")
    monkeypatch.setattr(target, name, real)
    if how == "checkpoint folder deleted":
        shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(PrivacyBudgetExceeded):
        _run(tmp_path, 3, checkpoint=how != "no checkpoint")
    res = verify(tmp_path / "audit.jsonl", allow_seeded=True)
    assert res.ok, res.summary()
    # Round 1 released before the restart and again after it: two events; round 2 would pass the budget.
    assert len(res.ledger) == 2 and [e["round"] for e in res.ledger] == [1, 1]


def test_a_model_file_swapped_after_the_commit_rename_is_refused(tmp_path, monkeypatch):
    """The signed digest is of the bytes the server wrote, not re-read from the path after the rename."""
    train(tmp_path, 1, audit=False)
    real = _checkpoint._fsync_dir

    def swap(path):
        for model in path.glob("model-000002.npz"):
            np.savez(model, np.full(3, 666.0))  # the attacker's file, in the window before the digest was taken
        return real(path)

    monkeypatch.setattr(_checkpoint, "_fsync_dir", swap)
    train(tmp_path, 2, audit=False)
    monkeypatch.setattr(_checkpoint, "_fsync_dir", real)
    with pytest.raises(ConfigurationError, match="not the model file the checkpoint committed"):
        train(tmp_path, 3, audit=False)


def test_a_directory_planted_at_the_next_model_name_is_refused_before_a_round_is_released(tmp_path):
    train(tmp_path, 1)
    (tmp_path / "ckpt" / "model-000002.npz").mkdir()
    with pytest.raises(ConfigurationError, match="not a regular file"):
        train(tmp_path, 2)
    assert len(verify(tmp_path / "audit.jsonl", allow_seeded=True).ledger) == 1  # nothing more was released


def test_a_malformed_release_line_is_a_verification_failure_even_without_jsonschema(tmp_path, monkeypatch):
    import sys

    from securefed.audit import log as audit_log

    train(tmp_path, 1)
    log = tmp_path / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    bad = next(e for e in entries if e["type"] == "release")
    bad = {**bad, "body": {"dp": bad["body"]["dp"]}}  # no round
    log.write_text(log.read_text() + json.dumps(bad) + "\n")
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    audit_log.validator.cache_clear()
    res = verify(log, allow_seeded=True)
    assert not res.ok
    with pytest.raises(ConfigurationError):
        train(tmp_path, 2)
    audit_log.validator.cache_clear()


# -- the fourth red team ---------------------------------------------------------------------------------------


def test_a_discarded_commit_with_a_reused_counter_is_refused(tmp_path, monkeypatch):
    """C1 restored in the commit-to-entry window reuses the counter of the discarded C2; once the rerun's commit
    C2' is in the log (its round entry carries its counter), the saved C2 is an older branch: refused."""
    real = _resume.write_round

    def dying(audit, rec, *a, **k):  # one session: C1 committed (the attacker copies it), C2 committed, crash
        if rec["round"] == 2:
            raise Crash
        shutil.copytree(tmp_path / "ckpt", tmp_path / "c1")
        return real(audit, rec, *a, **k)

    monkeypatch.setitem(BUDGET, "target", 1e6)
    monkeypatch.setattr(_resume, "write_round", dying)
    with pytest.raises(Crash):
        train(tmp_path, 2)
    monkeypatch.setattr(_resume, "write_round", real)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "c2")
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "c1", tmp_path / "ckpt")  # the documented one-round window: accepted
    train(tmp_path, 2)
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "c2", tmp_path / "ckpt")  # the discarded branch
    with pytest.raises(ConfigurationError, match="rolled back"):
        train(tmp_path, 3)
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    counters = [e["body"].get("checkpoint_counter") for e in entries if e["type"] == "round"]
    assert all(c is not None for c in counters) and counters == sorted(counters)
