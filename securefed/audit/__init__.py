"""Compliance audit trail: a signed, hash-chained log of every round, its offline verifier and a report.

``AuditWriter`` appends entries (the trainer does it for ``audit_log=PATH``);
:func:`verify` checks a log end to end and recomputes the privacy spend;
:func:`render_report` writes a self-contained HTML report (matplotlib loads only
when it draws). See ``protocols/audit.md`` and ``proofs/audit.md``.
"""

from securefed.audit.report import render_report
from securefed.audit.verifier import Failure, VerificationResult, verify
from securefed.audit.writer import AuditWriter

__all__ = ["AuditWriter", "Failure", "VerificationResult", "render_report", "verify"]
