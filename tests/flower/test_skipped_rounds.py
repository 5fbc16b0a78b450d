"""A Poisson sample too small for SecAgg/SecAgg+ skips its round; with a checkpoint and an audit log the run goes on.

The skip is logged as a ``round_skipped`` entry (no protocol description: SecAgg refuses to describe
so few clients), the log verifies, and a crash anywhere around the skipped round resumes
(protocols/flower.md section 8, protocols/audit.md section 2, proofs/audit.md Lemma A11).
"""

import json

import pytest

import securefed as sf
from securefed.audit import verify
from securefed.cli import main
from securefed.flower import _checkpoint, _resume
from securefed.privacy import Accountant, CentralDP
from tests.flower import test_privacy as tp
from tests.flower.test_resume import Crash

ROUNDS, SKIPPED = 6, 5  # seed 3 at fraction_train=0.6: round 5 samples 2 nodes (too few), the others 3 or 4
PROTOCOLS = [sf.protocols.SecAggPlus(), sf.protocols.SecAgg()]


def run(tmp_path, protocol):
    privacy = CentralDP(noise_multiplier=1.0, clipping=tp.CLIP)
    return tp.run(tmp_path, protocol, privacy, ROUNDS, fraction_train=0.6), privacy


def entries(tmp_path):
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def check_log(tmp_path, res, privacy):
    """Every round logged exactly once, round 5 as skipped with no events; the log verifies (API and CLI)."""
    logged = [e for e in entries(tmp_path) if e["type"] in ("round", "round_aborted", "round_skipped")]
    assert [e["body"]["round"] for e in logged] == list(range(1, ROUNDS + 1))
    kinds = {e["body"]["round"]: e["type"] for e in logged}
    assert kinds == {r: "round_skipped" if r == SKIPPED else "round" for r in range(1, ROUNDS + 1)}
    skip = next(e["body"] for e in logged if e["type"] == "round_skipped")
    assert skip["reason"] == "sample_too_small" and skip["dp"]["events"] == []
    assert skip["participants"] == [int(v) for v in res.rounds[SKIPPED - 1].participants]
    assert len(skip["participants"]) == 2
    before = next(e["body"] for e in logged if e["body"]["round"] == SKIPPED - 1)
    assert before["dp"]["epsilon"] > 0 and skip["dp"]["epsilon"] == before["dp"]["epsilon"]  # nothing spent
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert [e["round"] for e in state["ledger"]] == [r for r in range(1, ROUNDS + 1) if r != SKIPPED]
    audit = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert audit.ok, audit.summary()
    assert (audit.rounds, audit.skipped, audit.aborted, audit.last_round) == (ROUNDS - 1, 1, 0, ROUNDS)
    assert audit.epsilon == pytest.approx(Accountant.from_ledger(state["ledger"]).epsilon(privacy.delta), rel=1e-9)
    assert audit.epsilon == pytest.approx(res.rounds[-1].epsilon, rel=1e-9)
    assert main(["audit", "verify", str(tmp_path / "audit.jsonl"), "--allow-seeded"]) == 0


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_a_skipped_round_with_secagg_checkpoint_and_audit_log_runs_to_the_end(tmp_path, protocol):
    res, privacy = run(tmp_path, protocol)
    assert [r.round for r in res.rounds] == list(range(1, ROUNDS + 1))
    skipped = res.rounds[SKIPPED - 1]
    assert skipped.metrics.get("skipped") == 1.0 and not skipped.included and len(skipped.participants) == 2
    assert all(r.included for r in res.rounds if r.round != SKIPPED)
    check_log(tmp_path, res, privacy)


def crash_before_checkpoint(monkeypatch):
    """The server dies while committing round 5's checkpoint: the rerun samples round 5 again."""
    real = _checkpoint.os.replace

    def dying(src, dst):
        if str(dst).endswith("state.json"):
            with open(src) as f:
                if json.loads(f.read())["body"]["round"] == SKIPPED:
                    raise Crash
        return real(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", dying)


def crash_around_entry(after):
    def patch(monkeypatch):
        real = _resume.write_round

        def dying(audit, rec, *args, **kw):
            if rec["round"] == SKIPPED and not after:
                raise Crash  # committed, not yet logged: the resume writes the entry from the checkpoint
            real(audit, rec, *args, **kw)
            if rec["round"] == SKIPPED:
                raise Crash

        monkeypatch.setattr(_resume, "write_round", dying)
    return patch


CRASHES = {"before_checkpoint": crash_before_checkpoint, "after_checkpoint_before_entry": crash_around_entry(False),
           "after_entry": crash_around_entry(True)}


@pytest.mark.parametrize("where", list(CRASHES))
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_a_crash_around_a_skipped_round_resumes(tmp_path, monkeypatch, protocol, where):
    ref, _ = run(tmp_path / "ref", protocol)
    with monkeypatch.context() as m:
        CRASHES[where](m)
        with pytest.raises(Crash):
            run(tmp_path, protocol)
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["round"] == (SKIPPED - 1 if where == "before_checkpoint" else SKIPPED)
    logged = [e["body"]["round"] for e in entries(tmp_path) if e["type"].startswith("round")]
    assert logged == list(range(1, SKIPPED + (where == "after_entry")))
    res, privacy = run(tmp_path, protocol)
    assert [(r.participants, r.included) for r in res.rounds] == [(r.participants, r.included) for r in ref.rounds]
    assert "resume" in [e["type"] for e in entries(tmp_path)]
    check_log(tmp_path, res, privacy)
