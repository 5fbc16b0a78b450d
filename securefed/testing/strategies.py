"""Hypothesis strategies for aggregation protocols, their inputs, dropouts, parameters and messages.

Needs ``securefed[testing]`` (hypothesis). Every strategy shrinks toward the simplest
case (fewest clients, no dropouts, the first phase, zeros), so a failure reads well.

==========================  ==================================================================
:func:`updates`             model updates: shapes, float64/float32, edge values of the range
:func:`invalid_updates`     updates every protocol must refuse with InvalidInput
:func:`populations`         clients' updates with example-count weights
:func:`dropout_schedules`   ``{client: phase}`` over a protocol's ``.phases``; ``too_many=True``
                            drops more clients by the input phase than ``min_survivors`` allows
:func:`configurations`      parameter sets of the shipped protocols, labelled within/outside
                            the threat model's conditions by the published rules
:func:`tamperings`          malformed messages derived from a recorded round: truncation,
                            extension, bit flips, replays (duplicate, another client's, another
                            phase's, another round's) and reordering
:func:`deviations`          a deviating server (:mod:`securefed.testing.adversary`) for a protocol
==========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "securefed.testing.strategies needs hypothesis: install the extra with pip install 'securefed[testing]'"
    ) from e

from securefed.protocols import BFV, CKKS, Plain, SecAgg, SecAggPlus
from securefed.protocols.base import AggregationProtocol, Party
from securefed.protocols.secagg import MaskedAggregation
from securefed.testing import adversary as adv

__all__ = [
    "TAMPERING_KINDS",
    "Configuration",
    "Population",
    "Tampering",
    "configurations",
    "deviations",
    "dropout_schedules",
    "input_phase_index",
    "input_range",
    "invalid_updates",
    "populations",
    "tamperable_replies",
    "tamperings",
    "updates",
]

_DTYPES = (np.float64, np.float32)


def input_range(protocol: AggregationProtocol) -> float | None:
    """The bound c on input coordinates a protocol declares (``value_range`` or its encoder's), or None."""
    for owner in (protocol, getattr(protocol, "encoder", None)):
        c = getattr(owner, "value_range", None)
        if isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0:
            return float(c)
    return None


def input_phase_index(protocol: AggregationProtocol) -> int:
    """Index in ``protocol.phases`` of the phase that carries a client's input (the last if unset)."""
    return protocol.input_phase_index()


def _dims(dim: int | st.SearchStrategy[int] | tuple[int, int]) -> st.SearchStrategy[int]:
    if isinstance(dim, tuple):
        return st.integers(*dim)
    return dim if isinstance(dim, st.SearchStrategy) else st.just(int(dim))


def _as_array(dtype: type) -> Callable[[list[float]], np.ndarray]:
    return lambda v: np.array(v, dtype=dtype)


def _inward(c: float, dtype: type) -> float:
    """The largest value of `dtype` that is <= c (hypothesis wants bounds the width can represent)."""
    v = dtype(c)
    return float(v if v <= c else np.nextafter(v, dtype(0)))


def _coordinates(c: float, dtype: type, min_magnitude: float) -> st.SearchStrategy[float]:
    width: Literal[32, 64] = 32 if dtype == np.float32 else 64
    hi = _inward(c, dtype)
    if min_magnitude > 0:
        mags = st.floats(-_inward(-min_magnitude, dtype), hi, width=width)  # the smallest value >= min_magnitude
        return st.tuples(st.booleans(), mags).map(lambda t: -t[1] if t[0] else t[1])
    tiny = float(np.finfo(dtype).smallest_subnormal)
    edges = [0.0, -0.0, hi, -hi, float(np.nextafter(dtype(hi), dtype(0))), tiny, -tiny]
    return st.one_of(st.sampled_from(edges), st.floats(-hi, hi, width=width))


def updates(
    dim: int | tuple[int, int] | st.SearchStrategy[int] = (1, 16),
    *,
    value_range: float = 1.0,
    dtypes: Sequence[type] = _DTYPES,
    min_magnitude: float = 0.0,
) -> st.SearchStrategy[np.ndarray]:
    """1-D float updates with coordinates in [-value_range, value_range], edge values included.

    Edges: 0, -0, +-value_range, its neighbour inside, the smallest subnormal. With
    ``min_magnitude`` > 0 every coordinate has |x| >= min_magnitude instead (inputs whose loss
    or double count a check can see).
    """
    if not (math.isfinite(value_range) and value_range > 0):
        raise ValueError(f"value_range must be finite and > 0, got {value_range!r}")
    if not 0 <= min_magnitude <= value_range:
        raise ValueError("min_magnitude must be in [0, value_range]")
    coordinates = {dt: _coordinates(value_range, dt, min_magnitude) for dt in dtypes}

    def arrays(d: int) -> st.SearchStrategy[np.ndarray]:
        # Lists mapped to arrays draw about twice as fast as hypothesis.extra.numpy.arrays.
        return st.one_of(*[st.lists(coordinates[dt], min_size=d, max_size=d).map(_as_array(dt)) for dt in dtypes])

    return arrays(dim) if isinstance(dim, int) else _dims(dim).flatmap(arrays)


def invalid_updates(
    dim: int, *, value_range: float | None = None, wrong_length: bool = True
) -> st.SearchStrategy[tuple[str, Any]]:
    """``(what, update)`` for updates a protocol expecting length-`dim` inputs must refuse (InvalidInput).

    NaN, +-Inf, a coordinate beyond ``value_range`` (when given), a 2-D array, an integer
    array, and (``wrong_length``: when other clients hold length-`dim` inputs) another length.
    """
    def with_bad(value: float, i: int) -> np.ndarray:
        x = np.zeros(dim)
        x[i % dim] = value
        return x

    index = st.integers(0, dim - 1)
    cases = [
        index.map(lambda i: ("nan", with_bad(math.nan, i))),
        index.map(lambda i: ("inf", with_bad(math.inf, i))),
        index.map(lambda i: ("-inf", with_bad(-math.inf, i))),
        st.just(("2-D array", np.zeros((1, dim)))),
        st.just(("integer dtype", np.zeros(dim, dtype=np.int64))),
    ]
    if wrong_length:
        cases.append(st.integers(1, 3).map(lambda k: ("wrong length", np.zeros(dim + k))))
    if wrong_length and dim > 1:
        cases.append(st.integers(1, dim - 1).map(lambda k: ("wrong length", np.zeros(dim - k))))
    if value_range is not None:
        over = st.floats(1.0 + 2.0**-20, 1e6).map(lambda f: f * value_range)
        cases.append(st.tuples(index, over, st.booleans()).map(
            lambda t: ("out of range", with_bad(-t[1] if t[2] else t[1], t[0]))))
    return st.one_of(*cases)


@dataclasses.dataclass(frozen=True)
class Population:
    """Clients' updates and their weights (example counts), one each."""

    updates: tuple[np.ndarray, ...]
    weights: tuple[int, ...]

    def __repr__(self) -> str:
        return f"Population(n={len(self.updates)}, weights={list(self.weights)}, updates={list(self.updates)!r})"


def populations(
    clients: tuple[int, int] = (1, 8),
    dim: int | tuple[int, int] | st.SearchStrategy[int] = (1, 16),
    *,
    value_range: float = 1.0,
    max_weight: int = 10**6,
) -> st.SearchStrategy[Population]:
    """Populations of n clients (n in `clients`) with equal-length updates and weights in [1, max_weight]."""
    def build(n: int, d: int) -> st.SearchStrategy[Population]:
        one = updates(d, value_range=value_range, dtypes=(np.float64,))
        return st.tuples(st.lists(one, min_size=n, max_size=n),
                         st.lists(st.integers(1, max_weight), min_size=n, max_size=n)).map(
            lambda t: Population(tuple(t[0]), tuple(t[1])))

    return st.tuples(st.integers(*clients), _dims(dim)).flatmap(lambda t: build(*t))


def dropout_schedules(
    protocol: AggregationProtocol, n: int, *, too_many: bool | None = None
) -> st.SearchStrategy[dict[int, str]]:
    """``{client: phase}`` dropout schedules for a round of n (the client is silent from that phase on).

    ``too_many=None``: any schedule. ``False``: at most ``n - min_survivors(n)`` clients drop
    (the round may still abort: ``min_survivors`` is necessary, not always sufficient).
    ``True``: more than ``n - min_survivors(n)`` clients drop at or before the input phase,
    so fewer inputs than ``min_survivors(n)`` can arrive and the round must abort.
    """
    phases = list(protocol.phases)
    t = protocol.min_survivors(n)
    early = phases[: input_phase_index(protocol) + 1]

    def build(order: list[int]) -> st.SearchStrategy[dict[int, str]]:
        if too_many is None:
            return st.lists(st.one_of(st.none(), st.sampled_from(phases)), min_size=n, max_size=n).map(
                lambda ps: {c: p for c, p in zip(order, ps) if p is not None})
        if too_many is False:
            return st.integers(0, max(0, n - t)).flatmap(lambda k: st.lists(
                st.sampled_from(phases), min_size=k, max_size=k).map(lambda ps: dict(zip(order, ps))))
        return st.integers(n - t + 1, n).flatmap(lambda k: st.tuples(
            st.lists(st.sampled_from(early), min_size=k, max_size=k),
            st.lists(st.one_of(st.none(), st.sampled_from(phases)), min_size=n - k, max_size=n - k),
        ).map(lambda ps: {**dict(zip(order, ps[0])),
                          **{c: p for c, p in zip(order[k:], ps[1]) if p is not None}}))

    return st.permutations(range(n)).flatmap(build)


# -- configurations -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A parameter set for `cls` at round size `n`; ``expected``: ``"within"``, ``"outside"`` or None.

    The label comes from the published rules (Bonawitz et al. 2017 / fcp/secagg thresholds,
    the HomomorphicEncryption.org 128-bit table), computed here independently of the
    protocol's own code; None where the rules need the protocol's derivations (SecAgg+
    graph degrees, HE noise budgets). ``why`` says which rule decided.
    """

    cls: type[AggregationProtocol]
    kwargs: Mapping[str, Any]
    n: int
    expected: str | None
    why: str = ""

    def build(self) -> AggregationProtocol:
        """The protocol (ConfigurationError if its constructor refuses the parameters)."""
        return self.cls(**self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        label = self.expected or "unknown"
        return f"{self.cls.__name__}({args}) at n={self.n} [expected {label}{': ' + self.why if self.why else ''}]"


_FRACTIONS = [0.0, 0.05, 0.1, 0.2, 1 / 3, 0.45, 0.5, 0.9, 1.0, -0.1]


def _ceil(f: Fraction) -> int:
    return -(-f.numerator // f.denominator)


def _secagg_label(n: int, kw: Mapping[str, Any], plus: bool) -> tuple[str | None, str]:
    """Within/outside by the complete-graph rules (REFERENCES.md, fcp/secagg), recomputed here."""
    gamma, delta = kw["corrupt_fraction"], kw["dropout_fraction"]
    if not (0 <= gamma < 1 and 0 <= delta < 1):
        return "outside", "fractions must be in [0, 1)"
    if kw["adversary"] not in ("semi-honest", "active"):
        return "outside", "unknown adversary"
    if not 2 <= kw["value_bits"] <= 53:
        return "outside", "value_bits outside [2, 53]"
    if kw["value_bits"] + (math.ceil(math.log2(n)) if n > 1 else 0) > 64:
        return "outside", "the modulus of the sum would exceed 64 bits"
    g, d = Fraction(str(gamma)), Fraction(str(delta))
    active = kw["adversary"] == "active"
    if plus and (g + 2 * d if active else g + d) > Fraction(9, 10):
        return "outside", "SecAgg+ needs gamma + delta <= 0.9 (gamma + 2 delta if active)"
    threshold = kw["threshold"]
    if isinstance(threshold, int) and threshold < 1:
        return "outside", "threshold < 1"
    if isinstance(threshold, float) and not 0 < threshold <= 1:
        return "outside", "threshold fraction outside (0, 1]"
    if plus:
        return None, "SecAgg+ degrees and thresholds come from hypergeometric bounds"
    c, dropouts = _ceil(g * n), _ceil(d * n)
    lo = (_ceil((n + g * n) / 2) if active else c) + 1
    lo, hi = max(lo, 2), min(n, n - dropouts)
    t = lo if threshold is None else threshold if isinstance(threshold, int) else _ceil(Fraction(str(threshold)) * n)
    if not lo <= t <= hi:
        return "outside", f"t = {t} outside the allowed {lo}..{hi} (security t > {lo - 1}, liveness t <= n - D = {hi})"
    return "within", f"{lo} <= t = {t} <= {hi}"


def _secagg(cls: type, n: int, plus: bool) -> st.SearchStrategy[Configuration]:
    threshold = st.one_of(st.none(), st.integers(-1, n + 2), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5]))
    fields = {
        "threshold": threshold,
        "adversary": st.sampled_from(["semi-honest", "active", "malicious"]),
        "corrupt_fraction": st.sampled_from(_FRACTIONS),
        "dropout_fraction": st.sampled_from(_FRACTIONS),
        "value_bits": st.integers(1, 60),
    }
    if plus:
        fields["degree"] = st.one_of(st.none(), st.integers(1, max(2, n)))

    def label(kw: dict[str, Any]) -> Configuration:
        expected, why = _secagg_label(n, kw, plus)
        deg = kw.get("degree")
        if plus and deg is not None and (deg < 2 or deg % 2):
            expected, why = "outside", "degree must be even and >= 2"
        return Configuration(cls, kw, n, expected, why)

    return st.fixed_dictionaries(fields).map(label)


#: HomomorphicEncryption.org standard, 128-bit classical security, ternary secrets: N -> max log2 q.
_HE_TABLE = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _he_ring_label(degree: int, bits: Sequence[int] | None) -> tuple[str | None, str]:
    if degree not in _HE_TABLE:
        return "outside", "poly_modulus_degree is not a power of two of the 128-bit table"
    if bits is None:
        return None, "coefficient moduli derived from the noise budget"
    if sum(bits) > _HE_TABLE[degree]:
        return "outside", f"{sum(bits)} coefficient bits exceed {_HE_TABLE[degree]} at N={degree} (128-bit table)"
    if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits) or bits[-1] < max(bits[:-1]):
        return "outside", "primes of 20..60 bits, at least two, the special (last) one the largest"
    return None, "within the 128-bit table; the scale and noise derivations decide"


def _he(cls: type, n: int) -> st.SearchStrategy[Configuration]:
    ckks = cls.__name__ == "CKKS"
    degree = st.sampled_from([4096, 8192, 16384, 3000])
    bits = st.lists(st.sampled_from([20, 30, 40, 50, 60]), min_size=1, max_size=5).map(tuple)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "key_holder": st.sampled_from(["decryptor", "clients", "masked", "server"]),
        "value_range": st.sampled_from([1.0, 100.0, 0.0, -1.0]),
        "poly_modulus_degree": degree,
        "coeff_mod_bit_sizes": bits if ckks else st.one_of(st.none(), bits),
    }
    if ckks:
        fields["precision_bits"] = st.integers(0, 60)
    else:
        fields["value_bits"] = st.integers(1, 60)

    def label(kw: dict[str, Any]) -> Configuration:
        allowed = ("decryptor", "clients") if ckks else ("decryptor", "clients", "masked")
        if kw["key_holder"] not in allowed:
            return Configuration(cls, kw, n, "outside", f"key_holder must be one of {allowed}")
        if kw["value_range"] <= 0:
            return Configuration(cls, kw, n, "outside", "value_range must be > 0")
        if ckks and not 1 <= kw["precision_bits"] <= 52:
            return Configuration(cls, kw, n, "outside", "precision_bits outside [1, 52]")
        if not ckks and not 2 <= kw["value_bits"] <= 53:
            return Configuration(cls, kw, n, "outside", "value_bits outside [2, 53]")
        expected, why = _he_ring_label(kw["poly_modulus_degree"], kw["coeff_mod_bit_sizes"])
        return Configuration(cls, kw, n, expected, why)

    return st.fixed_dictionaries(fields).map(label)


def configurations(
    cls: type[AggregationProtocol], n: int | tuple[int, int] = (1, 12)
) -> st.SearchStrategy[Configuration]:
    """Parameter sets of a shipped protocol class at round sizes `n`, within and outside its conditions.

    Covers :class:`~securefed.protocols.Plain`, ``SecAgg``, ``SecAggPlus``, ``CKKS`` and ``BFV``
    (ValueError for another class: write a strategy for its parameters). A protocol must
    raise ConfigurationError, at construction or for the round size, exactly for the
    parameter sets labelled ``"outside"``, and run the ones labelled ``"within"``.
    """
    sizes = st.integers(*n) if isinstance(n, tuple) else st.just(n)
    if issubclass(cls, Plain):
        return sizes.map(lambda k: Configuration(cls, {}, k, "within", "no parameters"))
    if issubclass(cls, SecAggPlus):
        return sizes.flatmap(lambda k: _secagg(cls, k, plus=True))
    if issubclass(cls, SecAgg):
        return sizes.flatmap(lambda k: _secagg(cls, k, plus=False))
    if issubclass(cls, (CKKS, BFV)):
        return sizes.flatmap(lambda k: _he(cls, k))
    raise ValueError(f"no parameter space is known for {cls.__name__}: write a strategy for its parameters")


# -- malformed messages -------------------------------------------------------------------------

#: Alterations of a reply on its way to the server. "truncate", "extend" and the replays
#: must be rejected; a "bit_flip" may be accepted (it can be another valid message).
TAMPERING_KINDS = ("truncate", "extend", "bit_flip", "duplicate", "other_client", "other_phase",
                   "other_round", "reorder")
MALFORMED_KINDS = ("truncate", "extend", "bit_flip")
REPLAY_KINDS = ("duplicate", "other_client", "other_phase", "other_round", "reorder")


@dataclasses.dataclass(frozen=True)
class Tampering:
    """One alteration of the replies of a round, drawn from a recorded transcript and applied live.

    ``kind`` (:data:`TAMPERING_KINDS`) alters the reply of ``party`` in ``phase``; ``arg`` is
    the kind's parameter: bytes cut from the end (truncate), bytes appended (extend), the
    bit to flip (negative: from the end), the other client, the earlier phase, the other
    round's payload, or the delivery order (reorder, of ``order_of``: the phase's senders).
    Applied to the live reply, so it stays meaningful when a backend's randomness makes each
    run's bytes differ. ``size``: the length of the recorded reply; :attr:`detail` says what
    is done, for messages.
    """

    kind: str
    phase: str
    party: Party
    arg: Any = None
    size: int = 0
    order_of: tuple[Party, ...] = ()

    @property
    def detail(self) -> str:
        who = f"{self.party!r}'s {self.phase!r} reply ({self.size} bytes)"
        if self.kind == "truncate":
            return f"{who} with its last {self.arg} bytes cut"
        if self.kind == "extend":
            return f"{who} with {len(self.arg)} bytes appended"
        if self.kind == "bit_flip":
            byte = self.arg // 8 if self.arg >= 0 else self.size + self.arg // 8
            return f"{who} with bit {self.arg % 8} of byte {byte} flipped"
        if self.kind == "duplicate":
            return f"{who} delivered twice"
        if self.kind == "other_client":
            return f"{self.arg!r}'s {self.phase!r} reply delivered as {self.party!r}'s"
        if self.kind == "other_phase":
            return f"{self.party!r}'s {self.arg!r} reply delivered again in phase {self.phase!r}"
        if self.kind == "other_round":
            return f"{self.party!r}'s {self.phase!r} reply from another round"
        return f"the {self.phase!r} replies delivered in the order {[self.order_of[k] for k in self.arg]}"

    def alter(
        self, phase: str, batch: list[tuple[Party, bytes, str]], history: Sequence[tuple[Party, str, bytes]]
    ) -> list[tuple[Party, bytes, str]]:
        """The replies to deliver in `phase` instead of `batch` (``(party, payload, label)``, in order);
        `history`: every reply of the round so far. Altered replies are labelled with the kind."""
        if phase != self.phase:
            return batch
        if self.kind == "reorder":
            return [batch[k] for k in self.arg] if len(batch) == len(self.arg) else batch
        out = []
        for party, payload, label in batch:
            if party != self.party:
                out.append((party, payload, label))
            elif self.kind == "duplicate":
                out += [(party, payload, label), (party, payload, self.kind)]
            else:
                new = self._replace(payload, batch, history)
                out.append((party, payload, label) if new is None or new == payload else (party, new, self.kind))
        return out

    def _replace(self, payload: bytes, batch: list[tuple[Party, bytes, str]],
                 history: Sequence[tuple[Party, str, bytes]]) -> bytes | None:
        if self.kind == "truncate":
            return payload[: max(0, len(payload) - self.arg)]
        if self.kind == "extend":
            return payload + self.arg
        if self.kind == "bit_flip":
            bit = self.arg if self.arg >= 0 else 8 * len(payload) + self.arg
            return _flip(payload, bit) if 0 <= bit < 8 * len(payload) else None
        if self.kind == "other_client":
            return next((p for who, p, _ in batch if who == self.arg), None)
        if self.kind == "other_phase":
            return next((p for who, ph, p in reversed(history) if who == self.party and ph == self.arg), None)
        return self.arg  # other_round


Transcript = Sequence[tuple[Party, str, bytes]]


def _flip(payload: bytes, bit: int) -> bytes:
    out = bytearray(payload)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def tamperable_replies(transcript: Transcript, kind: str, old: Mapping[tuple[Party, str], bytes] | None,
             phases: Collection[str] | None = None) -> list[int]:
    """Indices of the replies of `transcript` (in `phases`, default all) that a tampering of `kind`
    (one of TAMPERING_KINDS) can alter; `old`: the other round's replies for a replay (None: assume it has them)."""
    first_of_phase: dict[str, int] = {}
    senders: dict[str, set[Party]] = {}
    for i, (party, phase, _) in enumerate(transcript):
        first_of_phase.setdefault(phase, i)
        senders.setdefault(phase, set()).add(party)
    out = []
    for i, (party, phase, payload) in enumerate(transcript):
        ok = {
            "truncate": len(payload) > 0,
            "bit_flip": len(payload) > 0,
            "other_client": len(senders[phase]) > 1,
            "other_phase": any(p == party and ph != phase for p, ph, _ in transcript[:i]),
            "other_round": old is None or (party, phase) in old,
            "reorder": len([1 for _, ph, _ in transcript if ph == phase]) > 1 and first_of_phase[phase] == i,
        }.get(kind, True)
        if ok and (phases is None or phase in phases):
            out.append(i)
    return out


