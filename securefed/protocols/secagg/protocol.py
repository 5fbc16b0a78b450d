"""SecAgg and SecAgg+: pairwise-masked secure aggregation that survives dropouts.

Bonawitz et al., CCS 2017 (complete graph) and Bell et al., CCS 2020 (random
Harary graph of logarithmic degree). Each client masks its encoded input with a
self mask PRG(b_u) and one pairwise mask PRG(s_uv) per neighbour; pairwise masks
cancel in the sum, and the server removes the rest with secrets it reconstructs
from t-of-(degree + 1) Shamir shares: b_u for clients whose masked input arrived,
the mask key s_u for neighbours that dropped after sharing. An honest client
reveals for each peer the share of one of the two, never both.

Sans-I/O state machines: one client state class per round (advertise keys, share
keys, masked input, consistency check, unmasking, then completed or aborted), and
a server that adds masked inputs into one modular accumulator as they arrive. The
masked vectors travel bit-packed at the modulus width 2^k, k =
``encoder.modulus_bits(n)``. Wire layout: :mod:`securefed.protocols.secagg.wire`.
Spec: ``protocols/secagg.md``; proofs: ``proofs/secagg.md``.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.encoding.fixedpoint import (
    FixedPoint,
    IntegerEncoder,
    check_positive_count,
)
from securefed.encoding.packing import packed_size
from securefed.errors import ConfigurationError, InvalidInput
from securefed.protocols import wire
from securefed.protocols.base import (
    AggregationProtocol,
    ClientProtocol,
    RoundSpec,
    ServerProtocol,
)
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.client import Client, load_client_state
from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.params import (
    GraphParameters,
    ThreatModel,
    complete_graph_parameters,
    harary_parameters,
    violations,
)
from securefed.protocols.secagg.round import PHASES, VERSION, Round
from securefed.protocols.secagg.server import Server

__all__ = ["DEFAULT_VALUE_BITS", "DEFAULT_VALUE_RANGE", "PHASES", "MaskedAggregation", "SecAgg", "SecAggPlus"]

log = logging.getLogger("securefed.protocols.secagg")

#: Inputs in [-1, 1] (clipped model updates, gradients), 16 bits: Bonawitz et al.'s setting.
DEFAULT_VALUE_RANGE = 1.0
DEFAULT_VALUE_BITS = 16


def _check_threshold(threshold: object) -> int | Fraction | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool):
        raise ConfigurationError("threshold must be an int, a float in (0, 1] or None")
    if isinstance(threshold, (int, np.integer)):
        if threshold < 1:
            raise ConfigurationError(f"threshold must be >= 1, got {threshold}")
        return int(threshold)
    if isinstance(threshold, float) and 0 < threshold <= 1:
        return Fraction(str(threshold))
    raise ConfigurationError(f"threshold must be an int, a float in (0, 1] or None, got {threshold!r}")


class MaskedAggregation(AggregationProtocol):
    """What SecAgg and SecAggPlus share; they differ in the graph and how parameters are found."""

    phases = PHASES
    input_phase = "masked_input"  # a client dropping after it (in unmasking) stays in the sum
    _TAG: ClassVar[bytes]

    def __init__(
        self,
        *,
        threshold: float | None,
        adversary: str,
        corrupt_fraction: float,
        dropout_fraction: float,
        value_range: float | None,
        value_bits: int | None,
        encoder: IntegerEncoder | None,
        identities: KeyDirectory | None,
    ) -> None:
        self._threat = ThreatModel(adversary, corrupt_fraction, dropout_fraction)  # type: ignore[arg-type]
        self._threshold = _check_threshold(threshold)
        if encoder is None:
            encoder = FixedPoint(
                value_range=DEFAULT_VALUE_RANGE if value_range is None else value_range,
                value_bits=DEFAULT_VALUE_BITS if value_bits is None else value_bits,
            )
        elif value_range is not None or value_bits is not None:
            raise ConfigurationError("give either encoder= or value_range=/value_bits=, not both")
        if not isinstance(encoder, IntegerEncoder):
            raise ConfigurationError(f"encoder must be an IntegerEncoder, got {type(encoder).__name__}")
        if identities is not None and not isinstance(identities, KeyDirectory):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory")
        self._encoder = encoder
        self._identities = identities
        self._params: dict[int, GraphParameters] = {}
        self._simulated_pki: dict[int, KeyDirectory] = {}
        self._round_cache: tuple[RoundSpec, Round] | None = None

    # configuration ---------------------------------------------------------------------------

    @property
    def threat_model(self) -> ThreatModel:
        return self._threat

    @property
    def encoder(self) -> IntegerEncoder:
        return self._encoder

    def _resolve(self, n: int) -> GraphParameters:
        raise NotImplementedError

    def parameters(self, n: int) -> GraphParameters:
        """Degree and threshold in force for a round of n clients (ConfigurationError if none is allowed)."""
        if n not in self._params:
            self._params[n] = self._resolve(n)
        return self._params[n]

    def min_survivors(self, n: int) -> int:
        return max(self.parameters(n).threshold, self.quorum(n))

    def quorum(self, n: int) -> int:
        """Active: floor((n + C)/2) + 1 signatures on the survivor list, from the whole round; 0 otherwise.

        Two survivor lists that each carry a quorum share more than C signers, so an honest client
        signed both, which it never does: every honest client that unmasks holds the same list
        (``proofs/secagg.md``, Lemma 7). On the complete graph t already exceeds it.
        """
        return (n + self._threat.corrupt(n)) // 2 + 1 if self._threat.active else 0

    def error_bound(self, n: int) -> float:
        """The encoder's bound; ConfigurationError unless n is a positive integer (whatever the encoder)."""
        return self._encoder.error_bound(check_positive_count(n, "the number of clients"))

    def with_encoder(self, encoder: Any) -> MaskedAggregation:
        if not isinstance(encoder, IntegerEncoder):
            raise ConfigurationError(f"encoder must be an IntegerEncoder, got {type(encoder).__name__}")
        other = copy.copy(self)
        other._encoder = encoder
        other._round_cache = None
        return other

    def with_identities(self, identities: KeyDirectory) -> MaskedAggregation:
        """A copy whose active variant verifies clients 0..n-1 against `identities` (a :class:`KeyDirectory`).

        For runtimes where a client's index changes between rounds (on Flower, client i is the
        round's i-th smallest node id): each party builds the round's directory from its own copy
        of the federation's keys. ConfigurationError for anything but a KeyDirectory.
        """
        if not isinstance(identities, KeyDirectory):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory")
        other = copy.copy(self)
        other._identities = identities
        other._round_cache = None
        return other

    def message_sizes(self, n: int, dim: int) -> dict[str, tuple[int, int]]:
        """Bytes one client receives and sends in each phase of a round of n without dropouts.

        ``{phase: (received, sent)}``, computed from the wire layout (``protocols/secagg.md``,
        cost table); a client with p = degree peers in an active round.
        """
        p = self.parameters(n).degree
        hdr = wire.HEADER_SIZE
        sig = W.SIG if self._threat.active else 0
        bitmap = (n + 7) // 8
        return {
            "advertise_keys": (hdr, hdr + 2 * W.KEY + sig + W.CHECK),
            "share_keys": (hdr + 4 + (p + 1) * (4 + 2 * W.KEY + sig + W.CHECK),
                           hdr + W.COMMIT + 4 + p * (4 + W.SEALED)),
            "masked_input": (hdr + 4 + p * (4 + W.SEALED), hdr + packed_size(dim, self._encoder.modulus_bits(n))),
            "consistency_check": (hdr + bitmap, hdr + W.SIG) if sig else (0, 0),
            # active: every signer's signature (n when nobody dropped), for the quorum check
            "unmasking": (hdr + bitmap + (4 + n * (4 + W.SIG) if sig else 0), hdr + 4 + (p + 1) * (4 + W.SHARE)),
        }

    def describe(self, n: int) -> dict[str, Any]:
        p = self.parameters(n)
        return {
            "protocol": self.name,
            "n": n,
            "min_survivors": self.min_survivors(n),
            "survivor_quorum": self.quorum(n),
            "threshold": p.threshold,
            "threshold_requested": None if self._threshold is None else str(self._threshold),
            "threshold_justification": p.justification,
            "graph": "complete" if p.complete else "harary",
            "degree": p.degree,
            "adversary": self._threat.adversary,
            "corrupt_fraction": float(self._threat.corrupt_fraction),
            "dropout_fraction": float(self._threat.dropout_fraction),
            "statistical_security_bits": 40,
            "failure_probability_log2": -20,
            "modulus_bits": self._encoder.modulus_bits(n),
            "encoder": self._encoder.describe(),
            "wire_version": VERSION,
        }

    @classmethod
    def check_description(cls, description: Mapping[str, Any]) -> list[str]:
        try:
            n = int(description["n"])
            t = int(description["threshold"])
            degree = int(description["degree"])
            complete = description["graph"] == "complete"
            threat = ThreatModel(description["adversary"], description["corrupt_fraction"],
                                 description["dropout_fraction"])
            k = int(description["modulus_bits"])
        except (KeyError, TypeError, ValueError) as e:
            return [f"malformed {cls.name} description: {e!r}"]
        out = []
        if description.get("protocol") != cls.name:
            out.append(f"protocol is {description.get('protocol')!r}, expected {cls.name!r}")
        if cls is SecAgg and not complete:
            out.append("SecAgg uses the complete graph")
        quorum = (n + threat.corrupt(n)) // 2 + 1 if threat.active else 0
        if int(description.get("survivor_quorum", quorum)) != quorum:
            out.append(f"survivor_quorum is not floor((n + C)/2) + 1 = {quorum} (active) or 0")
        if int(description.get("min_survivors", max(t, quorum))) != max(t, quorum):
            out.append("min_survivors differs from max(threshold, survivor_quorum)")
        if not 1 <= k <= 64:
            out.append(f"modulus_bits {k} outside [1, 64]")
        enc = description.get("encoder")
        if isinstance(enc, Mapping) and enc.get("encoder") == "FixedPoint":
            need = int(enc.get("value_bits", 0)) + (math.ceil(math.log2(n)) if n > 1 else 0)
            if k < need:
                out.append(f"modulus_bits {k} < value_bits + ceil(log2 n) = {need}: the sum can wrap")
        return out + violations(n, degree, t, threat, complete=complete)

    def round_identities(self, n: int) -> KeyDirectory | None:
        """The identity directory a round of `n` clients signs and verifies with (None when semi-honest)."""
        return self._directory(n)

    def survivor_list(self, spec: RoundSpec, request: bytes) -> np.ndarray:
        """The survivor list (client indices, ascending) of a consistency_check `request` of round `spec`, as a
        client reads it before signing; MessageRejected for a malformed request."""
        body = self._round(spec).body(request, PHASES.index("consistency_check"), wire.SERVER)
        return W.parse_bitmap(body, spec.n)

    def _directory(self, n: int) -> KeyDirectory | None:
        if self._threat.adversary != "active":
            return None
        if self._identities is not None:
            if not self._identities.covers(n):
                raise ConfigurationError(f"the identity directory does not cover clients 0..{n - 1}")
            return self._identities
        if n not in self._simulated_pki:
            log.warning("active %s without identities=: generating a simulated PKI (simulation only)", self.name)
            self._simulated_pki[n] = KeyDirectory.generate(n)
        return self._simulated_pki[n]

    def _round(self, spec: RoundSpec) -> Round:
        if self._round_cache is not None and self._round_cache[0] == spec:
            return self._round_cache[1]
        p = self.parameters(spec.n)
        graph = (MaskingGraph.complete_graph(spec.n) if p.complete
                 else MaskingGraph.harary(spec.n, p.degree, spec.session_id))
        width = self._encoder.modulus_bits(spec.n)
        r = Round(spec, self._TAG, p, graph, width, self._encoder, self._threat.active, self._directory(spec.n),
                  self.quorum(spec.n))
        self._round_cache = (spec, r)
        return r

    # parties ---------------------------------------------------------------------------------

    def server(self, spec: RoundSpec, *, rng: RandomSource) -> ServerProtocol:
        return Server(self._round(spec))

    def client(
        self, spec: RoundSpec, client: int, x: np.ndarray | None = None, *, rng: RandomSource
    ) -> ClientProtocol:
        if not 0 <= client < spec.n:
            raise InvalidInput(f"client index {client} is not in 0..{spec.n - 1}")
        c = Client(self._round(spec), int(client), rng)
        if x is not None:
            c.set_input(x)
        return c

    def load_client(self, data: bytes, *, rng: RandomSource) -> ClientProtocol:
        return load_client_state(data, rng, tag=self._TAG, name=self.name, round_for=self._round)


