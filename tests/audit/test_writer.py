"""The writer: what a round entry records, fsync per entry, crash prefixes, resume, locks and keys."""

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import securefed as sf
from securefed.audit import AuditWriter, verify
from securefed.audit.keys import key_paths, public_hex
from securefed.errors import AbortReason, ConfigurationError, InvalidInput, ProtocolAborted
from tests.audit.helpers import lines_of, write_log


def test_a_round_entry_records_the_result(tmp_path):
    proto = sf.protocols.Plain()
    xs = [np.arange(3.0) + i for i in range(4)]
    res = sf.simulate_aggregation(proto, xs, dropouts={2: "upload"}, seed=5)
    with AuditWriter(tmp_path / "a.jsonl") as w:
        w.start(config={"k": (1, 2)})
        w.round(4, protocol=proto, result=res, participants=[10, 11, 12, 13], metrics={"loss": float("nan")})
        w.end()
    body = lines_of((tmp_path / "a.jsonl").read_bytes())[1]["body"]
    assert body["round"] == 4 and body["participants"] == [10, 11, 12, 13]
    assert body["included"] == [10, 11, 13]
    assert body["dropped"] == [{"participant": 12, "phase": "upload", "reason": "no_reply", "detail": ""}]
    assert body["received"] == [{"party": 10 + c, "phase": ph, "sha256": h, "size": n}
                                for c, ph, h, n in res.server_view.digests]
    assert [m["sha256"] for m in body["received"]] == [hashlib.sha256(m).hexdigest()
                                                      for _, _, m in res.server_view.messages]
    assert body["aggregate"] == {"sha256": hashlib.sha256(res.total.astype("<f8").tobytes()).hexdigest(),
                                 "dim": 3, "dtype": "<f8"}
    assert body["protocol"] == proto.describe(4) and body["phases"] == ["upload"]
    assert body["metrics"] == {"loss": None} and body["dp"] is None
    assert verify(tmp_path / "a.jsonl").ok


def test_every_entry_is_on_disk_before_the_call_returns(tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    synced = []
    real = os.fsync

    def fsync(fd):
        real(fd)
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()):
            synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    write_log(path, rounds=3)
    data = path.read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    assert synced == ends  # one fsync after each complete line, none in between


CRASHER = textwrap.dedent("""
    import sys, numpy as np, securefed as sf
    from securefed.audit import AuditWriter
    w = AuditWriter(sys.argv[1])
    w.start(config={})
    p = sf.protocols.Plain()
    r = 0
    while True:
        r += 1
        res = sf.simulate_aggregation(p, [np.ones(4)] * 3, seed=r, record="digest")
        w.round(r, protocol=p, result=res)
""")


def crash_after(path, entries):
    """Run a writer in a child process and SIGKILL it once `entries` lines are on disk."""
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path)])
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_bytes().count(b"\n") >= entries):
            assert proc.poll() is None and time.monotonic() < deadline, "writer died early"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_killed_writer_leaves_a_verifiable_prefix_and_resume_continues_it(tmp_path):
    path = tmp_path / "crash.jsonl"
    crash_after(path, 4)
    prefix = verify(path, key_paths(path)[1], allow_incomplete=True)
    assert prefix.ok and not prefix.complete and prefix.rounds >= 3, prefix.summary()
    strict = verify(path)
    assert [(f.entry, f.field) for f in strict.failures] == [(prefix.entries + 1, "type")]

    w = AuditWriter(path)
    assert w.resumed and w.last_round == prefix.rounds
    proto = sf.protocols.Plain()
    with w.session(config={"resumed": True}):
        res = sf.simulate_aggregation(proto, [np.ones(2)] * 2, seed=0)
        w.round(w.last_round + 1, protocol=proto, result=res)
    w.close()
    done = verify(path, key_paths(path)[1])
    assert done.ok and done.complete and done.rounds == prefix.rounds + 1, done.summary()
    types = [e["type"] for e in lines_of(path.read_bytes())]
    assert types[prefix.entries:] == ["resume", "round", "run_end"]


def test_resume_cuts_a_torn_last_line_and_records_what_it_cut(plain_log, tmp_path):
    path = tmp_path / "torn.jsonl"
    for src, dst in zip(key_paths(plain_log), key_paths(path)):
        dst.write_bytes(src.read_bytes())
    good = plain_log.read_bytes()
    torn = b'{"body":{"aggregate"'
    path.write_bytes(good + torn)
    assert not verify(path).ok
    with AuditWriter(path) as w:
        w.start(config={})
        w.end()
    entries = lines_of(path.read_bytes())
    assert path.read_bytes().startswith(good)
    assert entries[5]["type"] == "resume"
    assert entries[5]["body"]["discarded_bytes"] == len(torn)
    assert entries[5]["body"]["discarded_sha256"] == hashlib.sha256(torn).hexdigest()
    assert verify(path, key_paths(plain_log)[1]).ok


