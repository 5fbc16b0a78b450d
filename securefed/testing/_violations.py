"""A property's violation inside a hypothesis example, and the error a checker reports for it.

Shared by the conformance kit (``conformance.py``) and the privacy-module checks (``privacy.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConformanceError", "Violation", "find_violation", "report"]


class ConformanceError(AssertionError):
    """A protocol violates a conformance property; ``.property`` names it."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(message)
        self.property = prop


class Violation(Exception):
    """Raised inside a hypothesis example; hypothesis shrinks it, check_protocol reports it."""

    __notes__: list[str]  # BaseException's on Python 3.11+, set by hand on 3.10

    def __init__(self, prop: str, detail: str) -> None:
        super().__init__(f"[{prop}] {detail}")
        self.prop, self.detail = prop, detail


def find_violation(e: BaseException) -> Violation | None:
    """The Violation in `e` or in an exception group it is part of (hypothesis may wrap it)."""
    if isinstance(e, Violation):
        return e
    for sub in getattr(e, "exceptions", ()):
        found = find_violation(sub)
        if found is not None:
            return found
    return None


def report(name: str, v: Violation, extra_notes: Sequence[str] = ()) -> ConformanceError:
    """The ConformanceError for violation `v` of the suite `name`, with hypothesis' counterexample notes."""
    notes = [*getattr(v, "__notes__", []), *extra_notes]
    body = "\n".join(f"    {line}" for note_ in notes for line in str(note_).splitlines())
    return ConformanceError(
        v.prop, f"{name} violates {v.prop!r}: {v.detail}" + (f"\n  counterexample:\n{body}" if body else ""))
