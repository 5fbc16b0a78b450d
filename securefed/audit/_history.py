"""The hashes of a log's entries by position, and the rules a checkpoint reference obeys.

Shared by the verifier (which reports a broken rule as a failure) and the writer (which refuses,
before writing, a ``resume`` the verifier would reject). A ``run_start`` or ``resume`` may name
the checkpoint the run continued from: ``{"round", "counter", "head": {"seq", "sha256"}}``.
See ``protocols/audit.md`` sections "Entries" and "Trust boundaries".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from securefed.audit.log import GENESIS
from securefed.errors import InvalidInput

__all__ = ["History", "checkpoint_record", "parse_pin", "parse_pins"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


class History:
    """Entry hashes (32 bytes each, entry k at position k) and the last checkpoint counter seen."""

    def __init__(self) -> None:
        self._digests = bytearray()
        #: The counter of the last checkpoint named in the log, and the entry that named it.
        self.counter: int | None = None
        self.counter_entry: int | None = None

    def __len__(self) -> int:
        return len(self._digests) // 32

    def append(self, sha256_hex: str) -> None:
        self._digests += bytes.fromhex(sha256_hex)

    def hash_of(self, seq: int) -> str | None:
        """The hash of entry `seq` (GENESIS for 0, the empty log's head), None beyond the log."""
        seq = int(seq)  # the schema's integers include 3.0
        if seq == 0:
            return GENESIS
        if 1 <= seq <= len(self):
            return self._digests[32 * (seq - 1): 32 * seq].hex()
        return None

    def mismatch(self, seq: int, sha256: str, before: int | None = None) -> str | None:
        """None when entry `seq` (< `before`, if given) has hash `sha256`, else what the log has there."""
        found = self.hash_of(seq) if before is None or seq < before else None
        if found is None:
            if before:
                return f"no entry {seq} before entry {before}"
            return f"no entry {seq}: the log has {len(self)} entries"
        return None if found == sha256 else f"entry {seq} has hash {found}"

    def checkpoint_problems(self, checkpoint: Mapping[str, Any] | None, entry: int) -> list[tuple[str, str, Any]]:
        """``(field, expected, found)`` for each rule broken by the checkpoint that `entry` names.

        The counter exceeds every earlier checkpoint's (a restored older checkpoint repeats or
        lowers it), and the head it recorded is an entry already in this log with that hash (else
        the checkpoint belongs to another history, or the log was cut below it).
        """
        if checkpoint is None:
            return []
        out: list[tuple[str, str, Any]] = []
        counter, head = checkpoint["counter"], checkpoint["head"]
        if self.counter is not None and counter <= self.counter:
            named = f" (entry {self.counter_entry})" if self.counter_entry else ""
            out.append(("body.checkpoint.counter", (f"a counter above {self.counter}, the log's last checkpoint "
                        f"counter{named}: counters only grow (else an older checkpoint was restored)"), counter))
        problem = self.mismatch(head["seq"], head["sha256"], before=entry)
        if problem is not None:
            out.append(("body.checkpoint.head",
                        (f"an earlier entry of this log: {head['seq']}:{head['sha256']} (else the checkpoint "
                        "belongs to another history, or the log was cut below it)"), problem))
        return out

    def witness_problems(self, pinned: Sequence[tuple[int, str]], min_counter: int | None,
                         entries: int) -> list[tuple[int, str, str, Any]]:
        """``(entry, field, expected, found)`` for each head or counter the auditor saw outside the log
        and the log does not extend (a log cut and regrown, or rewritten, or an older checkpoint)."""
        out: list[tuple[int, str, str, Any]] = []
        for seq, sha in pinned:
            problem = self.mismatch(seq, sha)
            if problem is not None:
                out.append((max(seq, 1), "(pin)", (f"entry {seq} with the pinned hash {sha} (the log extends the "
                            "history the auditor saw; else it was cut and regrown, or rewritten)"), problem))
        if min_counter is not None and (self.counter is None or self.counter < min_counter):
            out.append((self.counter_entry or max(entries, 1), "(counter)",
                        (f"a last checkpoint counter of at least {min_counter} (witnessed outside the log; "
                        "else an older checkpoint was restored)"), self.counter))
        return out

    def take_checkpoint(self, checkpoint: Mapping[str, Any] | None, entry: int) -> None:
        if checkpoint is not None:
            self.counter, self.counter_entry = int(checkpoint["counter"]), entry


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """`checkpoint` as the log records it; InvalidInput for a field of the wrong type or range."""
    try:
        head = checkpoint["head"]
        record = {"round": checkpoint["round"], "counter": checkpoint["counter"],
                  "head": {"seq": head["seq"], "sha256": head["sha256"]}}
    except (KeyError, TypeError) as e:
        raise InvalidInput("checkpoint must be {'round': int, 'counter': int, 'head': {'seq': int, 'sha256': "
                           f"64 hex digits}}}} (AuditWriter.head when it was saved); got {checkpoint!r}") from e
    for name, value in (("round", record["round"]), ("counter", record["counter"]), ("head.seq", head["seq"])):
        if not _natural(value):
            raise InvalidInput(f"checkpoint {name} must be an integer >= 0, got {value!r}")
    if not isinstance(head["sha256"], str) or not _HEX64.fullmatch(head["sha256"]):
        raise InvalidInput(f"checkpoint head.sha256 must be 64 lowercase hex digits, got {head['sha256']!r}")
    return record


def parse_pin(text: str) -> tuple[int, str]:
    """``"SEQ:SHA256"`` (as ``audit verify`` prints the head) as ``(seq, sha256)``; InvalidInput otherwise."""
    seq, sep, digest = str(text).strip().partition(":")
    if not sep or not seq.isdigit() or not _HEX64.fullmatch(digest.lower()):
        raise InvalidInput(f"a pin is SEQ:SHA256 (an entry number and 64 hex digits, as verify prints the head), "
                           f"got {text!r}")
    return int(seq), digest.lower()


def parse_pins(pins: Sequence[tuple[int, str] | str]) -> list[tuple[int, str]]:
    """Pins given as ``(seq, sha256)`` pairs or ``"SEQ:SHA256"`` strings, checked (InvalidInput)."""
    out = []
    for pin in pins:
        if isinstance(pin, str):
            out.append(parse_pin(pin))
            continue
        try:
            seq, digest = pin
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"a pin is a pair (seq, sha256) or 'SEQ:SHA256', got {pin!r}") from e
        if not _natural(seq) or not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
            raise InvalidInput(f"a pin is (entry number >= 0, 64 hex digits), got {pin!r}")
        out.append((seq, digest.lower()))
    for seq, digest in out:
        if seq == 0 and digest != GENESIS:
            raise InvalidInput(f"pin 0:{digest}: entry 0 is the empty log, whose head is {GENESIS}")
    return out
