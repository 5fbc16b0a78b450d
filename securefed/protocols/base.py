"""What every aggregation protocol provides, and the driver that runs one round in one process.

A protocol is a pair of sans-I/O state machines (Google fcp/secagg style): a
server side and a client side that take and return messages as bytes, never
sockets. The same objects are driven by :func:`simulate_aggregation`, by the
trainer and by the Flower runtime (``securefed.flower``). One round goes, for
each phase in ``protocol.phases``:

1. ``server.requests(phase)`` gives the message for each party still in the round;
2. each party that has not dropped answers with ``handle(phase, request)``
   (``None`` means it sends nothing in this phase);
3. the server takes each answer with ``receive`` (a bad one raises
   MessageRejected and makes its sender a dropout; the accumulator is untouched);
4. ``server.finish_phase(phase)`` closes the phase, or raises ProtocolAborted
   when too few parties remain.

Then ``server.result()`` gives the decoded sum and who is in it. See
``protocols/base.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import check_positive_count, check_sum, check_vector
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
)

__all__ = [
    "AggregationProtocol",
    "AggregationResult",
    "ClientProtocol",
    "DropReason",
    "DropRecord",
    "LazyInputs",
    "Party",
    "RoundSpec",
    "ServerProtocol",
    "ServerView",
    "check_dropouts",
    "check_inputs",
    "simulate_aggregation",
]

#: A client is an int in 0..n-1; auxiliary parties (an HE decryptor) have names.
Party = int | str


class DropReason(enum.Enum):
    """Why a client left a round (recorded by the server, logged and audited)."""

    NO_REPLY = "no_reply"  # sent nothing in the phase (crash, timeout, network)
    REJECTED = "rejected"  # its message raised MessageRejected
    REFUSED = "refused"  # it aborted, refusing the server's request


@dataclasses.dataclass(frozen=True)
class DropRecord:
    """One client's exit from a round: the phase where it happened and why."""

    phase: str
    reason: DropReason
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, DropReason):  # the audit log records reason.value: no free strings
            raise TypeError(f"DropRecord.reason must be a DropReason, got {self.reason!r}")


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """Public parameters of one round, known to every party.

    ``n`` clients numbered 0..n-1 each hold a vector of length ``dim``;
    ``session_id`` (32 bytes of public round randomness) is bound into every
    message and derived key, so nothing carries over between rounds.
    """

    n: int
    dim: int
    session_id: bytes
    round_index: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.session_id, (bytearray, memoryview)):
            object.__setattr__(self, "session_id", bytes(self.session_id))
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (self.n, self.dim)):
            raise InvalidInput(f"a round needs integer n and dim, got n={self.n!r}, dim={self.dim!r}")
        if not isinstance(self.session_id, bytes):
            raise ConfigurationError(f"session_id must be 32 bytes, got a {type(self.session_id).__name__}: "
                                     "pass bytes (e.g. bytes.fromhex(hex_string))")
        if isinstance(self.round_index, bool) or not isinstance(self.round_index, (int, np.integer)):
            raise ConfigurationError(f"round_index must be an int, got {self.round_index!r}")
        if self.n < 1 or self.dim < 1:
            raise InvalidInput(f"a round needs n >= 1 clients and dim >= 1, got n={self.n}, dim={self.dim}")
        if len(self.session_id) != 32:
            raise ConfigurationError(f"session_id must be 32 bytes, got {len(self.session_id)}")
        if not 0 <= self.round_index < 2**32:
            raise ConfigurationError("round_index must fit in 32 bits")


class ClientProtocol(abc.ABC):
    """One client's state machine for one round."""

    @abc.abstractmethod
    def handle(self, phase: str, request: bytes) -> bytes | None:
        """Answer the server's request for `phase`; ``None`` sends nothing.

        Raises MessageRejected for a bad request and ProtocolAborted when the
        client refuses to go on (it then reveals nothing more).
        """

    def set_input(self, x: np.ndarray) -> None:
        """Give the client its input vector (before the phase that uploads it)."""
        raise NotImplementedError

    def dump(self) -> bytes:
        """The client's state between phases as bytes (no pickle), for runtimes that do not keep
        the object alive between messages (Flower keeps it in the node's context).
        Restore with :meth:`AggregationProtocol.load_client`. Holds secrets: keep it on the node."""
        raise NotImplementedError(f"{type(self).__name__} cannot be serialized")


