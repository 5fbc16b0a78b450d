"""securefed on Flower: secure aggregation, DP and the audit trail as a Flower server strategy and client handlers.

Server (in a ``ServerApp``): :class:`SecureFedAvg`, built on :class:`GridAggregator`,
which runs one securefed aggregation round over a Flower ``Grid``. Client (in a
``ClientApp``): :class:`SecureClient`, which wraps the user's training function.
:mod:`securefed.flower.testing` runs apps in one process; :mod:`securefed.flower.loopback`
starts a real SuperLink and SuperNodes on 127.0.0.1. Needs the extra
``securefed[flower]``. See ``protocols/flower.md``.
"""

from securefed.errors import ConfigurationError

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ConfigurationError("securefed.flower needs Flower: pip install 'securefed[flower]'") from e

from securefed.flower.aggregation import GridAggregator, RoundOutcome
from securefed.flower.client import SecureClient
from securefed.flower.strategy import FlowerOptimizer, RoundReport, SecureFedAvg, SecureResult

__all__ = [
    "FlowerOptimizer", "GridAggregator", "RoundOutcome", "RoundReport", "SecureClient", "SecureFedAvg", "SecureResult",
]
