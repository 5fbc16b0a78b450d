"""Checkpoints and resume: a restarted run continues from the last committed round, losing and repeating nothing."""

import json

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.errors import ConfigurationError
from securefed.flower import SecureFedAvg, _checkpoint
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

N, ROUNDS = 4, 3


class Crash(BaseException):
    """The server process dies (not an Exception: nothing may catch it)."""


class CrashingGrid(InProcessGrid):
    """Dies when the server pushes the requests of phase `phase` of round `round`."""

    def __init__(self, *args, crash_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def push_messages(self, messages):
        messages = list(messages)
        if self.crash_at and messages:
            rec = messages[0].content["securefed"]
            if (rec["round"], rec["phase"]) == self.crash_at:
                self.crash_at = None
                raise Crash
        return super().push_messages(messages)


def updates(p, rnd):
    return np.full(apps.dim(), (p + 1) * 0.5 ** rnd)


def strategy(tmp_path, protocol, **kw):
    return SecureFedAvg(protocol=protocol, seed=7, phase_timeout=0.05, train_timeout=0.05, poll_interval=0.01,
                        checkpoint_dir=tmp_path / "ckpt", audit_log=tmp_path / "audit.jsonl", **kw)


def uninterrupted(tmp_path, protocol):
    (tmp_path / "ref").mkdir()
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    return strategy(tmp_path / "ref", protocol).start(grid, apps.model(), num_rounds=ROUNDS)


def audit_rounds(path):
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["body"]["round"] for e in entries if e["type"] == "round"], [e["type"] for e in entries]


def check_like_uninterrupted(res, ref, tmp_path):
    assert [r.round for r in res.rounds] == list(range(1, ROUNDS + 1))
    assert [(r.participants, r.included) for r in res.rounds] == [(r.participants, r.included) for r in ref.rounds]
    rounds, types = audit_rounds(tmp_path / "audit.jsonl")
    assert rounds == list(range(1, ROUNDS + 1))  # each round exactly once
    assert "resume" in types
    result = verify(tmp_path / "audit.jsonl", allow_seeded=True)  # a seeded (test) run
    assert result.ok and result.seeded_secrets, result.summary()
    assert result.rounds == ROUNDS
    state, _, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["round"] == ROUNDS and len(state["history"]) == ROUNDS


@pytest.mark.parametrize("crash_round", [1, 2, 3])
def test_a_run_that_dies_mid_round_resumes_with_the_same_rounds_and_model(tmp_path, crash_round):
    protocol = sf.protocols.Plain()
    ref = uninterrupted(tmp_path, protocol)
    grid = CrashingGrid(apps.client_app(protocol, updates), apps.nodes(N), crash_at=(crash_round, "upload"))
    with pytest.raises(Crash):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    committed = _checkpoint.load(tmp_path / "ckpt")
    assert (committed[0]["round"] if committed else 0) == crash_round - 1
    res = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    check_like_uninterrupted(res, ref, tmp_path)
    # Plain sums the same float64 updates in the same order: the very same model.
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))
    assert res.arrays["steps"].numpy().tolist() == [7]  # integer arrays are left alone


def test_a_run_that_dies_between_checkpoint_and_audit_entry_writes_the_entry_on_resume(tmp_path, monkeypatch):
    protocol = sf.protocols.Plain()
    ref = uninterrupted(tmp_path, protocol)
    real = SecureFedAvg._write_audit

    def dying(self, audit, rec, total):
        if rec["round"] == 2:
            raise Crash
        return real(self, audit, rec, total)

    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    monkeypatch.setattr(SecureFedAvg, "_write_audit", dying)
    with pytest.raises(Crash):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    monkeypatch.setattr(SecureFedAvg, "_write_audit", real)
    assert _checkpoint.load(tmp_path / "ckpt")[0]["round"] == 2
    assert audit_rounds(tmp_path / "audit.jsonl")[0] == [1]
    res = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    check_like_uninterrupted(res, ref, tmp_path)
    np.testing.assert_array_equal(apps.vector(res.arrays), apps.vector(ref.arrays))


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    protocol = sf.protocols.Plain()
    ref = uninterrupted(tmp_path, protocol)
    real = _checkpoint.os.replace

    def dying(src, dst):
        if str(dst).endswith("state.json") and json.loads(open(src).read())["round"] == 2:
            raise Crash
        return real(src, dst)

    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    monkeypatch.setattr(_checkpoint.os, "replace", dying)
    with pytest.raises(Crash):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    monkeypatch.setattr(_checkpoint.os, "replace", real)
    state, arrays, _ = _checkpoint.load(tmp_path / "ckpt")
    assert state["round"] == 1
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))  # no temporary file left behind
    res = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    check_like_uninterrupted(res, ref, tmp_path)


def test_a_finished_run_restarted_does_nothing_more_and_a_longer_one_continues(tmp_path):
    protocol = sf.protocols.Plain()
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    first = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=2)
    again = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=2)
    assert [r.round for r in again.rounds] == [1, 2]
    np.testing.assert_array_equal(apps.vector(again.arrays), apps.vector(first.arrays))
    more = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=3)
    assert [r.round for r in more.rounds] == [1, 2, 3]
    assert audit_rounds(tmp_path / "audit.jsonl")[0] == [1, 2, 3]


def test_an_audit_log_from_another_run_is_refused(tmp_path):
    protocol = sf.protocols.Plain()
    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=2)
    (tmp_path / "ckpt" / "state.json").unlink()  # the checkpoint is gone, the log has two rounds
    with pytest.raises(ConfigurationError, match="audit log"):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=3)
