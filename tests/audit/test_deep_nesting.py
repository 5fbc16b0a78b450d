"""A line nested deeper than MAX_DEPTH is not an entry: verify, report and resume fail cleanly, never recurse."""

import json

import pytest

from securefed.audit import AuditWriter, verify
from securefed.audit.log import (
    MAX_DEPTH,
    canonical,
    nesting_depth,
    parse_line,
    read_entries,
)
from securefed.audit.report import render_report
from securefed.errors import ConfigurationError, InvalidInput

# Far past Python's recursion limit (json.loads alone raises RecursionError on it).
DEEP = b"[" * 100_000 + b"]" * 100_000
# Parses within the limit but is deeper than any entry (the checks after parsing would recurse).
MIDDLE = b'{"type":"round","body":' + b"[" * 900 + b"]" * 900 + b"}"


def test_nesting_depth_counts_containers_not_brackets_in_strings():
    assert nesting_depth(json.loads(b'{"a":"[[[[","b":[1,{"c":"\\"[["}]}')) == 3
    assert nesting_depth(7) == 0 and nesting_depth([]) == 1
    assert parse_line(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    for line in (DEEP, MIDDLE, b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)):
        with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
            parse_line(line)


@pytest.mark.parametrize("line", [DEEP, MIDDLE], ids=["past-recursion-limit", "parseable"])
def test_verify_and_report_name_the_deep_line_as_not_an_entry(plain_log, tmp_path, line):
    log = tmp_path / "deep.jsonl"
    log.write_bytes(plain_log.read_bytes() + line + b"\n")
    res = verify(log)
    assert not res.ok
    first = res.failures[0]
    assert (first.entry, first.field) == (6, "(json)") and "nested deeper than" in first.found
    assert len(read_entries(log.read_bytes())) == 5  # the report renders the five good entries
    out = tmp_path / "deep.html"
    assert not render_report(log, out)
    assert "VERIFICATION FAILED" in out.read_text()


def test_the_writer_refuses_to_resume_after_a_deep_line(tmp_path):
    log = tmp_path / "run.jsonl"
    AuditWriter(log).close()  # creates the key beside the log
    log.write_bytes(DEEP + b"\n")
    with pytest.raises(ConfigurationError, match="nested deeper than"):
        AuditWriter(log)


def test_the_writer_never_writes_a_line_the_verifier_refuses(tmp_path):
    deep: list = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than"):
        canonical({"config": deep})
    writer = AuditWriter(tmp_path / "run.jsonl")
    with pytest.raises(InvalidInput, match="nested deeper than"):
        writer.start(config={"deep": deep})
    writer.close()
