"""Writing the audit log: one signed, chained, fsynced line per event; resume continues the chain.

Used by :class:`securefed.Trainer` (``audit_log=PATH``) and by the Flower server;
any runtime that has an :class:`~securefed.protocols.AggregationResult` per round
can use it. See ``protocols/audit.md`` section "Writing".
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import secrets
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from securefed.audit._history import History, checkpoint_record
from securefed.audit.keys import KeyLike, load_or_create_key, open_log, prepare_log_path, public_hex
from securefed.audit.log import (
    FORMAT_VERSION,
    GENESIS,
    canonical,
    entry_hash,
    fast_check,
    iter_lines,
    json_safe,
    schema_errors,
    signed_bytes,
)
from securefed.audit.verifier import verify_data
from securefed.errors import ConfigurationError, InvalidInput, ProtocolAborted
from securefed.protocols.base import AggregationProtocol, AggregationResult, Party

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["AuditWriter", "software_versions"]

_PACKAGES = ("numpy", "torch", "cryptography", "dp-accounting", "tenseal", "flwr", "numba")


def software_versions() -> dict[str, str]:
    """Versions of securefed, Python, the platform and the installed libraries it uses."""
    from securefed import __version__

    out = {"securefed": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_round(round_index: int, last: int | None, in_session: bool) -> None:
    if not in_session:
        raise ConfigurationError("no audit session is open: call start first")
    if isinstance(round_index, bool) or not isinstance(round_index, (int, np.integer)) or round_index < 1:
        raise InvalidInput(f"round must be a positive integer, got {round_index!r}")
    if last is not None and round_index <= last:
        raise ConfigurationError(f"round {round_index} does not follow round {last} in the audit log")


def _round_counter(counter: int, last: int | None) -> int:
    if isinstance(counter, bool) or not isinstance(counter, (int, np.integer)) or counter < 1:
        raise InvalidInput(f"checkpoint_counter must be a positive integer, got {counter!r}")
    if last is not None and counter < last:
        raise ConfigurationError(f"checkpoint counter {counter} is below the log's last one, {last}: an older "
                                 "checkpoint is in use")
    return int(counter)


def _round_fields(result: AggregationResult, parts: list[int], released: np.ndarray | None,
                  metrics: Mapping[str, float | None] | None) -> dict[str, Any]:
    """A round entry's participation, digests, aggregate digest (of what was released) and metrics."""

    def pid(c: Party) -> int | str:
        return int(parts[c]) if isinstance(c, (int, np.integer)) else str(c)

    total = np.ascontiguousarray(result.total if released is None else released, dtype="<f8")
    return {
        "included": sorted(pid(c) for c in result.included),
        "dropped": [{"participant": pid(c), "phase": d.phase, "reason": d.reason.value, "detail": d.detail}
                    for c, d in sorted(result.dropped.items(), key=lambda item: pid(item[0]))],
        "received": [{"party": pid(p), "phase": ph, "sha256": h, "size": int(size)}
                     for p, ph, h, size in result.server_view.digests],
        "aggregate": {"sha256": hashlib.sha256(total.data).hexdigest(), "dim": int(total.size), "dtype": "<f8"},
        "metrics": json_safe(dict(metrics or {})),
    }


