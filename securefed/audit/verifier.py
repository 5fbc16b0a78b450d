"""The offline verifier: schema, chain, signatures, round rules, protocol conditions and the privacy spend.

Trusts nothing in the log but what it checks: every failure names the entry (its
line number, counting from 1), the field, what was expected and what was found.
See ``protocols/audit.md`` section "Verification" and ``proofs/audit.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securefed.audit._history import History, parse_pins
from securefed.audit.keys import PublicKeyLike, load_public_key, public_hex
from securefed.audit.log import (
    GENESIS,
    KINDS,
    canonical,
    entry_hash,
    fast_check,
    iter_lines,
    parse_line,
    schema_errors,
    signed_bytes,
)
from securefed.errors import InvalidInput
from securefed.protocols.base import AggregationProtocol

__all__ = ["EPSILON_RTOL", "Failure", "VerificationResult", "verify", "verify_data"]

#: Relative tolerance between a claimed and a recomputed epsilon (accountants differ in the last digits
#: across library versions and platforms; any real misstatement is far larger).
EPSILON_RTOL = 1e-6
_MAX_SCHEMA_ERRORS = 5


@dataclasses.dataclass(frozen=True)
class Failure:
    """One failed check: the entry (line number, from 1), the field, what was expected, what was found."""

    entry: int
    field: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"entry {self.entry}: {self.field}: expected {self.expected}, found {self.found}"


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """The outcome of :func:`verify`; true when every check passed.

    ``entries``: complete lines read; ``rounds``/``aborted``/``skipped``: round, round_aborted and
    round_skipped entries; ``epsilon``: the privacy spend recomputed from the whole log's DP events
    (None without DP); ``privacy``: the declared accounting (accountant, delta, and
    optionally the RDP conversion); ``head``: hash of the last entry and ``head_seq`` its number
    (:attr:`pin` is both, ``"SEQ:SHA256"``, to pass as ``pinned`` next time);
    ``complete``: the log ends with run_end; ``ledger``: the DP events in order;
    ``seeded_secrets``: some session declared secrets derived from a public seed, so
    ``epsilon`` (the accounting of the events) does not describe a private run: it is void;
    ``checkpoint_counter``: the counter of the last checkpoint a session named (None if none);
    ``key_pinned``: the caller pinned the key (else it came from entry 1: integrity, not authorship).
    """

    failures: tuple[Failure, ...]
    entries: int
    rounds: int
    aborted: int
    last_round: int | None
    epsilon: float | None
    privacy: dict[str, Any] | None
    public_key: str | None
    head: str | None
    complete: bool
    ledger: tuple[dict[str, Any], ...]
    seeded_secrets: bool = False
    head_seq: int = 0
    checkpoint_counter: int | None = None
    key_pinned: bool = False
    skipped: int = 0

    @property
    def pin(self) -> str | None:
        """The head as ``"SEQ:SHA256"``: what an auditor keeps and passes as ``--pin`` next time."""
        return None if self.head is None else f"{self.head_seq}:{self.head}"

    @property
    def epsilon_void(self) -> bool:
        """True when the log declares DP but its noise and sampling came from a public seed."""
        return self.seeded_secrets and self.privacy is not None

    @property
    def delta(self) -> float | None:
        """The delta epsilon is reported at (None without DP)."""
        return None if self.privacy is None else float(self.privacy["delta"])

    @property
    def accountant(self) -> str | None:
        """The accountant that recomputed epsilon, ``"rdp"`` or ``"pld"`` (None without DP)."""
        return None if self.privacy is None else str(self.privacy["accountant"])

    @property
    def ok(self) -> bool:
        """True when the log passed every check."""
        return not self.failures

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        """One paragraph for people: the verdict and the facts it rests on, or every failure."""
        if not self.ok:
            return "\n".join([f"FAILED: {len(self.failures)} problem(s)"] + [f"  {f}" for f in self.failures])
        eps = "no differential privacy" if self.epsilon is None else (
            f"epsilon {self.epsilon:.6g} at delta {self.delta:g} ({self.accountant}, recomputed)")
        if self.seeded_secrets:
            eps += ("; SEEDED SECRETS: noise, sampling and protocol keys derived from a public seed, "
                    "so the epsilon is VOID and the aggregation was not secret (a simulation)")
        state = "complete" if self.complete else "incomplete (no run_end)"
        key = "pinned" if self.key_pinned else "NOT PINNED: taken from the log itself"
        counter = "" if self.checkpoint_counter is None else f"\n  checkpoint counter {self.checkpoint_counter}"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (f"OK: {self.entries} entries, {self.rounds} rounds ({self.aborted} aborted{skipped}), {state}; "
                f"{eps}\n"
                f"  public key {self.public_key} ({key})\n"
                f"  head       {self.pin}  (keep it; next time: --pin {self.pin})"
                + counter)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


@functools.lru_cache(maxsize=256)
def _problems(cls: type[AggregationProtocol], description: bytes) -> tuple[str, ...]:
    """``cls.check_description`` (a pure function) of a canonical description; rounds of one size repeat it."""
    return tuple(cls.check_description(json.loads(description)))


class _Epsilon:
    """The privacy spend of the events seen so far, recomputed with ``securefed.privacy``.

    Composes incrementally (what ``Accountant.from_ledger`` does for a whole ledger),
    so a log of R rounds costs R compositions, not R^2.
    """

    def __init__(self, privacy: dict[str, Any]) -> None:
        self.privacy = privacy
        self.ledger: list[dict[str, Any]] = []
        self.value = 0.0
        self._acc: Any = None

    def add(self, events: Sequence[dict[str, Any]]) -> float:
        if events:
            from securefed.privacy.accountant import Accountant
            from securefed.privacy.events import event_from_dict

            if self._acc is None:
                self._acc = Accountant(self.privacy["accountant"], **_conversion(self.privacy))
            self.ledger.extend(events)
            for event in events:
                self._acc.record(event_from_dict(event))
            self.value = float(self._acc.epsilon(self.privacy["delta"]))
        return self.value


def _conversion(privacy: dict[str, Any]) -> dict[str, Any]:
    return {"conversion": privacy["conversion"]} if "conversion" in privacy else {}


def _participation(body: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """``(field, expected, found)`` for each participation problem of a round entry: who took part, who dropped
    where, who is in the aggregate."""
    from securefed.protocols import REGISTRY

    phases, parts = body["phases"], body["participants"]
    members, included = set(parts), body["included"]
    cls = REGISTRY.get(body["protocol"]["protocol"])
    # The protocol's own definition when the record has its phases (a mismatch fails in _protocol).
    last = cls.input_phase_index() if cls is not None and list(cls.phases) == phases else len(phases) - 1
    input_phase = phases[last] if phases else ""
    if not included:
        yield ("body.included", "at least one participant in the aggregate", "none")
    for c in included:
        if c not in members:
            yield ("body.included", "participants of the round", c)
    dropped: dict[int, str] = {}
    for d in body["dropped"]:
        c = d["participant"]
        if c not in members:
            yield ("body.dropped", "participants of the round", c)
        if c in dropped:
            yield ("body.dropped", "one drop record per participant", f"two for {c}")
        if d["phase"] not in phases:
            yield ("body.dropped", f"a phase of {phases}", d["phase"])
        dropped[c] = d["phase"]
    unaccounted = members - set(included) - set(dropped)
    if unaccounted:
        yield ("body.dropped", "a drop record for every participant not in the aggregate",
               f"none for {sorted(unaccounted)}")
    sent: dict[str, set[int]] = {}
    for m in body["received"]:
        p = m["party"]
        if m["phase"] not in phases:
            yield ("body.received", f"a phase of {phases}", m["phase"])
        if isinstance(p, int):
            if p not in members:
                yield ("body.received", "messages from participants of the round", p)
            sent.setdefault(m["phase"], set()).add(p)
    # Phases where clients speak (up to the one carrying inputs): an included client spoke in each.
    for phase in phases[: last + 1]:
        if phase not in sent:
            continue
        for c in included:
            if c in dropped and phases.index(dropped[c]) <= phases.index(phase):
                continue  # reported once below
            if c not in sent[phase]:
                yield ("body.received", f"a message from included participant {c} in {phase}", "none")
    for c in included:
        if c in dropped and dropped[c] in phases and phases.index(dropped[c]) <= last:
            yield ("body.included", f"participants that passed every phase up to {input_phase}",
                   f"{c}, dropped in {dropped[c]}")
    survivors = len(members) - len(dropped)
    need = body["protocol"]["min_survivors"]
    if survivors < need:
        yield ("body.dropped", f"at least {need} participants surviving every phase (min_survivors)",
               f"{survivors}")


class _Checker:
    """Walks the entries once, in order, collecting failures."""

    def __init__(self, pubkey: Ed25519PublicKey | None, allow_incomplete: bool, allow_seeded: bool = False) -> None:
        self.failures: list[Failure] = []
        self.pinned = pubkey
        self.key: Ed25519PublicKey | None = pubkey
        self.key_hex = None if pubkey is None else public_hex(pubkey)
        self.allow_incomplete = allow_incomplete
        self.allow_seeded = allow_seeded
        self.seeded = False
        self.prev, self.seq = GENESIS, 1
        self.entries, self.rounds, self.aborted, self.skipped = 0, 0, 0, 0
        self.last_round: int | None = None
        self.last_type: str | None = None
        self.in_session = False
        self.torn = False
        self.privacy: Any = ...  # Ellipsis: not declared yet
        self.eps: _Epsilon | None = None
        self.eps_broken = False
        self.history = History()  # entry hashes, for pins and checkpoint heads

    def fail(self, entry: int, field: str, expected: Any, found: Any) -> None:
        self.failures.append(Failure(entry, field, _short(expected), _short(found)))

    # -- per entry ----------------------------------------------------------------------

    def entry(self, number: int, line: bytes) -> None:
        self.entries = number
        try:
            obj = parse_line(line, parse_constant=_reject_constant)  # refuses deep nesting (MAX_DEPTH)
        except (ValueError, UnicodeDecodeError) as e:
            self.fail(number, "(json)", "one JSON object per line", f"unparseable: {e}")
            self._advance(number, line, None)
            return
        if not isinstance(obj, dict):
            self.fail(number, "(json)", "a JSON object", type(obj).__name__)
            self._advance(number, line, None)
            return
        try:
            canonical_ok = canonical(obj) == line
        except ValueError:  # a number too large for a float parses as inf
            canonical_ok = False
        if not canonical_ok:
            self.fail(number, "(encoding)", "canonical JSON (sorted keys, no spaces, ASCII, finite numbers)",
                      "other bytes")
        kind = obj.get("type")
        valid = fast_check(kind)(obj) if isinstance(kind, str) and kind in KINDS else False
        if not valid:  # jsonschema, when installed, is the reference: it decides, and says what is wrong
            errors = schema_errors(obj, _MAX_SCHEMA_ERRORS)
            valid = not errors
            for field, rule, found in errors:
                self.fail(number, field, rule, found)
        self._advance(number, line, obj)
        if valid:
            self._semantics(number, obj)

    def _advance(self, number: int, line: bytes, obj: dict[str, Any] | None) -> None:
        """Chain, sequence number and signature; then move the chain to this line."""
        if obj is not None:
            seq, prev = obj.get("seq"), obj.get("prev")
            if seq != self.seq:
                self.fail(number, "seq", self.seq, seq)
            if prev != self.prev:
                self.fail(number, "prev", self.prev, prev)
            if number == 1:
                self._take_key(obj)
            self._signature(number, obj)
            if isinstance(seq, int) and not isinstance(seq, bool):
                self.seq = seq  # resynchronise: one deletion or insertion is reported once
        self.prev = entry_hash(line)
        self.history.append(self.prev)
        self.seq += 1

    def _take_key(self, obj: dict[str, Any]) -> None:
        body = obj.get("body")
        found = body.get("public_key") if isinstance(body, dict) else None
        if self.pinned is not None:
            if found != self.key_hex:
                self.fail(1, "body.public_key", f"the pinned key {self.key_hex}", found)
            return
        try:
            self.key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(found))  # type: ignore[arg-type]
            self.key_hex = found
        except (TypeError, ValueError):
            self.fail(1, "body.public_key", "64 hex digits (an Ed25519 key); signatures cannot be checked", found)

    def _signature(self, number: int, obj: dict[str, Any]) -> None:
        if self.key is None:
            return
        sig = obj.get("sig")
        try:
            self.key.verify(bytes.fromhex(sig), signed_bytes(obj))  # type: ignore[arg-type]
        except (InvalidSignature, TypeError, ValueError):
            self.fail(number, "sig", "a valid Ed25519 signature by the audit key", "invalid")

    # -- meaning ------------------------------------------------------------------------

    def _semantics(self, number: int, obj: dict[str, Any]) -> None:
        kind, body = obj["type"], obj["body"]
        if number == 1 and kind != "run_start":
            self.fail(number, "type", "run_start as the first entry", kind)
        if kind == "run_start":
            if number != 1:
                self.fail(number, "type", "run_start only as the first entry", kind)
            self._session(number, body)
        elif kind == "resume":
            if body["public_key"] != self.key_hex:
                self.fail(number, "body.public_key", f"the log's key {self.key_hex}", body["public_key"])
            self._session(number, body)
        elif kind == "run_end":
            self._need_session(number, kind)
            self._run_end(number, body)
            self.in_session = False
        elif kind == "release":
            self._need_session(number, kind)
            if self.last_round is not None and body["round"] <= self.last_round:
                self.fail(number, "body.round", f"a release of a round after {self.last_round}", body["round"])
            self._dp(number, body["dp"])
        elif kind == "round_skipped":
            self._need_session(number, kind)
            self._skipped(number, body)
        else:
            self._need_session(number, kind)
            self._round_number(number, body["round"])
            self._round_common(number, body)
            self._round_counter(number, body.get("checkpoint_counter"))
            if kind == "round":
                self.rounds += 1
                self._round(number, body)
            else:
                self.aborted += 1
                if body["phase"] is not None and body["phase"] not in body["phases"]:
                    self.fail(number, "body.phase", f"one of {body['phases']}", body["phase"])
            self._dp(number, body["dp"])
        self.last_type = kind

    def _session(self, number: int, body: dict[str, Any]) -> None:
        """run_start or resume: privacy, secrets, and the checkpoint the session continued from."""
        self._declare_privacy(number, body["privacy"])
        self._secrets(number, body)
        checkpoint = body.get("checkpoint")
        for field, expected, found in self.history.checkpoint_problems(checkpoint, number):
            self.fail(number, field, expected, found)
        self.history.take_checkpoint(checkpoint, number)
        self.in_session = True

    def _need_session(self, number: int, kind: str) -> None:
        if not self.in_session:
            self.fail(number, "type", "run_start or resume before " + kind, f"{kind} after run_end")

    def _secrets(self, number: int, body: dict[str, Any]) -> None:
        """A session whose secrets derive from a public seed voids the log's epsilon (and its secrecy)."""
        if body.get("seeded_secrets") is not True:
            return
        self.seeded = True
        if not self.allow_seeded:
            self.fail(number, "body.seeded_secrets",
                      "secrets from the OS (seeded ones void the epsilon; allow_seeded accepts a simulation)", True)

    def _declare_privacy(self, number: int, privacy: Any) -> None:
        if self.privacy is ...:
            self.privacy = privacy
            if privacy is not None:
                self.eps = _Epsilon(privacy)
        elif privacy != self.privacy:
            self.fail(number, "body.privacy", f"the privacy settings of entry 1 {_short(self.privacy)}", privacy)

    def _round_counter(self, number: int, counter: int | None) -> None:
        """A round's checkpoint counter never goes below the log's last one (resume or round)."""
        if counter is None:
            return
        last = self.history.counter
        if last is not None and counter < last:
            self.fail(number, "body.checkpoint_counter", f"at least {last}, the log's last checkpoint counter", counter)
        self.history.counter, self.history.counter_entry = int(counter), number

    def _round_number(self, number: int, r: int) -> None:
        if self.last_round is not None and r <= self.last_round:
            self.fail(number, "body.round", f"a round after {self.last_round}", r)
        self.last_round = r if self.last_round is None else max(r, self.last_round)

    def _round_common(self, number: int, body: dict[str, Any]) -> None:
        """Parameters: the description matches the round and meets its protocol's conditions."""
        from securefed.protocols import REGISTRY

        desc, phases, n = body["protocol"], body["phases"], len(body["participants"])
        if desc["n"] != n:
            self.fail(number, "body.protocol.n", f"{n} (the round's participants)", desc["n"])
        cls = REGISTRY.get(desc["protocol"])
        if cls is None:
            self.fail(number, "body.protocol.protocol",
                      f"a protocol of securefed.protocols.REGISTRY {sorted(REGISTRY)}",
                      desc["protocol"])
            return
        if cls.phases and list(cls.phases) != phases:
            self.fail(number, "body.phases", list(cls.phases), phases)
        if n == 0:
            return  # an empty sample (Poisson sampling under DP): no round ran, no parameters were used
        for problem in _problems(cls, canonical(desc)):
            self.fail(number, "body.protocol", f"parameters meeting the conditions of {desc['protocol']}", problem)

    def _skipped(self, number: int, body: dict[str, Any]) -> None:
        """A round that did not run: numbered and counted like any round, no parameters, and no spend."""
        self._round_number(number, body["round"])
        self._round_counter(number, body.get("checkpoint_counter"))
        self.skipped += 1
        dp = body["dp"]
        if dp is not None and dp["events"]:
            self.fail(number, "body.dp.events", "none (a skipped round releases and spends nothing)",
                      f"{len(dp['events'])} event(s)")
            dp = {**dp, "events": []}  # not composed: the claimed epsilon must still be the log's spend so far
        self._dp(number, dp)

    def _round(self, number: int, body: dict[str, Any]) -> None:
        for field, expected, found in _participation(body):
            self.fail(number, field, expected, found)

    def _dp(self, number: int, dp: Any) -> None:
        if self.eps is None:
            if dp is not None:
                self.fail(number, "body.dp", "null (the log declares no differential privacy)", dp)
            return
        if dp is None:
            self.fail(number, "body.dp", "DP events and the epsilon spent (the log declares privacy)", None)
            return
        if self.eps_broken:
            return  # already reported: no later epsilon can be recomputed
        try:
            value = self.eps.add(dp["events"])
        except Exception as e:  # noqa: BLE001 - any refusal of the accountant is a failed check
            self.fail(number, "body.dp.events", "events that securefed.privacy (securefed[dp]) can account",
                      f"{type(e).__name__}: {e}")
            self.eps_broken = True
            return
        if not math.isclose(dp["epsilon"], value, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
            self.fail(number, "body.dp.epsilon", f"{value!r} (recomputed)", dp["epsilon"])

    def _run_end(self, number: int, body: dict[str, Any]) -> None:
        if body["rounds"] != self.rounds:
            self.fail(number, "body.rounds", self.rounds, body["rounds"])
        if body["last_round"] != self.last_round:
            self.fail(number, "body.last_round", self.last_round, body["last_round"])
        if self.eps_broken:
            return
        eps = None if self.eps is None else self.eps.value
        claimed = body["epsilon"]
        if (eps is None) != (claimed is None) or (
            eps is not None and not math.isclose(claimed, eps, rel_tol=EPSILON_RTOL, abs_tol=1e-12)
        ):
            self.fail(number, "body.epsilon", f"{eps!r} (recomputed)", claimed)

    def result(self, head: str | None, pinned: Sequence[tuple[int, str]] = (),
               min_counter: int | None = None) -> VerificationResult:
        if self.entries == 0:
            self.fail(1, "type", "run_start as the first entry", "an empty log")
        complete = self.last_type == "run_end" and not self.in_session
        if self.entries and not complete and not self.allow_incomplete and not self.torn:
            self.fail(self.entries + 1, "type", "a run_end entry closing the log",
                      f"the end of the log after {self.last_type}: the run crashed or the log was cut "
                      "(verify the prefix with allow_incomplete)")
        actual_head = self.prev if self.entries else None
        if head is not None and head != actual_head:
            self.fail(max(self.entries, 1), "(head)", f"the pinned head {head}", actual_head)
        for failure in self.history.witness_problems(pinned, min_counter, self.entries):
            self.fail(*failure)
        return VerificationResult(
            failures=tuple(self.failures), entries=self.entries, rounds=self.rounds, aborted=self.aborted,
            last_round=self.last_round, epsilon=None if self.eps is None or self.eps_broken else self.eps.value,
            privacy=None if self.eps is None else self.eps.privacy, public_key=self.key_hex,
            head=actual_head, complete=complete,
            ledger=tuple(self.eps.ledger) if self.eps is not None else (), seeded_secrets=self.seeded,
            head_seq=len(self.history), checkpoint_counter=self.history.counter, key_pinned=self.pinned is not None,
            skipped=self.skipped,
        )


def verify_data(
    data: bytes, pubkey: PublicKeyLike | None = None, *, allow_incomplete: bool = False, head: str | None = None,
    allow_seeded: bool = False, pinned: Sequence[tuple[int, str] | str] = (), min_counter: int | None = None,
) -> VerificationResult:
    """:func:`verify` on the bytes of a log."""
    pins = parse_pins(pinned)
    if min_counter is not None and (isinstance(min_counter, bool) or not isinstance(min_counter, int)):
        raise InvalidInput(f"min_counter must be an integer, got {min_counter!r}")
    checker = _Checker(None if pubkey is None else load_public_key(pubkey), allow_incomplete, allow_seeded)
    for number, line, complete in iter_lines(data):
        if not complete:
            checker.entries, checker.torn = number, True
            checker.fail(number, "(line)", "an entry ended by a newline",
                         f"{len(line)} bytes without one (a torn write or a cut log)")
            break
        checker.entry(number, line)
    return checker.result(head, pins, min_counter)


def verify(
    path: str | os.PathLike[str],
    pubkey: PublicKeyLike | None = None,
    *,
    allow_incomplete: bool = False,
    head: str | None = None,
    allow_seeded: bool = False,
    pinned: Sequence[tuple[int, str] | str] = (),
    min_counter: int | None = None,
) -> VerificationResult:
    """Check the audit log at `path` end to end; the result is true only if every check passed.

    `pubkey` pins the server's audit key (a key, 64 hex digits, or a PEM/hex file);
    without it the key in entry 1 is used, which proves integrity but not authorship.
    `allow_incomplete` accepts a log without a final run_end (a crashed or running
    job); `head` pins the hash of the last entry, which detects a cut log. `pinned`: heads an
    auditor saw earlier, ``(seq, sha256)`` pairs or ``"SEQ:SHA256"`` (:attr:`VerificationResult.pin`):
    the log must hold entry SEQ with that hash, so a log cut below it and regrown (a rollback
    together with an older checkpoint) fails; `min_counter`: the last checkpoint counter named in
    the log must be at least this (a counter witnessed outside the log). A session that
    declares ``seeded_secrets`` (noise, sampling and keys from a public seed) fails the check:
    its epsilon is void; `allow_seeded` accepts such a simulation's log (``seeded_secrets`` and
    :meth:`VerificationResult.summary` still say the epsilon is void).
    Raises InvalidInput when the file cannot be read or a pin is malformed, and ConfigurationError
    for a bad `pubkey`. See ``protocols/audit.md`` sections "Verification" and "Trust boundaries".
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read the audit log {os.fspath(path)!r}: {e.strerror or e}") from e
    return verify_data(data, pubkey, allow_incomplete=allow_incomplete, head=head, allow_seeded=allow_seeded,
                       pinned=pinned, min_counter=min_counter)

