"""Release entries: a DP release logged ahead of its round's entry.

protocols/audit.md section 2; proofs/audit.md A10.
"""

import numpy as np
import pytest

import securefed as sf
from securefed.audit import AuditWriter, verify
from securefed.errors import ConfigurationError
from securefed.privacy import Accountant, GaussianEvent
from tests.audit.helpers import lines_of, resign

PROTO = sf.protocols.Plain()
PRIVACY = {"accountant": "rdp", "delta": 1e-5}


def event(r):
    return GaussianEvent(noise_multiplier=1.0, sampling_rate=1.0, steps=1, round=r, num_clients=3).to_dict()


def eps(events):
    return Accountant.from_ledger(events).epsilon(PRIVACY["delta"])


def result(r):
    return sf.simulate_aggregation(PROTO, [np.full(2, r / 10)] * 3, seed=r, record="digest")


def test_releases_count_once_each_and_a_rerun_round_counts_twice(tmp_path):
    log = tmp_path / "audit.jsonl"
    with AuditWriter(log) as w, w.session(config={}, privacy=PRIVACY, seeded_secrets=False):
        w.release(1, dp_events=[event(1)], epsilon=eps([event(1)]))
        w.round(1, protocol=PROTO, result=result(1), epsilon=eps([event(1)]))
        # Round 2 released, then (a crash, a rerun) released again before its entry.
        w.release(2, dp_events=[event(2)], epsilon=eps([event(1), event(2)]))
        ledger = [event(1), event(2), event(2)]
        w.release(2, dp_events=[event(2)], epsilon=eps(ledger))
        w.round(2, protocol=PROTO, result=result(2), epsilon=eps(ledger))
    res = verify(log)
    assert res.ok, res.summary()
    assert [e["round"] for e in res.ledger] == [1, 2, 2] and res.epsilon == pytest.approx(eps(ledger))


def test_a_release_needs_privacy_events_and_a_round_not_yet_recorded(tmp_path):
    with AuditWriter(tmp_path / "a.jsonl") as w, w.session(config={}, privacy=PRIVACY, seeded_secrets=False):
        w.round(1, protocol=PROTO, result=result(1), dp_events=[event(1)], epsilon=eps([event(1)]))
        with pytest.raises(ConfigurationError, match="does not follow round 1"):
            w.release(1, dp_events=[event(1)], epsilon=1.0)
        with pytest.raises(ConfigurationError, match="DP events"):
            w.release(2, dp_events=[], epsilon=1.0)
    with (AuditWriter(tmp_path / "b.jsonl") as w, w.session(config={}, privacy=None, seeded_secrets=False),
          pytest.raises(ConfigurationError)):
        w.release(1, dp_events=[event(1)], epsilon=1.0)


def test_a_forged_release_or_epsilon_fails_verification(tmp_path):
    log = tmp_path / "audit.jsonl"
    with AuditWriter(log) as w, w.session(config={}, privacy=PRIVACY, seeded_secrets=False):
        w.release(1, dp_events=[event(1)], epsilon=eps([event(1)]))
        w.round(1, protocol=PROTO, result=result(1), epsilon=eps([event(1)]))
    entries = lines_of(log.read_bytes())
    release = next(e for e in entries if e["type"] == "release")
    release["body"]["dp"]["epsilon"] = 0.1  # a low claim, re-signed by the key holder: the recomputation refuses it
    log.write_bytes(resign(entries, log))
    assert any(f.field == "body.dp.epsilon" for f in verify(log).failures)
    # A release of a round already recorded (a round released after its entry) is refused.
    with AuditWriter(tmp_path / "c.jsonl") as w, w.session(config={}, privacy=PRIVACY, seeded_secrets=False):
        w.round(1, protocol=PROTO, result=result(1), dp_events=[event(1)], epsilon=eps([event(1)]))
    entries = lines_of((tmp_path / "c.jsonl").read_bytes())
    late = {**entries[1], "type": "release", "body": {"round": 1, "dp": {"events": [event(1)],
                                                                          "epsilon": eps([event(1)] * 2)}}}
    entries.insert(2, late)
    (tmp_path / "c.jsonl").write_bytes(resign(entries, tmp_path / "c.jsonl"))
    assert any(f.field == "body.round" for f in verify(tmp_path / "c.jsonl").failures)
