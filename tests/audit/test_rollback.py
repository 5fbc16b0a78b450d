"""Deployment trust: the writer's head, checkpoints named on resume, pinned heads and counters, a plain install.

A rollback restores an older checkpoint together with the log cut at an earlier run_end, and
the server releases the same rounds again. The log alone stays consistent; what catches it is a
head (`--pin`) or a counter (`--min-counter`) the auditor saw outside the log.
"""

import json
import sys

import numpy as np
import pytest

import securefed as sf
from securefed.audit import AuditWriter, render_report, verify
from securefed.audit import log as audit_log
from securefed.audit.keys import key_paths
from securefed.audit.log import GENESIS, entry_hash
from securefed.audit.verifier import verify_data
from securefed.cli import main
from securefed.errors import ConfigurationError, InvalidInput
from tests.audit.helpers import lines_of, resign, write_log

PROTO = sf.protocols.Plain()


def rounds(w, first, last):
    for r in range(first, last + 1):
        res = sf.simulate_aggregation(PROTO, [np.full(2, r / 10)] * 3, seed=r, record="digest")
        w.round(r, protocol=PROTO, result=res)


def checkpoint(w, counter):
    """What a runtime's checkpoint records when saved now: its round, its counter, the log's head."""
    seq, sha = w.head
    return {"round": w.last_round or 0, "counter": counter, "head": {"seq": seq, "sha256": sha}}


def session(path, first, last, ckpt=None):
    with AuditWriter(path) as w, w.session(config={}, checkpoint=ckpt):
        rounds(w, first, last)


def line_hash(path, seq):
    return entry_hash(path.read_bytes().splitlines()[seq - 1])


def test_head_is_the_last_entry_written_or_loaded(tmp_path):
    path = tmp_path / "h.jsonl"
    with AuditWriter(path) as w:
        assert w.head == (0, GENESIS)
        w.start(config={})
        assert w.head == (1, line_hash(path, 1))
        rounds(w, 1, 2)
        w.end()
        assert w.head == (4, line_hash(path, 4))
    with AuditWriter(path) as w:
        assert w.head == (4, line_hash(path, 4))
    res = verify(path)
    assert res.pin == f"4:{line_hash(path, 4)}" and (res.head_seq, res.head) == (4, line_hash(path, 4))


@pytest.fixture
def three_sessions(tmp_path):
    """Sessions of rounds 1-2, 3-4 (from checkpoint 1) and 5-6 (from checkpoint 2); the checkpoints
    taken at each session's end (rounds 2 and 4). Returns the path and the two checkpoints."""
    path = tmp_path / "run.jsonl"
    with AuditWriter(path) as w, w.session(config={}):
        rounds(w, 1, 2)
    with AuditWriter(path) as w:
        ckpt1 = checkpoint(w, 1)
    session(path, 3, 4, ckpt1)
    with AuditWriter(path) as w:
        ckpt2 = checkpoint(w, 2)
    session(path, 5, 6, ckpt2)
    return path, ckpt1, ckpt2


def test_resume_records_the_checkpoint_and_the_log_verifies(three_sessions):
    path, ckpt1, ckpt2 = three_sessions
    resumes = [e["body"] for e in lines_of(path.read_bytes()) if e["type"] == "resume"]
    assert [b["checkpoint"] for b in resumes] == [ckpt1, ckpt2]
    assert ckpt1 == {"round": 2, "counter": 1, "head": {"seq": 4, "sha256": line_hash(path, 4)}}
    res = verify(path, key_paths(path)[1], min_counter=2)
    assert res.ok and res.checkpoint_counter == 2, res.summary()


def test_a_rollback_verifies_alone_but_fails_against_a_pin_or_counter_seen_before(three_sessions):
    """Cut the log at the run_end of session 2 and restore checkpoint 1 (round 2): rounds 3 and 4
    are released again. The regrown log is consistent; only what the auditor saw before tells."""
    path, ckpt1, _ = three_sessions
    before = verify(path)
    assert before.ok and before.head_seq == 12
    earlier_pin = f"4:{line_hash(path, 4)}"  # a head the auditor saw after session 1
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:4]))  # ends with session 1's run_end (at a line boundary)
    with AuditWriter(path) as w:
        assert w.head == (4, line_hash(path, 4)) and w.last_round == 2
        with w.session(config={"rolled back": True}, checkpoint=ckpt1):
            rounds(w, 3, 4)  # the same rounds, released a second time
    after = verify(path, key_paths(path)[1])
    assert after.ok and after.complete and after.rounds == 4, after.summary()  # the log alone cannot tell
    assert lines_of(path.read_bytes())[4]["body"]["discarded_bytes"] == 0  # a cut at a line boundary
    assert verify(path, pinned=[earlier_pin]).ok  # the regrown log still extends what was seen after session 1
    pinned = verify(path, pinned=[before.pin, earlier_pin])
    assert [(f.entry, f.field) for f in pinned.failures] == [(12, "(pin)")]
    assert "no entry 12" in pinned.failures[0].found
    assert verify(path, pinned=[(8, before.head)]).failures[0].field == "(pin)"  # another hash at a present entry
    counted = verify(path, min_counter=before.checkpoint_counter)
    assert [(f.entry, f.field) for f in counted.failures] == [(5, "(counter)")]


