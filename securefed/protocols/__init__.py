"""Aggregation protocols: each sums client vectors so that the server learns only what its threat model allows.

==========  ===========================================================
Plain       no protection (baseline)
SecAgg      pairwise masks, complete graph (Bonawitz et al. 2017)
SecAggPlus  pairwise masks, random Harary graph (Bell et al. 2020)
CKKS        homomorphic encryption, approximate real sums (TenSEAL)
BFV         homomorphic encryption, exact integer sums (TenSEAL)
==========  ===========================================================
"""

from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    ClientProtocol,
    DropReason,
    DropRecord,
    LazyInputs,
    RoundSpec,
    ServerProtocol,
    ServerView,
    simulate_aggregation,
)
from securefed.protocols.he import BFV, CKKS
from securefed.protocols.plain import Plain
from securefed.protocols.secagg import SecAgg, SecAggPlus

#: Protocol classes by their stable ``name`` (as written in logs and the audit trail).
REGISTRY: dict[str, type[AggregationProtocol]] = {cls.name: cls for cls in (Plain, SecAgg, SecAggPlus, CKKS, BFV)}

__all__ = [
    "BFV",
    "CKKS",
    "REGISTRY",
    "AggregationProtocol",
    "AggregationResult",
    "ClientProtocol",
    "DropReason",
    "DropRecord",
    "LazyInputs",
    "Plain",
    "RoundSpec",
    "SecAgg",
    "SecAggPlus",
    "ServerProtocol",
    "ServerView",
    "simulate_aggregation",
]