class SecAgg(MaskedAggregation):
    """SecAgg (Bonawitz et al. 2017): every client masks with every other; t-of-n secret sharing.

    Keyword-only: ``threshold`` (int, float fraction of n, or None: the smallest the
    threat model allows), ``adversary`` ("semi-honest" or "active": signatures and a
    consistency check, needs ``identities``, a :class:`KeyDirectory`; without it a
    simulated PKI is generated, for simulation only), ``corrupt_fraction`` and
    ``dropout_fraction`` (the threat model), ``value_range``/``value_bits`` (the
    default :class:`FixedPoint` encoder) or ``encoder``. Raises ConfigurationError for
    parameters that violate the threat model. See ``protocols/secagg.md``.
    """

    name = "secagg"
    _TAG = b"SFSA"

    def __init__(
        self,
        *,
        threshold: float | None = None,
        adversary: str = "semi-honest",
        corrupt_fraction: float = 0.1,
        dropout_fraction: float = 0.1,
        value_range: float | None = None,
        value_bits: int | None = None,
        encoder: IntegerEncoder | None = None,
        identities: KeyDirectory | None = None,
    ) -> None:
        super().__init__(threshold=threshold, adversary=adversary, corrupt_fraction=corrupt_fraction,
                         dropout_fraction=dropout_fraction, value_range=value_range, value_bits=value_bits,
                         encoder=encoder, identities=identities)

    def __repr__(self) -> str:
        return (f"SecAgg(threshold={self._threshold!s}, adversary={self._threat.adversary!r}, "
                f"corrupt_fraction={self._threat.corrupt_fraction}, dropout_fraction={self._threat.dropout_fraction}, "
                f"encoder={self._encoder!r})")

    def _resolve(self, n: int) -> GraphParameters:
        t = self._threshold
        if isinstance(t, Fraction):
            t = math.ceil(t * n)
        return complete_graph_parameters(n, self._threat, t)