def test_the_writer_refuses_a_checkpoint_that_does_not_continue_the_log(three_sessions):
    path, ckpt1, ckpt2 = three_sessions
    size = path.stat().st_size
    with AuditWriter(path) as w:
        with pytest.raises(ConfigurationError, match="counter above 2"):
            w.start(config={}, checkpoint=ckpt1)  # an older checkpoint, restored
        with pytest.raises(ConfigurationError, match="counter above 2"):
            w.start(config={}, checkpoint=ckpt2)  # the same one again: counters strictly grow
        other = {**ckpt2, "counter": 3, "head": {"seq": 8, "sha256": "ab" * 32}}
        with pytest.raises(ConfigurationError, match="another history"):
            w.start(config={}, checkpoint=other)
        with pytest.raises(ConfigurationError, match="no entry 99"):
            w.start(config={}, checkpoint={**other, "head": {"seq": 99, "sha256": "ab" * 32}})
        for bad in ({"round": 1}, {**ckpt2, "counter": True}, {**ckpt2, "round": -1},
                    {**ckpt2, "head": {"seq": 1, "sha256": "AB" * 32}}):
            with pytest.raises(InvalidInput, match="checkpoint"):
                w.start(config={}, checkpoint=bad)
    assert path.stat().st_size == size  # nothing written


def test_a_log_lost_below_its_checkpoint_is_refused_and_a_new_log_may_name_an_empty_head(three_sessions, tmp_path):
    path, _, ckpt2 = three_sessions
    cut = tmp_path / "cut.jsonl"  # the log cut at a line boundary below the head the checkpoint recorded
    for src, dst in zip(key_paths(path), key_paths(cut)):
        dst.write_bytes(src.read_bytes())
    cut.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:4]))
    with AuditWriter(cut) as w, pytest.raises(ConfigurationError, match="no entry 8 before entry 5"):
        w.start(config={}, checkpoint={**ckpt2, "counter": 3})
    fresh = tmp_path / "fresh.jsonl"
    with AuditWriter(fresh) as w:
        with pytest.raises(ConfigurationError, match="no entry 8 before entry 1"):  # the old log is gone
            w.start(config={}, checkpoint=ckpt2)
        w.start(config={}, checkpoint={"round": 0, "counter": 0, "head": {"seq": 0, "sha256": GENESIS}})
        w.end()
    assert verify(fresh).ok and verify(fresh).checkpoint_counter == 0


def resign_keeping_heads(path, entries):
    """:func:`resign`, with each checkpoint head that named an entry of the original log renamed to
    that entry's new hash (re-signing changes every hash); other heads stay as they are."""
    old = [entry_hash(line) for line in path.read_bytes().splitlines()]
    for i, e in enumerate(entries):
        head = e["body"].get("checkpoint", {}).get("head")
        if head and head["sha256"] in old[:i]:
            j = old.index(head["sha256"])
            head["sha256"] = entry_hash(resign(entries[: j + 1], path).splitlines()[j])
    return resign(entries, path)


def resigned(path, mutate):
    entries = lines_of(path.read_bytes())
    mutate(entries)
    res = verify_data(resign_keeping_heads(path, entries), key_paths(path)[1])
    return [(f.entry, f.field) for f in res.failures]


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda es: es[8]["body"]["checkpoint"].update(counter=1), [(9, "body.checkpoint.counter")]),
    (lambda es: es[8]["body"]["checkpoint"].update(counter=0), [(9, "body.checkpoint.counter")]),
    (lambda es: es[4]["body"]["checkpoint"]["head"].update(sha256="ab" * 32), [(5, "body.checkpoint.head")]),
    (lambda es: es[4]["body"]["checkpoint"]["head"].update(seq=5), [(5, "body.checkpoint.head")]),
    (lambda es: es[0]["body"].update(checkpoint={"round": 0, "counter": 5, "head": {"seq": 0, "sha256": GENESIS}}),
     [(5, "body.checkpoint.counter")]),
])
def test_checkpoint_rules_hold_even_against_the_key_holder(three_sessions, mutate, expected):
    """The operator re-signs the log: a counter that does not grow, or a head outside this log, still fails."""
    assert resigned(three_sessions[0], mutate) == expected