def test_resume_refuses_a_log_that_does_not_verify_and_a_wrong_key(plain_log, tmp_path):
    path = tmp_path / "bad.jsonl"
    for src, dst in zip(key_paths(plain_log), key_paths(path)):
        dst.write_bytes(src.read_bytes())
    data = bytearray(plain_log.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigurationError, match="does not verify"):
        AuditWriter(path)
    path.write_bytes(plain_log.read_bytes())
    with pytest.raises(ConfigurationError, match="does not verify"):
        AuditWriter(path, key=Ed25519PrivateKey.generate())
    key_paths(path)[0].unlink()
    with pytest.raises(ConfigurationError, match="its key"):
        AuditWriter(path)


def test_a_second_writer_is_locked_out(tmp_path):
    path = tmp_path / "lock.jsonl"
    w = AuditWriter(path)
    with pytest.raises(ConfigurationError, match="another writer"):
        AuditWriter(path)
    w.close()
    AuditWriter(path).close()


def test_misuse_is_refused_before_anything_is_written(tmp_path):
    proto = sf.protocols.Plain()
    res = sf.simulate_aggregation(proto, [np.ones(2)] * 2, seed=0)
    with AuditWriter(tmp_path / "m.jsonl") as w:
        with pytest.raises(ConfigurationError, match="no audit session"):
            w.round(1, protocol=proto, result=res)
        w.start(config={}, privacy={"accountant": "rdp", "delta": 1e-5})
        with pytest.raises(ConfigurationError):
            w.start(config={})
        with pytest.raises(ConfigurationError, match="claim the epsilon"):
            w.round(1, protocol=proto, result=res)
        w.round(2, protocol=proto, result=res, epsilon=0.0)
        with pytest.raises(ConfigurationError, match="does not follow"):
            w.round(2, protocol=proto, result=res, epsilon=0.0)
        with pytest.raises(InvalidInput):
            w.round(3, protocol=proto, result=res, participants=[1, 2, 3], epsilon=0.0)
        with pytest.raises(InvalidInput):
            w.round(0, protocol=proto, result=res, epsilon=0.0)
        w.end()
    size = (tmp_path / "m.jsonl").stat().st_size
    with AuditWriter(tmp_path / "m.jsonl") as w, pytest.raises(ConfigurationError, match="must match"):
        w.start(config={}, privacy=None)
    assert (tmp_path / "m.jsonl").stat().st_size == size


def test_sessions_end_with_the_status_the_block_ended_with(tmp_path):
    path = tmp_path / "s.jsonl"
    proto = sf.protocols.Plain()
    with AuditWriter(path) as w:
        with pytest.raises(RuntimeError), w.session(config={}):
            raise RuntimeError("disk on fire")
        with pytest.raises(KeyboardInterrupt), w.session(config={}):
            raise KeyboardInterrupt
        with w.session(config={}):
            w.round_aborted(1, protocol=proto, participants=[0, 1],
                            error=ProtocolAborted(AbortReason.NO_INPUTS, "nobody came", phase="upload"))
    ends = [e["body"] for e in lines_of(path.read_bytes()) if e["type"] == "run_end"]
    assert [(b["status"], b["detail"]) for b in ends] == [
        ("failed", "RuntimeError: disk on fire"), ("interrupted", "KeyboardInterrupt"), ("completed", "")]
    res = verify(path)
    assert res.ok and res.aborted == 1 and res.last_round == 1


def test_key_files_and_given_keys(tmp_path):
    path = tmp_path / "k.jsonl"
    w = write_log(path, rounds=1)
    private, public = key_paths(path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert verify(path, public).ok and verify(path, w.public_key).ok
    key = Ed25519PrivateKey.generate()
    with AuditWriter(tmp_path / "g.jsonl", key=key) as g:
        g.start(config={})
        g.end()
    assert not key_paths(tmp_path / "g.jsonl")[0].exists()
    assert verify(tmp_path / "g.jsonl", public_hex(key)).ok
    with pytest.raises(ConfigurationError, match="does not verify"):
        AuditWriter(tmp_path / "g.jsonl", key=private)  # another log's PEM key
