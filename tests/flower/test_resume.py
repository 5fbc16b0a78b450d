"""Checkpoints and resume: a restarted run continues from the last committed round, losing and repeating nothing.

A node gives at most one input per round index (protocols/flower.md, section 5): when the server
dies after some nodes gave their input to a round, those nodes refuse the rerun of that round, which
goes on with the others or aborts; the run goes on with the next round.
"""

import json

import numpy as np
import pytest

import securefed as sf
from securefed.audit import verify
from securefed.errors import ConfigurationError
from securefed.flower import SecureFedAvg, _checkpoint, _resume
from securefed.flower.testing import InProcessGrid
from tests.flower import apps

N, ROUNDS = 4, 3


class Crash(BaseException):
    """The server process dies (not an Exception: nothing may catch it)."""


class CrashingGrid(InProcessGrid):
    """Dies when the server pushes the requests of phase `phase` of round `round`, after the first
    `delivered` of them reached their nodes (default none)."""

    def __init__(self, *args, crash_at=None, delivered=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at, self.delivered = crash_at, delivered

    def push_messages(self, messages):
        messages = list(messages)
        if self.crash_at and messages:
            rec = messages[0].content["securefed"]
            if (rec["round"], rec["phase"]) == self.crash_at:
                self.crash_at = None
                super().push_messages(messages[: self.delivered])
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
    real = _resume.write_round

    def dying(audit, rec, total, **kw):
        if rec["round"] == 2:
            raise Crash
        return real(audit, rec, total, **kw)

    grid = InProcessGrid(apps.client_app(protocol, updates), apps.nodes(N))
    monkeypatch.setattr(_resume, "write_round", dying)
    with pytest.raises(Crash):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    monkeypatch.setattr(_resume, "write_round", real)
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
        if str(dst).endswith("state.json"):
            with open(src) as f:
                if json.loads(f.read())["body"]["round"] == 2:
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
    # Every node gave its input to round 2 before the crash (the server had summed them): each refuses
    # the rerun of round 2 (one input per round index: a second sum over other nodes would give inputs
    # by difference), so round 2 aborts, leaving the model as round 1 left it, and round 3 runs.
    assert [r.round for r in res.rounds] == list(range(1, ROUNDS + 1))
    nodes = tuple(apps.nodes(N))
    assert [(r.participants, r.included) for r in res.rounds] == [(nodes, nodes), (nodes, ()), (nodes, nodes)]
    assert res.rounds[0].included == ref.rounds[0].included  # round 1 as committed before the crash
    assert res.rounds[1].aborted == "no_inputs"
    assert {v: (d.phase, d.reason.value) for v, d in res.rounds[1].dropped.items()} == dict.fromkeys(
        nodes, ("upload", "refused"))
    assert all("already gave its input in round 2" in d.detail for d in res.rounds[1].dropped.values())
    rounds, types = audit_rounds(tmp_path / "audit.jsonl")
    assert rounds == [1, 3] and "round_aborted" in types and "resume" in types
    assert verify(tmp_path / "audit.jsonl", allow_seeded=True).ok
    start = apps.vector(apps.model())
    expected = start + sum(np.mean([updates(p, r) for p in range(N)], axis=0) for r in (1, 3))
    np.testing.assert_allclose(apps.vector(res.arrays), expected, rtol=0, atol=1e-6)


def test_a_rerun_after_a_crash_mid_upload_goes_on_without_the_nodes_that_gave_their_input(tmp_path):
    """The server dies after two of four nodes uploaded in round 2: the rerun includes only the other two."""
    protocol = sf.protocols.Plain()
    grid = CrashingGrid(apps.client_app(protocol, updates), apps.nodes(N), crash_at=(2, "upload"), delivered=2)
    with pytest.raises(Crash):
        strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    res = strategy(tmp_path, protocol).start(grid, apps.model(), num_rounds=ROUNDS)
    nodes = tuple(apps.nodes(N))
    assert [r.round for r in res.rounds] == list(range(1, ROUNDS + 1))
    second = res.rounds[1]
    assert second.participants == nodes and second.included == nodes[2:] and second.aborted is None
    assert {v: d.reason.value for v, d in second.dropped.items()} == dict.fromkeys(nodes[:2], "refused")
    assert res.rounds[2].included  # the run goes on
    assert verify(tmp_path / "audit.jsonl", allow_seeded=True).ok


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