class ServerProtocol(abc.ABC):
    """The server's state machine for one round; it holds one accumulator, never n inputs."""

    @abc.abstractmethod
    def requests(self, phase: str) -> Mapping[Party, bytes]:
        """The request for each party that takes part in `phase` (empty: nothing to do)."""

    @abc.abstractmethod
    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        """Take one party's answer. Raises MessageRejected (and drops the party) for a bad one."""

    @abc.abstractmethod
    def finish_phase(self, phase: str) -> None:
        """Close `phase`: parties that did not answer become dropouts. Raises ProtocolAborted."""

    @abc.abstractmethod
    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """``(total, included)`` after the last phase: the float64 sum and its clients, ascending."""

    @property
    @abc.abstractmethod
    def dropped(self) -> Mapping[int, DropRecord]:
        """Clients that left the round, with the phase and reason."""


class AggregationProtocol(abc.ABC):
    """A secure (or plain) summation protocol: configuration plus factories for its parties."""

    #: Short stable name, used in logs, the audit trail and the CLI.
    name: str = ""
    #: Phase names in order.
    phases: tuple[str, ...] = ()
    #: The phase whose message carries a client's input ("" means the last phase): a client is in
    #: the aggregate only if it answered every client phase up to this one, and may drop after it
    #: (SecAgg: "masked_input"). The audit verifier checks this.
    input_phase: str = ""

    @classmethod
    def input_phase_index(cls) -> int:
        """Index in ``phases`` of the phase that carries a client's input: ``input_phase``, or the last
        phase when it is unset. ConfigurationError if ``input_phase`` names no phase."""
        if not cls.input_phase:
            return len(cls.phases) - 1
        if cls.input_phase not in cls.phases:
            raise ConfigurationError(f"input_phase {cls.input_phase!r} is not one of the phases {cls.phases}")
        return cls.phases.index(cls.input_phase)

    @abc.abstractmethod
    def server(self, spec: RoundSpec, *, rng: RandomSource) -> ServerProtocol:
        """A fresh server state machine for the round `spec`."""

    @abc.abstractmethod
    def client(
        self, spec: RoundSpec, client: int, x: np.ndarray | None = None, *, rng: RandomSource
    ) -> ClientProtocol:
        """A fresh state machine for `client` in `spec`; `x` may also come later by ``set_input``."""

    def with_encoder(self, encoder: Any) -> AggregationProtocol:
        """A copy of this protocol carrying inputs with `encoder` (an
        :class:`~securefed.encoding.IntegerEncoder`, e.g. a distributed-DP mechanism).

        Raises ConfigurationError for protocols that do not carry integer encodings."""
        raise ConfigurationError(f"protocol {self.name!r} does not carry integer encodings")

    def load_client(self, data: bytes, *, rng: RandomSource) -> ClientProtocol:
        """Restore a client state machine saved by :meth:`ClientProtocol.dump`."""
        raise NotImplementedError(f"{type(self).__name__} clients cannot be restored")

    @classmethod
    def check_description(cls, description: Mapping[str, Any]) -> list[str]:
        """Problems with a recorded parameter set (from :meth:`describe`), for auditors.

        Returns one line per violated condition of the declared threat model; empty
        when the parameters are sound. The default checks nothing protocol-specific.
        """
        return []

    def auxiliary(self, spec: RoundSpec, *, rng: RandomSource) -> dict[str, ClientProtocol]:
        """Parties other than clients and server (for example an HE decryptor); none by default."""
        return {}

    def error_bound(self, n: int) -> float:
        """Worst-case absolute error per coordinate of the decoded sum of up to n inputs.

        ConfigurationError unless n is a positive integer."""
        check_positive_count(n, "the number of clients")
        return 0.0

    def min_survivors(self, n: int) -> int:
        """The fewest clients that must survive every phase for a round of n to finish."""
        return 1

    def describe(self, n: int) -> dict[str, Any]:
        """Parameters in force for a round of n clients (for logs and the audit trail)."""
        return {"protocol": self.name, "n": n, "min_survivors": self.min_survivors(n)}