def tamperings(
    transcript: Transcript,
    *,
    other_round: Transcript | None = None,
    kinds: Sequence[str] = TAMPERING_KINDS,
    phases: Collection[str] | None = None,
) -> st.SearchStrategy[Tampering]:
    """Alterations of one reply (or of one phase's delivery order) of `transcript`.

    `transcript` lists ``(party, phase, payload)`` in delivery order, as
    :attr:`~securefed.protocols.base.ServerView.messages` records it; `other_round` is the
    transcript of another round (needed for ``"other_round"``); `phases` limits the altered
    replies to those phases. Kinds the transcript cannot support (a single phase, a single
    sender) are left out; the strategy is empty when none remains.
    """
    unknown = [k for k in kinds if k not in TAMPERING_KINDS]
    if unknown:
        raise ValueError(f"unknown tampering kinds {unknown}; choose from {TAMPERING_KINDS}")
    old = {(party, phase): payload for party, phase, payload in other_round} if other_round is not None else {}

    def pick(i: int, kind: str) -> st.SearchStrategy[Tampering]:
        party, phase, payload = transcript[i]
        members = tuple(p for p, ph, _ in transcript if ph == phase)
        if kind == "truncate":
            arg: st.SearchStrategy[Any] = st.integers(1, len(payload))
        elif kind == "extend":
            arg = st.binary(min_size=1, max_size=16)
        elif kind == "bit_flip":  # near the end (bodies) as often as anywhere (headers): both must be handled
            arg = st.one_of(st.integers(-min(64, 8 * len(payload)), -1), st.integers(0, 8 * len(payload) - 1))
        elif kind == "duplicate":
            arg = st.none()
        elif kind == "other_client":
            arg = st.sampled_from(sorted({p for p in members if p != party}, key=repr))
        elif kind == "other_phase":
            arg = st.sampled_from(sorted({ph for p, ph, _ in transcript[:i] if p == party and ph != phase}, key=repr))
        elif kind == "other_round":
            arg = st.just(old[(party, phase)])
        else:
            arg = st.permutations(range(len(members))).map(tuple)
        return st.builds(Tampering, kind=st.just(kind), phase=st.just(phase), party=st.just(party), arg=arg,
                         size=st.just(len(payload)), order_of=st.just(members if kind == "reorder" else ()))

    options = {k: tamperable_replies(transcript, k, old if other_round is not None else {}, phases) for k in kinds}
    usable = [k for k in kinds if options[k]]
    if not usable:
        return st.nothing()
    return st.sampled_from(usable).flatmap(lambda k: st.sampled_from(options[k]).flatmap(lambda i: pick(i, k)))


