"""Resuming a Flower run: the signed checkpoint, checked against the audit log, and the log completed from it.

The checkpoint (``_checkpoint``) is signed with the server's key; on resume it must
also agree with the audit log: the log holds, unchanged, the entry whose hash the
checkpoint recorded as the log's head at its commit; the log is not ahead of it; and
the ledger in the log, plus the DP events of the committed round the log may still
lack, is the checkpoint's ledger. What the server then writes to the log (DP events,
epsilon) it derives from that ledger, never from a field of the checkpoint taken as
is. See ``protocols/flower.md``, section 8, "Trust boundaries".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord

from securefed.audit.log import canonical
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    ProtocolAborted,
)
from securefed.flower import _checkpoint, _privacy
from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    DropReason,
    DropRecord,
    RoundSpec,
    ServerView,
)

__all__ = ["Restored", "reconcile", "restore", "restore_optimizer", "write_round"]


@dataclasses.dataclass
class Restored:
    """What a resumed run starts from: the committed checkpoint (None: a new run), the events released
    after it, and this session's checkpoint counter (bumped by the resume)."""

    state: dict[str, Any] | None = None
    arrays: ArrayRecord | None = None
    aggregate: np.ndarray | None = None
    pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    counter: int = 0
    optimizer: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # the server optimizer's state

    def audit_checkpoint(self) -> dict[str, Any] | None:
        """The ``checkpoint`` field of the audit log's resume entry: round, counter and the head it recorded."""
        if self.state is None:
            return None
        return {"round": self.state["round"], "counter": self.counter, "head": self.state["audit_head"]}


def restore(directory: str | os.PathLike[str], key: Ed25519PrivateKey, audit: Any) -> Restored:
    """Load and check the checkpoint in `directory` (signed by `key`) against the open `audit` writer (or None).

    A checkpoint found is re-signed with the next counter before anything else happens, so every resume
    is counted. Raises ConfigurationError for a checkpoint or log that was changed, cut or rolled back.
    """
    loaded = _checkpoint.load_all(directory, key.public_key())
    round_index = 0 if loaded is None else loaded[0]["round"]
    # With an audit log every release is logged ahead (``release`` entries): the log is the ledger and
    # released.json is never written. Without one, released.json holds the releases after the commit.
    pending = [] if audit is not None else _checkpoint.released(directory, key.public_key(), round_index=round_index)
    if audit is not None and _checkpoint.released(directory, None, round_index=round_index):
        raise ConfigurationError(f"{directory} holds released.json, which a run with an audit log never writes: "
                                 "the folder belongs to a run without this log; use that run's settings")
    _checkpoint.check_files(directory)
    if loaded is None:
        # A new run, or one that crashed before its first commit: with a log, the releases it already
        # logged are spent all the same (the accountant starts from the log's ledger).
        return Restored(pending=pending if audit is None else list(audit.ledger))
    state, arrays, aggregate, optimizer = loaded
    if audit is None and state["audit_head"] is not None:
        raise ConfigurationError("the checkpoint was committed with an audit log, which holds the run's releases "
                                 "(its ledger): resume with the same audit_log")
    if audit is not None:
        _check_log(state, audit)
        state = {**state, "ledger": list(audit.ledger)}  # the checkpoint's ledger and any release after it
    counter = state["counter"] + 1
    _checkpoint.touch(directory, state, key=key, counter=counter)
    return Restored({**state, "counter": counter}, arrays, aggregate, pending, counter, optimizer)


def restore_optimizer(restored: Restored, optimizer: Any) -> None:
    """Load the checkpoint's server optimizer state into `optimizer` (the run's, not yet stepped).

    ConfigurationError when the checkpoint was written with another optimizer or other settings: its
    state (moments, momentum) would mean something else, and a silent restart would change the run.
    """
    if restored.state is None:
        return
    saved, now = restored.state["optimizer"]["config"], optimizer.describe()
    if canonical({"o": saved}) != canonical({"o": now}):
        raise ConfigurationError(f"the checkpoint was written with server optimizer {saved}, this run has {now}: "
                                 "resume with the same server_optimizer (and server_lr), or start with an empty "
                                 "checkpoint folder")
    try:
        optimizer.load_state_dict(restored.optimizer)
    except InvalidInput as e:
        raise ConfigurationError(f"the checkpoint's server optimizer state does not fit {now}: {e}") from None


