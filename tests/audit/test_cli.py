"""``securefed audit verify|report`` and ``securefed demo --audit-log``: output and exit status."""

import json

from securefed.audit import verify
from securefed.audit.keys import key_paths
from securefed.cli import main


def tampered(plain_log, tmp_path):
    bad = tmp_path / "bad.jsonl"
    data = bytearray(plain_log.read_bytes())
    data[-30] ^= 0x01  # inside the signature of the last entry
    bad.write_bytes(bytes(data))
    return bad


def test_verify_exits_0_for_a_good_log_and_1_with_each_failure_for_a_bad_one(plain_log, tmp_path, capsys):
    assert main(["audit", "verify", str(plain_log), "--pubkey", str(key_paths(plain_log)[1])]) == 0
    assert capsys.readouterr().out.startswith("OK: 5 entries, 3 rounds")
    assert main(["audit", "verify", str(tampered(plain_log, tmp_path))]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and "entry 5: sig: expected a valid Ed25519 signature" in out


def test_verify_json_pins_and_usage_errors(plain_log, tmp_path, capsys):
    head = verify(plain_log).head
    assert main(["audit", "verify", str(plain_log), "--json", "--head", head]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["rounds"] == 3 and doc["head"] == head and doc["failures"] == []
    assert main(["audit", "verify", str(plain_log), "--json", "--head", "0" * 64]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["failures"] == [{"entry": 5, "field": "(head)", "expected": f"the pinned head {'0' * 64}",
                                "found": head}]
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the audit log" in capsys.readouterr().err
    assert main(["audit", "verify", str(plain_log), "--pubkey", "nonsense"]) == 2


def test_report_writes_the_file_and_exits_with_the_verdict(plain_log, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["audit", "report", str(plain_log), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and "the log verified" in capsys.readouterr().out
    out2 = tmp_path / "bad.html"
    assert main(["audit", "report", str(tampered(plain_log, tmp_path)), "-o", str(out2)]) == 1
    assert "VERIFICATION FAILED" in out2.read_text()


def test_demo_writes_an_audit_log_that_verifies(tmp_path, capsys):
    log = tmp_path / "demo.jsonl"
    assert main(["demo", "--rounds", "1", "--no-progress", "--audit-log", str(log)]) == 0
    assert f"securefed audit verify {log}" in capsys.readouterr().out
    assert main(["audit", "verify", str(log), "--pubkey", str(key_paths(log)[1])]) == 0