def test_the_same_round_released_twice_fails_verification(three_sessions):
    def replay(entries):  # session 3 releases rounds 3 and 4 again instead of 5 and 6
        entries[9]["body"]["round"], entries[10]["body"]["round"] = 3, 4
        entries[11]["body"]["last_round"] = 4

    assert resigned(three_sessions[0], replay) == [(10, "body.round"), (11, "body.round")]


def test_malformed_pins_are_refused(plain_log):
    for pin in ("5", "x:" + "a" * 64, "5:" + "a" * 63, (-1, "a" * 64), (True, "a" * 64), "0:" + "a" * 64, (1,)):
        with pytest.raises(InvalidInput, match="pin"):
            verify(plain_log, pinned=[pin])
    res = verify(plain_log, pinned=[verify(plain_log).pin.upper(), f"0:{GENESIS}"])  # hex in either case
    assert res.ok


def test_cli_pins_counters_and_says_when_the_key_is_not_pinned(three_sessions, capsys):
    path = three_sessions[0]
    pub = str(key_paths(path)[1])
    assert main(["audit", "verify", str(path), "--pubkey", pub]) == 0
    out = capsys.readouterr().out
    pin = verify(path).pin
    assert f"head       {pin}" in out and f"--pin {pin}" in out and "not pinned" not in out
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NOT PINNED" in out and "signing key was taken from the log itself and is not pinned" in out
    assert main(["audit", "verify", str(path), "--json", "--pin", pin, "--pin", f"4:{line_hash(path, 4)}",
                 "--min-counter", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pin"] == pin and doc["head_seq"] == 12 and doc["checkpoint_counter"] == 2 and not doc["key_pinned"]
    assert main(["audit", "verify", str(path), "--json", "--pin", f"13:{'0' * 64}", "--min-counter", "3"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(f["entry"], f["field"]) for f in doc["failures"]] == [(13, "(pin)"), (9, "(counter)")]
    assert main(["audit", "verify", str(path), "--pin", "nonsense"]) == 2
    assert "SEQ:SHA256" in capsys.readouterr().err


@pytest.fixture
def no_jsonschema(monkeypatch):
    """A plain ``pip install securefed``: importing jsonschema fails."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    audit_log.validator.cache_clear()  # a validator built earlier in this process must not be reused
    with pytest.raises(ImportError):
        import jsonschema  # noqa: F401
    yield
    audit_log.validator.cache_clear()


def test_writing_resuming_verifying_and_reporting_need_no_jsonschema(no_jsonschema, tmp_path):
    path = tmp_path / "plain.jsonl"
    write_log(path, rounds=2)
    with AuditWriter(path) as w:
        ckpt = checkpoint(w, 1)
    session(path, 3, 3, ckpt)
    res = verify(path, key_paths(path)[1], pinned=[f"4:{line_hash(path, 4)}"], min_counter=1)
    assert res.ok and res.rounds == 3, res.summary()
    assert render_report(path, tmp_path / "r.html").ok

    entries = lines_of(path.read_bytes())  # schema failures are still found and named, field by field
    entries[1]["body"]["included"] = ["seven"]
    entries[4]["body"]["checkpoint"]["counter"] = -1
    entries[4]["body"]["extra"] = 1
    failures = [f for f in verify_data(resign_keeping_heads(path, entries)).failures if f.entry in (2, 5)]
    assert [(f.entry, f.field) for f in failures] == [(2, "body.included.0"), (5, "body.checkpoint.counter"),
                                                      (5, "body.extra")]
    assert "minimum" in failures[1].expected and failures[1].found == "-1"

    with AuditWriter(tmp_path / "bad.jsonl") as w, pytest.raises(InvalidInput, match=r"config: expected .*object"):
        w.start(config=["not", "a", "mapping"])  # type: ignore[arg-type]


def test_checkpoint_schema_is_strict_in_both_checks(three_sessions):
    pytest.importorskip("jsonschema")  # the reference, when installed, agrees with the compiled check
    entry = lines_of(three_sessions[0].read_bytes())[4]
    good = entry["body"]["checkpoint"]
    bad = [{**good, "counter": True}, {**good, "round": 1.5}, {**good, "x": 1},
           {**good, "head": {"seq": 4, "sha256": "AB" * 32}}, {**good, "head": {"seq": 4}},
           {k: v for k, v in good.items() if k != "round"}]
    for ckpt in [good, *bad]:
        e = {**entry, "body": {**entry["body"], "checkpoint": ckpt}}
        assert audit_log.validator().is_valid(e) == audit_log.conforms(e) == (ckpt is good)