@dataclasses.dataclass
class ServerView:
    """What the server received: ``messages`` holds ``(client, phase, payload_bytes)``.

    With ``record="digest"`` the payloads are not kept; ``digests`` always holds
    ``(client, phase, sha256_hex, size)`` for each message (the audit trail's record).
    """

    messages: list[tuple[Party, str, bytes]] = dataclasses.field(default_factory=list)
    digests: list[tuple[Party, str, str, int]] = dataclasses.field(default_factory=list)

    def bytes_from(self, party: Party) -> int:
        """Total bytes received from `party`."""
        return sum(size for p, _, _, size in self.digests if p == party)


@dataclasses.dataclass(frozen=True)
class AggregationResult:
    """The outcome of one round: the float64 sum of the included clients' inputs."""

    total: np.ndarray
    included: tuple[int, ...]
    server_view: ServerView
    dropped: Mapping[int, DropRecord]
    spec: RoundSpec


class LazyInputs(Sequence[np.ndarray]):
    """Client inputs made on demand, for rounds whose inputs do not fit in memory together.

    ``LazyInputs(n, dim, make)``: ``make(i)`` returns client i's 1-D float vector of length
    `dim`. :func:`simulate_aggregation` asks for input i only when client i makes the message
    that carries it (the protocol's ``input_phase``) and lets it go right after, so a round
    holds one input at a time; each access calls `make` again. Indexing checks the vector and
    normalises it like any client input (``encoding.check_vector``: InvalidInput for a wrong
    shape or dtype; a torch tensor, float16 or big-endian array converts).
    """

    def __init__(self, n: int, dim: int, make: Callable[[int], np.ndarray]) -> None:
        if not isinstance(n, int) or n < 1 or not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"LazyInputs needs n >= 1 clients and dim >= 1, got n={n!r}, dim={dim!r}")
        if not callable(make):
            raise InvalidInput("LazyInputs needs a callable make(i) returning client i's input")
        self.n, self.dim, self._make = n, dim, make

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not isinstance(i, (int, np.integer)) or not -self.n <= i < self.n:
            raise IndexError(f"client index {i!r} out of range for {self.n} clients")
        return check_vector(_as_array(self._make(int(i) % self.n)), self.dim)

    def __repr__(self) -> str:
        return f"LazyInputs(n={self.n}, dim={self.dim})"


def _as_array(x: object) -> object:
    """A list (or other array-like) as a numpy array; arrays and torch tensors go to check_vector as they are."""
    if isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] == "torch":
        return x
    try:
        return np.asarray(x)
    except ValueError as e:  # ragged nesting
        raise InvalidInput(f"an input must be a 1-D float vector; numpy cannot read this {type(x).__name__}: "
                           f"{e}") from None


def check_inputs(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The clients' inputs of a simulated round as 1-D float arrays of one length; InvalidInput otherwise."""
    if getattr(inputs, "ndim", None) == 2:  # a numpy array or torch tensor, one row per client
        inputs = list(inputs)
    if not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise InvalidInput("inputs must be a non-empty sequence of 1-D float arrays, one per client")
    xs = [check_vector(_as_array(x)) for x in inputs]
    dims = {x.size for x in xs}
    if len(dims) != 1:
        raise InvalidInput(f"all inputs must have the same length, got lengths {sorted(dims)}")
    return xs


def check_dropouts(protocol: AggregationProtocol, n: int, dropouts: Mapping[int, str] | None) -> dict[int, int]:
    """``{client: index of the first phase it misses}`` from ``{client: phase}``; InvalidInput for a bad map."""
    if dropouts is not None and not isinstance(dropouts, Mapping):
        raise InvalidInput(f"dropouts must be a mapping {{client: phase}} such as {{1: {protocol.phases[0]!r}}}, "
                           f"got a {type(dropouts).__name__}")
    out: dict[int, int] = {}
    for c, phase in (dropouts or {}).items():
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n:
            raise InvalidInput(f"dropout key {c!r} is not a client index in 0..{n - 1}")
        if not isinstance(phase, str) or phase not in protocol.phases:  # str first: `in` compares arrays elementwise
            raise InvalidInput(f"dropout phase {phase!r} is not one of {protocol.phases}")
        out[int(c)] = protocol.phases.index(phase)
    return out


def _check_options(seed: object, record: object, session_id: object) -> None:
    """ConfigurationError for a `seed`, `record` or `session_id` that simulate_aggregation cannot use."""
    if not (seed is None or isinstance(seed, (bytes, bytearray))
            or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0)):
        raise ConfigurationError(f"seed must be None, a non-negative int or bytes, got {seed!r}")
    if record is not None and (not isinstance(record, str) or record not in ("full", "digest")):
        raise ConfigurationError(f"record must be 'full' or 'digest' (None: the default), got {record!r}")
    if session_id is not None and not isinstance(session_id, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"session_id must be 32 bytes, got a {type(session_id).__name__}: pass bytes "
                                 "(e.g. bytes.fromhex(hex_string)), or None for one derived from the seed")


