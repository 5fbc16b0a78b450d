"""securefed: federated training in which the server learns only the aggregate.

Heavy dependencies (torch, tenseal, dp-accounting) load on first use, so
``import securefed`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from securefed import errors, protocols
from securefed._version import __version__
from securefed.protocols.base import AggregationResult, LazyInputs, simulate_aggregation

if TYPE_CHECKING:
    from securefed import audit, encoding, kernels, optim, parallel, privacy, testing
    from securefed.training import History, RoundRecord, Trainer

__all__ = [
    "AggregationResult",
    "History",
    "LazyInputs",
    "RoundRecord",
    "Trainer",
    "__version__",
    "audit",
    "encoding",
    "errors",
    "kernels",
    "optim",
    "parallel",
    "privacy",
    "protocols",
    "simulate_aggregation",
    "testing",
]

_LAZY_ATTRS = {"Trainer": "securefed.training", "History": "securefed.training", "RoundRecord": "securefed.training"}
_LAZY_MODULES = {"audit", "encoding", "kernels", "optim", "parallel", "privacy", "testing", "flower"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"securefed.{name}")
    raise AttributeError(f"module 'securefed' has no attribute {name!r}")