def _same(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    return [canonical(dict(e)) for e in a] == [canonical(dict(e)) for e in b]


def _check_log(state: Mapping[str, Any], audit: Any) -> None:
    """ConfigurationError unless the open audit log is the one the checkpoint was committed against."""
    head, r = state["audit_head"], state["round"]
    last = audit.last_round or 0
    if head is None:
        raise ConfigurationError(f"the checkpoint in the folder was committed without an audit log, and this run "
                                 f"has one ({audit.path}): resume it without audit_log, or start a new run")
    if audit.entry_hash(head["seq"]) != head["sha256"]:
        raise ConfigurationError(
            f"the audit log {audit.path} is shorter than, or differs from, the log the checkpoint of round {r} "
            f"was committed against (its entry {head['seq']} should hash to {head['sha256'][:16]}...): it was "
            "cut or replaced; restore the log that goes with this checkpoint")
    if last > r or (audit.checkpoint_counter is not None and state["counter"] < audit.checkpoint_counter):
        raise ConfigurationError(
            f"the audit log {audit.path} records round {last} (checkpoint counter {audit.checkpoint_counter}) but "
            f"the checkpoint is at round {r} (counter {state['counter']}): the checkpoint was rolled back (or the "
            "log belongs to another run); restore the latest checkpoint")
    if not (last == r or (last == r - 1 and isinstance(state.get("audit"), dict) and state["audit"].get("round") == r)):
        raise ConfigurationError(
            f"the audit log ends at round {last} but the checkpoint at round {r}: "
            "they belong to different runs; use the audit log of this checkpoint or a new one")
    logged, ledger = list(audit.ledger), state["ledger"]
    if len(ledger) > len(logged) or not _same(logged[:len(ledger)], ledger):
        raise ConfigurationError(
            f"the checkpoint's privacy ledger ({len(ledger)} events) is not a prefix of the audit log's "
            f"({len(logged)} events, every release logged before its commit): one of them was changed; "
            "refusing to resume (restore the files the server wrote)")


def audit_record(report: Any, outcome: Any) -> dict[str, Any]:
    """What the audit log needs for a round, JSON-able, kept in the signed checkpoint until the log has it."""
    rec: dict[str, Any] = {"round": report.round, "participants": list(report.participants),
                           "metrics": report.metrics, "aborted": report.aborted}
    if outcome is not None:
        res = outcome.result
        rec.update(
            n=res.spec.n, dim=res.spec.dim, session=res.spec.session_id.hex(),
            included=list(res.included),
            digests=[list(d) for d in res.server_view.digests],
            dropped={str(c): [d.phase, d.reason.value, d.detail] for c, d in res.dropped.items()},
        )
    return rec


def _skipped(rec: Mapping[str, Any]) -> bool:
    """Whether `rec` is a round the server skipped (a Poisson sample too small to run): no protocol ran,
    so the report carries no outcome, only the ``skipped`` metric and ``too_few_survivors``."""
    metrics = rec["metrics"]
    return (rec["aborted"] == AbortReason.TOO_FEW_SURVIVORS.value and "n" not in rec
            and isinstance(metrics, Mapping) and metrics.get("skipped") == 1.0)


def write_round(audit: Any, rec: Mapping[str, Any], total: np.ndarray | None, *, protocol: AggregationProtocol,
                privacy: Any, ledger: Sequence[Mapping[str, Any]], epsilon: float | None,
                checkpoint_counter: int | None = None) -> None:
    """Write round `rec` to `audit`: its DP events are the `ledger`'s beyond what the log holds, and
    `epsilon` that of the whole `ledger` (the server's own accounting, never a recorded claim).
    A skipped round is written as ``round_skipped`` (no protocol description: the protocol may
    refuse to describe a sample that small)."""
    dp: dict[str, Any] = {"dp_events": [], "epsilon": None}
    if privacy is not None:
        dp = {"dp_events": list(ledger[len(audit.ledger):]), "epsilon": epsilon}
    if _skipped(rec):
        if dp["dp_events"]:
            raise ConfigurationError(
                f"round {rec['round']} was skipped (nothing released) but the privacy ledger holds "
                f"{len(dp['dp_events'])} event(s) the audit log lacks: the checkpoint and the log disagree; "
                "restore the files the server wrote")
        parts = [int(p) for p in rec["participants"]]
        audit.round_skipped(rec["round"], participants=parts, epsilon=dp["epsilon"],
                            checkpoint_counter=checkpoint_counter,
                            message=f"the sample of {len(parts)} node(s) is too small to run {protocol.name}")
        return
    if rec["aborted"] is not None:
        error = ProtocolAborted(AbortReason(rec["aborted"]), "round aborted")
        audit.round_aborted(rec["round"], protocol=protocol, participants=rec["participants"], error=error,
                            checkpoint_counter=checkpoint_counter, **dp)
        return
    if total is None:
        raise ConfigurationError(f"the checkpoint of round {rec['round']} lacks the aggregate its audit entry needs")
    session = bytes.fromhex(rec["session"])
    spec = RoundSpec(n=rec["n"], dim=rec["dim"], session_id=session, round_index=rec["round"])
    view = ServerView(digests=[(c, p, h, s) for c, p, h, s in rec["digests"]])
    dropped = {int(c): DropRecord(p, DropReason(r), d) for c, (p, r, d) in rec["dropped"].items()}
    result = AggregationResult(total, tuple(rec["included"]), view, dropped, spec)
    audit.round(rec["round"], protocol=_privacy.round_protocol(protocol, privacy, session=session, dim=rec["dim"]),
                result=result, participants=rec["participants"], metrics=rec["metrics"],
                checkpoint_counter=checkpoint_counter, **dp)


def reconcile(audit: Any, restored: Restored, *, protocol: AggregationProtocol, privacy: Any) -> None:
    """Bring the audit log level with the checkpoint (already checked by :func:`restore`): write the
    committed round it lacks."""
    state = restored.state
    last = audit.last_round or 0
    if state is None:
        if last:
            raise ConfigurationError(
                f"the audit log ends at round {last} but there is no checkpoint: "
                "they belong to different runs; use the audit log of this checkpoint or a new one")
        return
    if last == state["round"]:
        return
    epsilon = None
    if privacy is not None:
        from securefed.privacy import Accountant

        epsilon = Accountant.from_ledger(state["ledger"], privacy.accountant).epsilon(privacy.delta)
    try:
        write_round(audit, state["audit"], restored.aggregate, protocol=protocol, privacy=privacy,
                    ledger=state["ledger"], epsilon=epsilon, checkpoint_counter=restored.counter)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # InvalidInput is a ValueError too
        raise ConfigurationError(f"the checkpoint's record of round {state['round']} is malformed ({type(e).__name__}: "
                                 f"{e}); restore the files the server wrote") from None