def simulate_aggregation(
    protocol: AggregationProtocol,
    inputs: Sequence[np.ndarray],
    dropouts: Mapping[int, str] | None = None,
    seed: int | bytes | None = None,
    *,
    record: Literal["full", "digest"] | None = None,
    round_index: int = 0,
    session_id: bytes | None = None,
) -> AggregationResult:
    """Run one round with every party in this process and record the server's view.

    `inputs[i]` is client i's 1-D float vector, or `inputs` is a :class:`LazyInputs`
    (each input made when its client uploads, checked then); ``dropouts[i] = phase`` makes
    client i send nothing in `phase` or later. A `seed` makes every key and coin
    reproducible (simulation only). ``record="digest"`` keeps only SHA-256 digests
    of what the server received, for model-sized runs (the default for LazyInputs;
    ``"full"`` otherwise). ``session_id``: the round's 32 bytes of public randomness (default:
    from the seed), to compare with a runtime that derives its own (Flower's binds the node ids).

    Raises InvalidInput for bad inputs or dropouts, and for a sum that overflows float64 (a
    sum of finite inputs can: it is an error, never a result); ConfigurationError for a bad
    `seed`, `record` or `session_id`; ProtocolAborted when the round cannot finish safely.
    See ``protocols/base.md``.
    """
    _check_options(seed, record, session_id)
    lazy = isinstance(inputs, LazyInputs)
    xs: Sequence[np.ndarray | None]
    if isinstance(inputs, LazyInputs):
        xs = [None] * len(inputs)
        dim = inputs.dim
    else:
        checked = check_inputs(inputs)
        xs, dim = checked, checked[0].size
    record = record or ("digest" if lazy else "full")
    n = len(xs)
    drop_at = check_dropouts(protocol, n, dropouts)
    rng = RandomSource(int(seed) if isinstance(seed, np.integer) else seed)
    session = rng.child("session").token_bytes(32) if session_id is None else session_id
    spec = RoundSpec(n=n, dim=dim, session_id=session, round_index=round_index)
    server = protocol.server(spec, rng=rng.child("server"))
    parties: dict[Party, ClientProtocol] = {
        i: protocol.client(spec, i, xs[i], rng=rng.child(f"client/{i}")) for i in range(n)
    }
    parties.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    input_phase = protocol.phases[protocol.input_phase_index()]
    view = ServerView()
    for p, phase in enumerate(protocol.phases):
        for party, request in server.requests(phase).items():
            if isinstance(party, int) and drop_at.get(party, len(protocol.phases)) <= p:
                continue
            if lazy and phase == input_phase and isinstance(party, int):
                parties[party].set_input(inputs[party])  # made and checked now; the client lets it go once sent
            try:
                reply = parties[party].handle(phase, request)
            except (ProtocolAborted, MessageRejected):
                continue  # the party refuses; the server sees silence and records the drop
            if reply is None:
                continue
            view.digests.append((party, phase, hashlib.sha256(reply).hexdigest(), len(reply)))
            if record == "full":
                view.messages.append((party, phase, bytes(reply)))
            try:
                server.receive(phase, party, reply)
            except MessageRejected:
                pass  # the server has recorded the drop; the round goes on without it
            del reply  # a model-sized message: free it before the next party makes its own
        server.finish_phase(phase)
    total, included = server.result()
    if not included:
        raise ProtocolAborted(AbortReason.NO_INPUTS, "no client input reached the aggregate")
    check_sum(total, len(included))  # the built-in servers check too; this covers any protocol
    return AggregationResult(total, included, view, dict(server.dropped), spec)
