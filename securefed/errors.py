"""The one error hierarchy of securefed, and its one warning.

Every error the library raises on purpose derives from :class:`SecureFedError`.
Messages say what was wrong and what to do; a failed integrity check says only
"invalid" (it never tells which byte or field failed).
"""

from __future__ import annotations

import enum

__all__ = [
    "AbortReason",
    "ConfigurationError",
    "InvalidInput",
    "MessageRejected",
    "PrivacyBudgetExceeded",
    "ProtocolAborted",
    "SecureFedError",
    "SeededSecretsWarning",
]


class SecureFedError(Exception):
    """Base class of every error securefed raises on purpose."""


class InvalidInput(SecureFedError, ValueError):
    """Bad input: NaN/Inf, wrong shape or dtype, out of range, overflow, empty."""


class ConfigurationError(SecureFedError, ValueError):
    """Inconsistent parameters, or parameters that violate the threat model."""


class AbortReason(enum.Enum):
    """Why a round stopped without a result (recorded in logs and the audit trail)."""

    TOO_FEW_SURVIVORS = "too_few_survivors"
    NO_INPUTS = "no_inputs"
    CONSISTENCY_CHECK_FAILED = "consistency_check_failed"
    REQUEST_REFUSED = "request_refused"
    RECONSTRUCTION_FAILED = "reconstruction_failed"
    INVALID_STATE = "invalid_state"


class ProtocolAborted(SecureFedError):
    """The round cannot finish safely; nothing secret was revealed.

    ``reason`` is an :class:`AbortReason`; ``phase`` names the phase where the
    round stopped, when known.
    """

    def __init__(self, reason: AbortReason, message: str, *, phase: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.phase = phase


class MessageRejected(SecureFedError):
    """A malformed, tampered, replayed, out-of-phase or unauthenticated message."""


class PrivacyBudgetExceeded(SecureFedError):
    """The next step would spend more privacy than the budget allows."""


class SeededSecretsWarning(UserWarning):
    """A run whose secret randomness derives from a public seed: for tests and simulation only.

    Here (torch-free) so that the Trainer (``securefed.training.SeededSecretsWarning``, the same class) and
    a Flower node (``securefed.flower.SecureClient``) warn with one class."""
