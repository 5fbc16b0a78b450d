"""``round_skipped``: a round whose sample was too small to run (proofs/audit.md Lemma A11).

It needs no protocol description, keeps round numbering and checkpoint-counter rules, and spends
nothing: one that carries DP events fails verification, even re-signed by the operator.
"""

import copy

import numpy as np
import pytest

import securefed as sf
from securefed.audit import AuditWriter, render_report, verify
from securefed.audit.log import fast_check, validator
from securefed.audit.verifier import verify_data
from securefed.errors import ConfigurationError
from securefed.privacy.accountant import Accountant
from securefed.privacy.events import GaussianEvent, event_from_dict
from tests.audit.helpers import lines_of, resign

PRIVACY = {"accountant": "rdp", "delta": 1e-5}


def event(r):
    return GaussianEvent(noise_multiplier=1.1, sampling_rate=0.4, round=r, num_clients=3).to_dict()


def skipped_log(path, *, counters=(1, 2, 3)):
    """Round 1 ran (one event), round 2 was skipped (a sample of one), round 3 ran; with checkpoint counters."""
    acc, protocol = Accountant("rdp"), sf.protocols.SecAggPlus()
    with AuditWriter(path) as w, w.session(config={}, privacy=PRIVACY):
        for r, counter in zip((1, 2, 3), counters):
            if r == 2:
                w.round_skipped(2, participants=[4], message="the sample of 1 node(s) is too small to run secagg+",
                                epsilon=acc.epsilon(1e-5), checkpoint_counter=counter)
                continue
            res = sf.simulate_aggregation(protocol, [np.full(3, 0.01 * i) for i in range(5)], seed=r, record="digest")
            acc.record(event_from_dict(event(r)))
            w.round(r, protocol=protocol, result=res, dp_events=[event(r)], epsilon=acc.epsilon(1e-5),
                    checkpoint_counter=counter)
    return path


def test_a_genuine_skipped_round_verifies_spends_nothing_and_the_schema_accepts_it(tmp_path):
    path = skipped_log(tmp_path / "skip.jsonl")
    res = verify(path)
    assert res.ok, res.summary()
    assert (res.rounds, res.skipped, res.aborted, res.last_round) == (2, 1, 0, 3)
    assert [e["round"] for e in res.ledger] == [1, 3]
    assert "1 skipped" in res.summary()
    entries = lines_of(path.read_bytes())
    (skip,) = [e for e in entries if e["type"] == "round_skipped"]
    assert skip["body"]["dp"] == {"events": [], "epsilon": entries[2]["body"]["dp"]["epsilon"]}
    assert "protocol" not in skip["body"]  # secagg+ refuses to describe one client: no description is needed
    assert validator().is_valid(skip) and validator("round_skipped").is_valid(skip)
    assert fast_check("round_skipped")(skip)
    assert entries[-1]["body"]["rounds"] == 2  # run_end counts round entries, as before


@pytest.mark.parametrize("change", ["reason", "protocol", "no_dp", "round_0"])
def test_the_compiled_check_and_jsonschema_refuse_malformed_skipped_entries(tmp_path, change):
    (skip,) = [e for e in lines_of(skipped_log(tmp_path / "s.jsonl").read_bytes()) if e["type"] == "round_skipped"]
    bad = copy.deepcopy(skip)
    if change == "reason":
        bad["body"]["reason"] = "too_few_survivors"
    elif change == "protocol":
        bad["body"]["protocol"] = {"protocol": "secagg+", "n": 1, "min_survivors": 1}
    elif change == "no_dp":
        del bad["body"]["dp"]
    else:
        bad["body"]["round"] = 0
    assert not validator().is_valid(bad)
    assert not fast_check("round_skipped")(bad)


def test_a_skipped_entry_carrying_dp_events_fails_verification_even_signed(tmp_path):
    path = skipped_log(tmp_path / "skip.jsonl")
    entries = lines_of(path.read_bytes())
    number = next(i for i, e in enumerate(entries, 1) if e["type"] == "round_skipped")
    forged = copy.deepcopy(entries)
    forged[number - 1]["body"]["dp"]["events"] = [event(2)]  # the operator claims a spend in a round that never ran
    data = resign(forged, path)
    assert validator().is_valid(lines_of(data)[number - 1])  # the schema alone accepts it: the rule is the verifier's
    res = verify_data(data)
    assert not res.ok
    assert (number, "body.dp.events") in [(f.entry, f.field) for f in res.failures]


def test_a_skipped_round_keeps_the_numbering_and_counter_rules(tmp_path):
    path = skipped_log(tmp_path / "skip.jsonl")
    entries = lines_of(path.read_bytes())
    number = next(i for i, e in enumerate(entries, 1) if e["type"] == "round_skipped")
    for field, value in (("round", 1), ("checkpoint_counter", 1)):
        forged = copy.deepcopy(entries)
        forged[number - 1]["body"][field] = value
        if field == "checkpoint_counter":
            forged[number - 2]["body"]["checkpoint_counter"] = 2  # the skipped round's counter goes back below it
        res = verify_data(resign(forged, path))
        assert (number, f"body.{field}") in [(f.entry, f.field) for f in res.failures], res.summary()
    with AuditWriter(tmp_path / "w.jsonl") as w, w.session(config={}, privacy=PRIVACY):
        with pytest.raises(ConfigurationError, match="epsilon"):
            w.round_skipped(1, participants=[0], message="too small")  # a log with privacy: epsilon is required
        w.round_skipped(1, participants=[0], message="too small", epsilon=0.0)
        with pytest.raises(ConfigurationError, match="does not follow"):
            w.round_skipped(1, participants=[0], message="too small", epsilon=0.0)


def test_the_report_shows_a_skipped_round(tmp_path):
    path = skipped_log(tmp_path / "skip.jsonl")
    out = tmp_path / "report.html"
    assert render_report(path, out).ok
    text = out.read_text()
    assert "2 completed, 0 aborted, 1 skipped" in text
    assert "SKIPPED (sample_too_small)" in text and 'id="round-2-detail"' in text
