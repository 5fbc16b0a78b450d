"""The report's privacy row: with Poisson-sampled events (q < 1), the epsilon without amplification too,
recomputed from the ledger (protocols/dp.md section 1)."""

import dataclasses
import re

import pytest

from securefed.audit import render_report
from securefed.audit.keys import key_paths
from securefed.privacy.accountant import Accountant
from securefed.privacy.events import GaussianEvent, event_from_dict
from tests.audit.helpers import write_log
from tests.audit.test_report import Page

PATTERN = r"epsilon without amplification by sampling ([0-9.e+-]+)"


def test_report_shows_the_unamplified_epsilon_of_a_sampled_ledger(dp_log, tmp_path):
    out = tmp_path / "report.html"
    res = render_report(dp_log, out, pubkey=key_paths(dp_log)[1])
    assert res.ok, res.summary()
    text = " ".join(Page(out.read_text()).text)
    (shown,) = re.findall(PATTERN, text)
    acc = Accountant("rdp")
    for entry in res.ledger:  # q = 0.5 in the log; rebuilt at q = 1
        acc.record(dataclasses.replace(event_from_dict(entry), sampling_rate=1.0))
    assert float(shown) == pytest.approx(acc.epsilon(1e-5), rel=1e-5)
    assert float(shown) > res.epsilon


def test_report_of_an_unsampled_ledger_has_no_second_figure(tmp_path):
    acc = Accountant("rdp")

    def dp(r):
        event = GaussianEvent(noise_multiplier=1.1, round=r, num_clients=4)
        acc.record(event)
        return [event.to_dict()], acc.epsilon(1e-5)

    path = tmp_path / "q1.jsonl"
    write_log(path, rounds=3, privacy={"accountant": "rdp", "delta": 1e-5}, dp=dp)
    out = tmp_path / "q1.html"
    res = render_report(path, out)
    assert res.ok and res.epsilon is not None, res.summary()
    text = " ".join(Page(out.read_text()).text)
    assert "epsilon " in text and not re.findall(PATTERN, text)
