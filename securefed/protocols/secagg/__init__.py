"""SecAgg and SecAgg+ (pairwise-masked secure aggregation): one package, spec ``protocols/secagg.md``.

==========  ===============================================================
protocol    ``SecAgg``, ``SecAggPlus`` and their shared base ``MaskedAggregation``
client      the client state machine (one class per state) and its state dumps
server      the server: one modular accumulator, unmasking, consistency check
round       what both sides derive per round: keys, commitments, messages signed
wire        message bodies: layout, parsing (``read_message`` for harnesses)
params      threat models and the thresholds and graph degrees they allow
graph       the masking graph (complete or random Harary)
packed      column bit-packing of masked vectors, streaming add
==========  ===============================================================
"""

from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.params import GraphParameters, ThreatModel
from securefed.protocols.secagg.protocol import (
    DEFAULT_VALUE_BITS,
    DEFAULT_VALUE_RANGE,
    PHASES,
    MaskedAggregation,
    SecAgg,
    SecAggPlus,
)
from securefed.protocols.secagg.round import VERSION

__all__ = [
    "DEFAULT_VALUE_BITS",
    "DEFAULT_VALUE_RANGE",
    "PHASES",
    "VERSION",
    "GraphParameters",
    "MaskedAggregation",
    "MaskingGraph",
    "SecAgg",
    "SecAggPlus",
    "ThreatModel",
]
