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

__all__ = [
    "AggregationProtocol",
    "AggregationResult",
    "ClientProtocol",
    "DropReason",
    "DropRecord",
    "Plain",
    "RoundSpec",
    "ServerProtocol",
    "ServerView",
    "simulate_aggregation",
]
