"""Every command-line error is one line on stderr and a non-zero status; the traceback only with --debug."""

import os
import subprocess
import sys

import pytest

import securefed.audit
from securefed.cli import DEMO_PROTOCOLS, EXIT_BUG, EXIT_USAGE, main
from securefed.demo import PROTOCOLS

DEEP = b"[" * 100_000 + b"]" * 100_000  # a log line far past Python's recursion limit


def run_cli(*args, debug_env=False, **env_vars):
    env = {k: v for k, v in os.environ.items() if k != "SECUREFED_DEBUG"} | env_vars
    if debug_env:
        env["SECUREFED_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "securefed", *map(str, args)], check=False, capture_output=True,
                          text=True, env=env, timeout=300)


def one_line_error(proc, status, *words):
    """`proc` failed with `status`: no traceback, and stderr's last line names the problem."""
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last
    return last


@pytest.mark.parametrize(("option", "value"), [("--seed", "-1"), ("--seed", "x"), ("--rounds", "0")])
def test_demo_argument_errors_keep_argparse_usage(option, value):
    proc = run_cli("demo", option, value)
    one_line_error(proc, 2, "securefed demo: error: argument", option)
    assert proc.stderr.startswith("usage: securefed demo") and proc.stdout == ""


def test_demo_audit_log_that_cannot_be_created_fails_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    log = tmp_path / "afile" / "run.jsonl"  # a missing folder is created; a folder that is a file cannot be
    proc = run_cli("demo", "--audit-log", log)
    line = one_line_error(proc, EXIT_USAGE, "securefed: error: ", str(log.parent))
    assert proc.stderr == line + "\n" and proc.stdout == ""
    debug = run_cli("demo", "--audit-log", log, "--debug")  # --debug after the command works too
    assert debug.returncode == EXIT_USAGE and debug.stderr.startswith("Traceback")
    assert debug.stderr.splitlines()[-1] == line


def test_report_into_an_unwritable_place(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"{}\n")
    out = tmp_path / "missing" / "r.html"
    proc = run_cli("audit", "report", log, "-o", out)
    one_line_error(proc, EXIT_USAGE, "cannot write the report", str(out), "-o")
    assert len(proc.stderr.strip().splitlines()) == 1
    debug = run_cli("audit", "report", log, "-o", out, debug_env=True)
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr
    assert not list(tmp_path.glob("*.tmp"))


def test_verify_and_report_of_a_deeply_nested_line_fail_verification_cleanly(tmp_path):
    log = tmp_path / "deep.jsonl"
    log.write_bytes(DEEP + b"\n")
    proc = run_cli("audit", "verify", log)
    assert proc.returncode == 1 and proc.stderr == ""  # a failed verification, not an error
    assert "entry 1: (json)" in proc.stdout and "nested deeper than" in proc.stdout
    proc = run_cli("--debug", "audit", "report", log, "-o", tmp_path / "r.html")
    assert proc.returncode == 1 and proc.stderr == "" and "FAILED verification" in proc.stdout


def test_an_unexpected_error_is_one_line_that_asks_for_debug(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nmore detail")

    monkeypatch.delenv("SECUREFED_DEBUG", raising=False)
    monkeypatch.setattr(securefed.audit, "verify", broken)
    assert main(["audit", "verify", str(tmp_path / "x.jsonl")]) == EXIT_BUG
    err = capsys.readouterr().err
    assert err == ("securefed: error: unexpected RuntimeError: boom (a bug in securefed; "
                   "rerun with --debug for the traceback)\n")
    assert main(["--debug", "audit", "verify", str(tmp_path / "x.jsonl")]) == EXIT_BUG
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "RuntimeError: boom" in err
    assert err.splitlines()[-1] == "securefed: error: unexpected RuntimeError: boom (a bug in securefed)"


def test_the_parser_offers_the_demo_protocols():
    assert DEMO_PROTOCOLS == PROTOCOLS


def test_piped_demo_output_is_plain_lines_at_natural_width():
    # stdout is a pipe: no progress bar, no escapes, and no wrapping even where rich would wrap at COLUMNS
    proc = run_cli("demo", "--rounds", "1", "--protocol", "plain", "--no-dp", COLUMNS="40")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("round   1/1  loss ") and lines[0].endswith(" KiB/client"), lines[0]
    assert lines[1:3] == ["", "securefed demo: digits, 10 participants (Dirichlet 0.5), 1 rounds"]
    assert not any(line.startswith("training") for line in lines) and "\x1b" not in proc.stdout
