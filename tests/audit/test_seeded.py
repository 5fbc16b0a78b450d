"""The seeded_secrets declaration: written by the writer, failed by the verifier unless allowed, shown by the report."""

import numpy as np
import pytest

import securefed as sf
from securefed.audit import AuditWriter, render_report, verify
from securefed.audit.verifier import verify_data
from securefed.errors import ConfigurationError
from tests.audit.helpers import lines_of, resign

PRIVACY = {"accountant": "rdp", "delta": 1e-5}


def seeded_log(path, seeded):
    from securefed.privacy.accountant import Accountant
    from securefed.privacy.events import GaussianEvent

    acc, w = Accountant("rdp"), AuditWriter(path)
    w.start(config={"test": True}, privacy=PRIVACY, seeded_secrets=seeded)
    event = GaussianEvent(noise_multiplier=1.0, sampling_rate=1.0, round=1, num_clients=3)
    acc.record(event)
    res = sf.simulate_aggregation(sf.protocols.Plain(), [np.ones(2)] * 3, seed=0, record="digest")
    w.round(1, protocol=sf.protocols.Plain(), result=res, dp_events=[event.to_dict()], epsilon=acc.epsilon(1e-5))
    w.end()
    w.close()
    return path


@pytest.mark.parametrize("seeded", [None, False, True])
def test_the_declaration_is_written_and_only_true_fails(tmp_path, seeded):
    path = seeded_log(tmp_path / "s.jsonl", seeded)
    body = lines_of(path.read_bytes())[0]["body"]
    assert body.get("seeded_secrets", "absent") == ("absent" if seeded is None else seeded)
    res = verify(path)
    assert res.ok is (seeded is not True) and res.seeded_secrets is (seeded is True)
    if seeded:
        (failure,) = res.failures
        assert (failure.entry, failure.field, failure.found) == (1, "body.seeded_secrets", "true")
        assert "allow_seeded" in failure.expected
        allowed = verify(path, allow_seeded=True)
        assert allowed.ok and allowed.epsilon_void and allowed.epsilon > 0 and "VOID" in allowed.summary()


def test_the_writer_resumes_a_seeded_log_and_refuses_a_bad_flag(tmp_path):
    path = seeded_log(tmp_path / "s.jsonl", True)
    w = AuditWriter(path)  # the prefix verifies with allow_seeded: a simulation's log can go on
    with pytest.raises(ConfigurationError, match="seeded_secrets"):
        w.start(config={}, privacy=PRIVACY, seeded_secrets="yes")
    w.start(config={}, privacy=PRIVACY, seeded_secrets=False)
    w.end()
    w.close()
    res = verify(path, allow_seeded=True)
    assert res.ok and res.seeded_secrets  # one seeded session voids the whole log


def test_the_schema_wants_a_boolean(tmp_path):
    path = seeded_log(tmp_path / "s.jsonl", False)
    entries = lines_of(path.read_bytes())
    entries[0]["body"]["seeded_secrets"] = 1
    res = verify_data(resign(entries, path))
    assert res.failures[0].entry == 1 and res.failures[0].field == "body.seeded_secrets"


def test_the_report_says_the_epsilon_is_void(tmp_path):
    path = seeded_log(tmp_path / "s.jsonl", True)
    out = tmp_path / "r.html"
    assert not render_report(path, out).ok
    assert "VERIFICATION FAILED" in out.read_text() and "body.seeded_secrets" in out.read_text()
    assert render_report(path, out, allow_seeded=True).ok
    assert "VERIFIED" in out.read_text() and "SEEDED SECRETS" in out.read_text()