class SecAggPlus(MaskedAggregation):
    """SecAgg+ (Bell et al. 2020): masks along a random Harary graph of logarithmic degree.

    As :class:`SecAgg`, plus ``degree`` (even; None: the smallest the threat model
    allows at statistical security 2^-40 and failure probability < 2^-20). A float
    ``threshold`` is a fraction of ``degree + 1`` (the holders of a client's shares).
    Falls back to the complete graph when no smaller degree is safe (small rounds).
    Raises ConfigurationError for parameters that violate the threat model.
    See ``protocols/secagg.md``.
    """

    name = "secagg+"
    _TAG = b"SFS+"

    def __init__(
        self,
        *,
        threshold: float | None = None,
        degree: int | None = None,
        adversary: str = "semi-honest",
        corrupt_fraction: float = 0.1,
        dropout_fraction: float = 0.1,
        value_range: float | None = None,
        value_bits: int | None = None,
        encoder: IntegerEncoder | None = None,
        identities: KeyDirectory | None = None,
    ) -> None:
        super().__init__(threshold=threshold, adversary=adversary, corrupt_fraction=corrupt_fraction,
                         dropout_fraction=dropout_fraction, value_range=value_range, value_bits=value_bits,
                         encoder=encoder, identities=identities)
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, (int, np.integer))
                                   or degree < 2 or degree % 2):
            raise ConfigurationError(f"degree must be an even int >= 2 or None, got {degree!r}")
        self._degree = None if degree is None else int(degree)
        if not self._threat.harary_feasible():
            raise ConfigurationError(
                f"corrupt_fraction={corrupt_fraction} and dropout_fraction={dropout_fraction} are infeasible for "
                "SecAgg+: it needs corrupt + dropout <= 0.9 (semi-honest) or corrupt + 2 x dropout <= 0.9 (active)"
            )

    def __repr__(self) -> str:
        return (f"SecAggPlus(threshold={self._threshold!s}, degree={self._degree}, "
                f"adversary={self._threat.adversary!r}, corrupt_fraction={self._threat.corrupt_fraction}, "
                f"dropout_fraction={self._threat.dropout_fraction}, encoder={self._encoder!r})")

    def _resolve(self, n: int) -> GraphParameters:
        t = self._threshold
        if not isinstance(t, Fraction):
            return harary_parameters(n, self._threat, degree=self._degree, threshold=t)
        degrees = [self._degree] if self._degree is not None else [*range(2, n - 1, 2), n - 1]
        problems = []
        for k in degrees:
            try:
                return harary_parameters(n, self._threat, degree=k, threshold=math.ceil(t * (min(k, n - 1) + 1)))
            except ConfigurationError as e:
                problems.append(str(e))
        raise ConfigurationError(f"no degree admits threshold {float(t)} x (degree + 1): {problems[-1]}")
