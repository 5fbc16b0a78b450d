"""Compliance audit trail: a signed, hash-chained log of every round, its offline verifier and a report.

``AuditWriter`` appends entries (the trainer does it for ``audit_log=PATH``);
:func:`verify` checks a log end to end and recomputes the privacy spend;
:func:`render_report` writes a self-contained HTML report. See
``protocols/audit.md`` and ``proofs/audit.md``.
"""

from securefed.audit.verifier import Failure, VerificationResult, verify
from securefed.audit.writer import AuditWriter

__all__ = ["AuditWriter", "Failure", "VerificationResult", "render_report", "verify"]


def render_report(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`securefed.audit.report.render_report` (matplotlib loads only when called)."""
    from securefed.audit.report import render_report as render

    return render(*args, **kwargs)