# -- deviating servers ----------------------------------------------------------------------------


def deviations(protocol: AggregationProtocol, n: int) -> st.SearchStrategy[Any]:
    """Deviations of the server (:mod:`securefed.testing.adversary`) that apply to `protocol` in a round of n.

    Every protocol: :class:`~securefed.testing.adversary.AskAgain` in any phase. SecAgg and
    SecAgg+ (and subclasses) also: both secrets of a peer, a survivor list below t, everyone
    dropped, replayed old shares (from an honest round that differs from this one by
    construction, whatever ``old_seed`` is), and for the active variant inconsistent survivor
    lists (two different lists by construction) and a substituted public key. Every drawn value
    may shrink to the round's own (0, the first client): no deviation may then become the
    honest protocol. The coalition (:mod:`securefed.testing.coalition`) is not drawn here: it is
    the property ``"coalition"``.
    """
    # Flips in the last byte, where short request bodies (survivor bitmaps) sit, as often as elsewhere.
    flips = st.one_of(st.none(), st.integers(-8, -1), st.integers(-64, -9), st.integers(0, 8 * 64))
    generic = st.builds(adv.AskAgain, phase=st.sampled_from(list(protocol.phases)), index=st.integers(0, n), flip=flips)
    if not isinstance(protocol, MaskedAggregation) or n < 2:
        return generic
    active = protocol.threat_model.active
    client = st.integers(0, n - 1)
    pair = st.permutations(range(n)).map(lambda p: (p[0], p[1]))
    drop_phases = [p for p in adv.DropEveryone.PHASES if active or p != "consistency_check"]
    options = [
        generic,
        pair.map(lambda tv: adv.AskBothSecrets(target=tv[0], victim=tv[1])),
        client.map(lambda t: adv.UnmaskBelowThreshold(t, phase="consistency_check" if active else "unmasking")),
        st.builds(adv.DropEveryone, client, st.sampled_from(drop_phases)),
        st.builds(adv.ReplayOldShares, client, st.integers(0, 2**32 - 1)),
    ]
    if active:
        options += [
            st.builds(adv.InconsistentSurvivorLists, client, st.sets(client),
                      st.sampled_from(["swap", "foreign_signatures"])),
            pair.map(lambda tv: adv.SubstitutePublicKey(target=tv[0], victim=tv[1])),
        ]
    return st.one_of(*options)
