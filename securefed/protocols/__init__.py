"""Aggregation protocols: each sums client vectors so that the server learns only what its threat model allows.

==========  ===========================================================
Plain       no protection (baseline)
==========  ===========================================================
"""

from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    ClientProtocol,
    DropReason,
    DropRecord,
    RoundSpec,
    ServerProtocol,
    ServerView,
    simulate_aggregation,
)
from securefed.protocols.plain import Plain

#: Protocol classes by their stable ``name`` (as written in logs and the audit trail).
REGISTRY: dict[str, type[AggregationProtocol]] = {cls.name: cls for cls in (Plain,)}

__all__ = [
    "AggregationProtocol",
    "AggregationResult",
    "ClientProtocol",
    "DropReason",
    "DropRecord",
    "Plain",
    "REGISTRY",
    "RoundSpec",
    "ServerProtocol",
    "ServerView",
    "simulate_aggregation",
]