class AuditWriter:
    """Appends the entries of an audit log at `path`, signed with the server's audit key.

    `key` is an Ed25519 private key or a PEM file; by default ``PATH.key`` (created
    with ``PATH.pub`` for a new log, see :mod:`securefed.audit.keys`). An existing log
    is verified with that key and continued: a torn last line (a crash mid-write) is
    cut off and recorded in the ``resume`` entry. The file is locked while open.

    Entries, one method each: :meth:`start` (run_start, or resume for an existing
    log), :meth:`round`, :meth:`round_aborted`, :meth:`end` (run_end); :meth:`session`
    wraps start and end. :attr:`head` is the log's head ``(seq, sha256)``, for a checkpoint
    to record when it is saved (and name again through ``start(checkpoint=...)``). Raises
    ConfigurationError when the existing log does not verify, the key does not match, or
    another writer holds the log.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: KeyLike | None = None) -> None:
        self.path = prepare_log_path(path)  # its folder created when missing
        self._key = load_or_create_key(self.path, key)
        #: The audit key's public half, 64 hex digits (as entry 1 records it).
        self.public_key = public_hex(self._key)
        self._fd = open_log(self.path)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as e:
                    raise ConfigurationError(f"another writer holds the audit log {self.path}; close it first") from e
            self._load()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        cut = data.rfind(b"\n") + 1
        torn = data[cut:]
        self._discarded = (len(torn), hashlib.sha256(torn).hexdigest() if torn else None)
        self.resumed = cut > 0
        #: DP events already in the log, in order (restore an accountant from it on resume).
        self.ledger: list[dict[str, Any]] = []
        self._prev, self._seq, self._rounds = GENESIS, 1, 0
        self._history = History()  # entry hashes and the last checkpoint counter, for start(checkpoint=)
        #: The last round recorded (None before any).
        self.last_round: int | None = None
        self._privacy: Any = ...
        self._epsilon: float | None = None
        if self.resumed:
            res = verify_data(data[:cut], self._key.public_key(), allow_incomplete=True, allow_seeded=True)
            if not res.ok:
                raise ConfigurationError(
                    f"the audit log {self.path} does not verify, refusing to append to it:\n{res.summary()}"
                )
            self._prev, self._seq, self._rounds = res.head or GENESIS, res.entries + 1, res.rounds
            self.last_round, self.ledger, self._epsilon = res.last_round, list(res.ledger), res.epsilon
            self._privacy = res.privacy
            for _, line, _ in iter_lines(data[:cut]):
                self._history.append(entry_hash(line))
            self._history.counter = res.checkpoint_counter
        if torn:
            os.ftruncate(self._fd, cut)
            os.fsync(self._fd)
        elif not self.resumed:
            _fsync_dir(self.path)
        #: True between :meth:`start` and :meth:`end`.
        self.in_session = False

    # -- entries --------------------------------------------------------------------------

    def _append(self, kind: str, body: dict[str, Any]) -> None:
        if self._fd < 0:
            raise ConfigurationError(f"the audit log {self.path} is closed")
        entry = {"v": FORMAT_VERSION, "seq": self._seq, "type": kind, "time": _now(), "prev": self._prev, "body": body}
        try:
            entry["sig"] = self._key.sign(signed_bytes(entry)).hex()
            line = canonical(entry)
        except ValueError as e:
            raise InvalidInput(f"audit entry {kind!r} is not JSON without NaN/Inf: {e}") from e
        if not fast_check(kind)(entry):  # the compiled check: a plain install has no jsonschema
            problems = "; ".join(f"{field}: expected {rule}, found {found!r}" for field, rule, found in
                                 schema_errors(entry)) or "rejected by the compiled check"
            raise InvalidInput(f"audit entry {kind!r} does not match the audit schema (securefed/audit/schema.json): "
                               f"{problems}")
        view = memoryview(line + b"\n")
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self._prev, self._seq = entry_hash(line), self._seq + 1
        self._history.append(self._prev)

    def entry_hash(self, seq: int) -> str | None:
        """The hash of entry `seq` of this log as the writer read and wrote it (None beyond the log):
        never re-read from the path, which may have been swapped since it was opened."""
        return self._history.hash_of(seq)

    @property
    def checkpoint_counter(self) -> int | None:
        """The counter of the last checkpoint a ``resume`` (or ``run_start``) entry of the log named, or None."""
        return self._history.counter

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the last entry written or loaded; ``(0, GENESIS)`` for an empty log.

        A checkpoint records it when saved, and a run resumed from that checkpoint passes it back
        in ``start(checkpoint=...)``; an auditor pins it (``audit verify --pin SEQ:SHA256``).
        """
        return self._seq - 1, self._prev

    def start(
        self, *, config: Mapping[str, Any], privacy: Mapping[str, Any] | None = None,
        seeded_secrets: bool | None = None, checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Begin a session: run_start for a new log, resume for an existing one.

        `config`: the run's configuration (JSON-able); `privacy`: ``{"accountant":
        "rdp"|"pld", "delta": float}`` (and ``"conversion"`` for a non-default RDP
        conversion) when rounds carry DP events, fixed for the log's life;
        `seeded_secrets`: whether the session's noise, sampling and protocol keys derive
        from a public seed (recorded as ``seeded_secrets``; the verifier then declares the
        epsilon void); None records nothing (a runtime that does not say).
        `checkpoint`: the checkpoint this run continues from, ``{"round": int, "counter": int,
        "head": {"seq": int, "sha256": str}}`` (its last round, its monotonic counter, and
        :attr:`head` as it was when the checkpoint was saved), recorded in the entry.
        Raises ConfigurationError inside a session, when `privacy` differs from what the log
        declared, or when the checkpoint does not continue this log: its counter does not exceed
        the log's last checkpoint counter (an older checkpoint was restored) or its head is not
        an entry of this log (another history, or a log cut below it); InvalidInput for a
        malformed checkpoint. See ``protocols/audit.md`` section "Trust boundaries".
        """
        if seeded_secrets is not None and not isinstance(seeded_secrets, bool):
            raise ConfigurationError(f"seeded_secrets must be True, False or None, got {seeded_secrets!r}")
        if self.in_session:
            raise ConfigurationError("an audit session is already open: end it first")
        priv = None if privacy is None else json_safe(dict(privacy))
        common = {"public_key": self.public_key, "software": software_versions(), "config": json_safe(config),
                  "privacy": priv}
        if seeded_secrets is not None:
            common["seeded_secrets"] = seeded_secrets
        if self._privacy is not ... and priv != self._privacy:
            raise ConfigurationError(f"the audit log declares privacy {self._privacy}, this run {priv}; "
                                     "they must match")
        if checkpoint is not None:
            common["checkpoint"] = record = checkpoint_record(checkpoint)
            problems = self._history.checkpoint_problems(record, self._seq)
            if problems:
                raise ConfigurationError(
                    f"the checkpoint (round {record['round']}, counter {record['counter']}) does not continue the "
                    f"audit log {self.path}: " + "; ".join(f"{field}: expected {expected}, found {found}"
                                                         for field, expected, found in problems)
                    + ". Restore the checkpoint and log that belong together, or start a new log")
        if self._seq == 1:
            self._append("run_start", {"run_id": secrets.token_hex(16), **common})
            self._epsilon = None if priv is None else 0.0
        else:
            count, digest = self._discarded
            self._append("resume", {**common, "discarded_bytes": count, "discarded_sha256": digest})
            self._discarded = (0, None)
        self._privacy = priv
        self._history.take_checkpoint(checkpoint, self._seq - 1)
        self.in_session = True

    def _dp(self, events: Sequence[Mapping[str, Any]], epsilon: float | None) -> dict[str, Any] | None:
        if self._privacy is None:
            if events or epsilon is not None:
                raise ConfigurationError("DP events in a log started without privacy settings: pass privacy to start")
            return None
        if epsilon is None:
            raise ConfigurationError("the log declares privacy: every round must claim the epsilon spent so far")
        evs = [json_safe(e) for e in events]
        self.ledger.extend(evs)
        self._epsilon = float(epsilon)
        return {"events": evs, "epsilon": float(epsilon)}

    def _round_head(self, round_index: int, protocol: AggregationProtocol,
                    participants: Sequence[int]) -> dict[str, Any]:
        _check_round(round_index, self.last_round, self.in_session)
        return {"round": int(round_index), "protocol": json_safe(protocol.describe(len(participants))),
                "phases": list(protocol.phases), "participants": [int(p) for p in participants]}

    def round(
        self,
        round_index: int,
        *,
        protocol: AggregationProtocol,
        result: AggregationResult,
        participants: Sequence[int] | None = None,
        dp_events: Sequence[Mapping[str, Any]] = (),
        epsilon: float | None = None,
        metrics: Mapping[str, float | None] | None = None,
        released: np.ndarray | None = None,
        checkpoint_counter: int | None = None,
    ) -> None:
        """Record a finished round: parameters, who took part and dropped, digests, aggregate, DP.

        `participants[i]` is the id of the protocol's client i (default: i);
        `dp_events` are this round's new ledger entries and `epsilon` the spend of the
        whole log so far; `released`: what the server released when it differs from
        ``result.total`` (the noised sum under central DP: the log never holds a digest of
        the un-noised sum, which would confirm guesses about it). Raises
        InvalidInput/ConfigurationError for inconsistent input.
        """
        parts = list(range(result.spec.n)) if participants is None else list(participants)
        if len(parts) != result.spec.n:
            raise InvalidInput(f"{len(parts)} participant ids for a round of {result.spec.n} clients")
        body = self._round_head(round_index, protocol, parts)
        body.update(_round_fields(result, parts, released, metrics))
        self._counter(body, checkpoint_counter)
        body["dp"] = self._dp(dp_events, epsilon)
        self._append("round", body)
        self._rounds, self.last_round = self._rounds + 1, int(round_index)

    def _counter(self, body: dict[str, Any], counter: int | None) -> None:
        """Record the counter of the checkpoint holding the round: it never goes below the log's last one, so
        a checkpoint whose commit the log has seen cannot be swapped for an older branch with the same counter."""
        if counter is not None:
            body["checkpoint_counter"] = self._history.counter = _round_counter(counter, self._history.counter)

    def release(self, round_index: int, *, dp_events: Sequence[Mapping[str, Any]], epsilon: float) -> None:
        """Record, ahead of round `round_index`'s entry, that its aggregate was released: `dp_events`
        (at least one) are composed now and `epsilon` is the whole log's spend with them. A server that
        crashes before the round's entry has still logged what it spent (``protocols/audit.md``)."""
        _check_round(round_index, self.last_round, self.in_session)
        if self._privacy is None or not dp_events:
            raise ConfigurationError("a release entry needs DP events in a log that declares privacy")
        self._append("release", {"round": int(round_index), "dp": self._dp(dp_events, epsilon)})

    def round_aborted(
        self,
        round_index: int,
        *,
        protocol: AggregationProtocol,
        participants: Sequence[int],
        error: ProtocolAborted,
        dp_events: Sequence[Mapping[str, Any]] = (),
        epsilon: float | None = None,
        checkpoint_counter: int | None = None,
    ) -> None:
        """Record a round that stopped with `error` (nothing was released)."""
        body = self._round_head(round_index, protocol, participants)
        body.update(phase=error.phase, reason=error.reason.value, message=str(error))
        self._counter(body, checkpoint_counter)
        body["dp"] = self._dp(dp_events, epsilon)
        self._append("round_aborted", body)
        self.last_round = int(round_index)

    def round_skipped(self, round_index: int, *, participants: Sequence[int], message: str,
                      epsilon: float | None = None, checkpoint_counter: int | None = None) -> None:
        """Record a round that did not run (its sample too small: nothing sent, released or spent): no protocol
        description (SecAgg refuses so few clients), no DP events; `epsilon`: the spend so far (under DP)."""
        _check_round(round_index, self.last_round, self.in_session)
        body: dict[str, Any] = {"round": int(round_index), "participants": [int(p) for p in participants],
                                "reason": "sample_too_small", "message": str(message)}
        self._counter(body, checkpoint_counter)
        body["dp"] = self._dp((), epsilon)
        self._append("round_skipped", body)
        self.last_round = int(round_index)

    def end(self, *, status: str = "completed", detail: str = "") -> None:
        """Close the session with run_end (``status``: completed, failed or interrupted)."""
        if not self.in_session:
            raise ConfigurationError("no audit session is open")
        self._append("run_end", {"status": status, "detail": detail, "rounds": self._rounds,
                                 "last_round": self.last_round, "epsilon": self._epsilon})
        self.in_session = False

    @contextlib.contextmanager
    def session(
        self, *, config: Mapping[str, Any], privacy: Mapping[str, Any] | None = None,
        seeded_secrets: bool | None = None, checkpoint: Mapping[str, Any] | None = None,
    ) -> Iterator[AuditWriter]:
        """:meth:`start`, then :meth:`end` with the status the block ended with (the exception propagates)."""
        self.start(config=config, privacy=privacy, seeded_secrets=seeded_secrets, checkpoint=checkpoint)
        try:
            yield self
        except KeyboardInterrupt:
            self.end(status="interrupted", detail="KeyboardInterrupt")
            raise
        except BaseException as e:
            self.end(status="failed", detail=f"{type(e).__name__}: {e}")
            raise
        self.end()

    def close(self) -> None:
        """Release the file and its lock (entries already written stay)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

