"""Helpers for the audit tests: small logs, a thresholded test protocol, and an operator's re-signing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import securefed as sf
from securefed.audit import AuditWriter
from securefed.audit.keys import key_paths, load_or_create_key
from securefed.audit.log import GENESIS, canonical, entry_hash, signed_bytes


class ThresholdPlain(sf.protocols.Plain):
    """Plain with a declared threshold and corrupt fraction, checked like a curious-server SecAgg.

    Test-only: it lets the verifier's parameter checks be exercised with the cheapest protocol.
    """

    name = "test-threshold"

    def __init__(self, threshold: int = 3, corrupt_fraction: float = 0.2) -> None:
        self.threshold, self.corrupt_fraction = threshold, corrupt_fraction

    def describe(self, n):
        return {**super().describe(n), "threshold": self.threshold, "corrupt_fraction": self.corrupt_fraction}

    @classmethod
    def check_description(cls, desc):
        bound = math.ceil(desc["corrupt_fraction"] * desc["n"])
        if desc["threshold"] <= bound:
            return [f"threshold {desc['threshold']} <= ceil(gamma n) = {bound}"]
        return []


def write_log(path: Path, *, rounds: int = 3, n: int = 4, protocol=None, dropouts=None, privacy=None,
              dp=None, end: bool = True, participants=None) -> AuditWriter:
    """A log of `rounds` rounds of `protocol` over n clients (closed; returns the writer)."""
    protocol = protocol or sf.protocols.Plain()
    w = AuditWriter(path)
    w.start(config={"test": True}, privacy=privacy)
    for r in range(1, rounds + 1):
        xs = [np.full(3, (i + r) / 100) for i in range(n)]  # inside the default value range of every protocol
        res = sf.simulate_aggregation(protocol, xs, dropouts=(dropouts or {}).get(r), seed=r, record="digest")
        events, eps = dp(r) if dp else ((), None)
        w.round(r, protocol=protocol, result=res, participants=participants, dp_events=events, epsilon=eps,
                metrics={"loss": 1.0 / r, "eval_accuracy": 0.5 + r / 100})
    if end:
        w.end()
    w.close()
    return w


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def join(entries: list[dict]) -> bytes:
    return b"".join(canonical(e) + b"\n" for e in entries)


def resign(entries: list[dict], log: Path) -> bytes:
    """The log the operator (who holds ``LOG.key``) would write for `entries`: renumbered, chained, signed."""
    key = load_or_create_key(log, key_paths(log)[0])
    prev, out = GENESIS, []
    for i, e in enumerate(entries, 1):
        e = {k: v for k, v in e.items() if k != "sig"}
        e["seq"], e["prev"] = i, prev
        e["sig"] = key.sign(signed_bytes(e)).hex()
        line = canonical(e)
        out.append(line + b"\n")
        prev = entry_hash(line)
    return b"".join(out)
