"""One securefed aggregation round over a Flower ``Grid``: the server side of ``protocols/flower.md``.

The protocol's sans-I/O server state machine (the one ``simulate_aggregation``
drives) runs here; each phase is one exchange with the nodes still in the round
(push every request, pull replies until all are in or the phase's timeout
passes). A node that sends nothing in time, returns an error reply, or whose reply
is rejected (malformed, oversized, replayed, out of phase, wrongly signed) is a
dropout in that phase; the round goes on without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.errors import AbortReason, ConfigurationError, MessageRejected, ProtocolAborted
from securefed.flower import _attest, _beacon, _envelope, _identities, _privacy
from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    DropReason,
    DropRecord,
    Party,
    RoundSpec,
    ServerProtocol,
    ServerView,
)
from securefed.protocols.he import HEProtocol

__all__ = ["EVALUATION_BITS", "AggregationRound", "GridAggregator", "RoundOutcome", "evaluation_protocol", "exchange",
           "input_phase", "message_type"]

log = logging.getLogger("securefed.flower")

# Flower error codes that mean the message or node was unreachable (the node sent nothing),
# as opposed to a node that ran and refused (flwr.common.constant.ErrorCode).
_UNREACHABLE = {3, 4, 5}
# A message outlives its phase by this much (a reply that arrives just in time is not expired), and
# not much more: a SuperNode handles its messages one at a time, so stale ones delay current ones.
_TTL_MARGIN = 5.0


def input_phase(protocol: AggregationProtocol) -> str:
    """The phase in which nodes train: the one carrying a client's input
    (:meth:`~securefed.protocols.base.AggregationProtocol.input_phase_index`: ``input_phase``, else the last)."""
    return protocol.phases[protocol.input_phase_index()]


def message_type(protocol: AggregationProtocol, phase: str, party: int | str = 0, *, evaluate: bool = False) -> str:
    """``train`` for a client's input phase (the node trains then; ``evaluate`` in an evaluation round, where
    it evaluates), ``query.<phase>`` for the others and for auxiliary parties (named `party`)."""
    if phase == input_phase(protocol) and isinstance(party, int):
        return "evaluate" if evaluate else "train"
    return f"query.{phase}"


#: Fixed-point bits of an evaluation round's coordinates (each in [-1, 1]: a metric over its bound, weighted):
#: a weight of a few examples under a large ``max_examples`` still has thousands of steps.
EVALUATION_BITS = 32


def evaluation_protocol(protocol: AggregationProtocol) -> AggregationProtocol:
    """The protocol of an evaluation round: `protocol` carrying its inputs, each coordinate in [-1, 1],
    at :data:`EVALUATION_BITS` fixed-point bits where it carries integer encodings (SecAgg, SecAgg+,
    BFV), else `protocol` itself (Plain; CKKS, whose ``value_range`` must then be at least 1).
    Server and nodes derive it the same way from the protocol they train with. ConfigurationError
    for a protocol whose range cannot hold [-1, 1]."""
    from securefed.encoding import FixedPoint

    if protocol.name == "plain":
        return protocol
    try:
        return protocol.with_encoder(FixedPoint(value_range=1.0, value_bits=EVALUATION_BITS))
    except ConfigurationError:
        pass
    value_range = getattr(protocol, "value_range", None)
    if not isinstance(value_range, (int, float)) or value_range < 1:
        raise ConfigurationError(f"federated evaluation needs inputs in [-1, 1]; protocol {protocol.name!r} carries "
                                 f"values within {value_range!r}: declare value_range >= 1")
    return protocol


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    *,
    timeout: float,
    poll_interval: float,
    on_reply: Callable[[int, Message], None],
) -> set[int]:
    """Push `messages`, pull their replies until all are in or `timeout` passes; returns the silent nodes.

    Like ``Grid.send_and_receive`` but each reply is handed to ``on_reply(node, reply)``
    as it arrives (nothing model-sized accumulates) and the poll interval is ours
    (Flower sleeps 3 s between pulls). Replies to other messages are ignored.
    """
    deadline = time.monotonic() + timeout
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    silent = {msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if not mid}
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                on_reply(node, reply)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(poll_interval, remaining))
    return silent | set(pending.values())


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What one round over the grid produced.

    ``result`` is the protocol's :class:`~securefed.protocols.AggregationResult` (client
    i is ``nodes[i]``); ``phase_seconds`` the wall time of each exchange;
    ``bytes_from``/``bytes_to`` the protocol payload bytes per node in each direction.
    """

    result: AggregationResult
    nodes: tuple[int, ...]
    phase_seconds: dict[str, float]
    bytes_from: dict[int, int]
    bytes_to: dict[int, int]

    @property
    def included_nodes(self) -> tuple[int, ...]:
        """Node ids whose inputs are in the total, ascending."""
        return tuple(self.nodes[c] for c in self.result.included)

    @property
    def dropped_nodes(self) -> dict[int, DropRecord]:
        """Node id to the phase and reason it left the round."""
        return {self.nodes[c]: d for c, d in self.result.dropped.items() if isinstance(c, int)}


class AggregationRound:
    """The server side of one round as Flower messages, without I/O (what :class:`GridAggregator` drives).

    :meth:`messages` gives a phase's requests, :meth:`receive` takes one reply (a bad
    reply makes its node a dropout, logged with the reason; it never raises for what a
    node sent), :meth:`finish_phase` closes the phase (ProtocolAborted when too few
    remain), :meth:`outcome` gives the result after the last phase. Client i is the
    i-th smallest node id; the session id binds the node ids (``_envelope.session_id``).
    ``privacy``: a ``CentralDP``/``DistributedDP`` configuration (the nodes must have the
    same); ``auxiliary``: party name to the node that plays it (an HE ``"decryptor"``);
    ``identities``: the federation's public identity keys by node id (active SecAgg); ``run_config``: the
    run's configuration (active SecAgg: an input attested under another is dropped, ``_attest``).
    Active SecAgg+ on a Harary graph first runs the graph beacon (``_beacon``, spec section 12):
    :attr:`phases` is then ``("graph_commit", "graph_reveal", *protocol.phases)`` and the
    protocol's session id, and so its graph, is the beacon's, not the nonce's (:attr:`pre_session`).
    Raises ConfigurationError for such a round without `identities`.
    """

    def __init__(
        self,
        protocol: AggregationProtocol,
        nodes: Iterable[int],
        *,
        round_index: int,
        dim: int,
        rng: RandomSource,
        max_payload_bytes: int | None = None,
        max_examples: int = 0,
        privacy: Any = None,
        auxiliary: Mapping[str, int] | None = None,
        identities: KeyDirectory | None = None,
        evaluate: Sequence[tuple[str, float]] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.nodes = tuple(sorted({int(v) for v in nodes}))
        #: An evaluation round's metrics and their bounds (None: a training round).
        self.evaluate = None if evaluate is None else tuple((str(k), float(b)) for k, b in evaluate)
        if self.evaluate is not None:
            if privacy is not None:
                raise ConfigurationError("federated evaluation releases exact sums of the nodes' metrics, outside the "
                                         "privacy budget: no evaluation rounds with privacy")
            if dim != _envelope.evaluation_dim(len(self.evaluate)):
                raise ConfigurationError(f"an evaluation round of {len(self.evaluate)} metrics has dim "
                                         f"{_envelope.evaluation_dim(len(self.evaluate))}, got {dim}")
            protocol = evaluation_protocol(protocol)
        if not self.nodes:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no nodes to aggregate over")
        self.auxiliary = {str(name): int(v) for name, v in (auxiliary or {}).items()}
        if shared := set(self.auxiliary.values()) & set(self.nodes):
            raise ConfigurationError(f"nodes {sorted(shared)} cannot be both clients and auxiliary parties")
        self.nonce = rng.child("session").token_bytes(32)
        self._node_bytes = _envelope.pack_nodes(self.nodes)
        if identities is not None:
            protocol = _identities.bind(protocol, identities, self.nodes)
        bound = _envelope.binding(round_index, dim, max_examples, _privacy.describe(privacy, protocol, len(self.nodes),
                                                                                    dim), self.evaluate)
        #: The session id of the server's nonce, the node list and the round's per-request choices
        #: (``_envelope.binding``); the protocol's is the beacon's, when the round has one.
        self.pre_session = _envelope.session_id(self.nonce, self._node_bytes, evaluate=self.evaluate is not None,
                                                bound=bound)
        self.beacon: _beacon.ServerBeacon | None = None
        if _beacon.required(protocol, len(self.nodes)):
            if identities is None:
                raise ConfigurationError(
                    f"{protocol.name} with an active adversary on a Harary graph runs the graph beacon on Flower, "
                    "whose reveals are signed: pass the federation's identity keys by node id (identities=)")
            if self.auxiliary:
                raise ConfigurationError("the graph beacon covers clients only: this protocol has no auxiliary parties")
            self.beacon = _beacon.ServerBeacon(self.pre_session, round_index, self.nodes,
                                               _identities.directory(identities, self.nodes))
        self._base, self._privacy, self._rng = protocol, privacy, rng
        self.max_payload = max_payload_bytes or 64 * dim + (1 << 20)
        self.max_examples = max_examples
        self.view = ServerView()
        self.drops: dict[int, DropRecord] = {}
        self.phase_seconds: dict[str, float] = {}
        #: Phases that ran on the previous round's messages (``GridAggregator.run(..., next_nodes=...)``).
        self.ran_ahead: set[str] = set()
        self.bytes_from = dict.fromkeys(self.nodes, 0)
        self.bytes_to = dict.fromkeys(self.nodes, 0)
        self._party: dict[int, Party] = {node: i for i, node in enumerate(self.nodes)}
        self._party.update({node: name for name, node in self.auxiliary.items()})
        #: The digest of the model and config of the input phase, and each accepted input's attestation of it.
        self._model, self._attested = b"", dict[int, bytes]()
        #: The digest of the run's configuration (``run_config``): None accepts the nodes' claim.
        self.run_digest = None if run_config is None else _attest.run_digest(run_config)
        self.server: ServerProtocol | None = None
        self._start(RoundSpec(n=len(self.nodes), dim=dim, session_id=self.pre_session, round_index=round_index),
                    server=self.beacon is None)
        #: Every exchange of the round: the beacon's (when the round has one), then the protocol's phases.
        self.phases: tuple[str, ...] = (_beacon.PHASES if self.beacon else ()) + tuple(self.protocol.phases)

    def _start(self, spec: RoundSpec, *, server: bool) -> None:
        """The round's protocol for session ``spec.session_id`` (with distributed DP, its noise encoder) and,
        with `server`, the protocol's server."""
        self.spec = spec
        #: The round's protocol (with distributed DP: carrying the round's noise encoder).
        self.protocol = _privacy.round_protocol(self._base, self._privacy, session=spec.session_id, dim=spec.dim)
        self._params = _envelope.describe(self.protocol, spec.n,
                                          _privacy.describe(self._privacy, self._base, spec.n, spec.dim), self.evaluate)
        if server:
            self.server = self.protocol.server(spec, rng=self._rng.child("server"))

    def node_of(self, party: Party) -> int:
        """The node that plays `party` (a client index or an auxiliary party's name)."""
        if isinstance(party, int):
            return self.nodes[party]
        if party not in self.auxiliary:
            raise ConfigurationError(f"protocol {self.protocol.name!r} has the auxiliary party {party!r}: name the "
                                     f"node that plays it (auxiliary={{{party!r}: node_id}})")
        return self.auxiliary[party]

    def messages(self, phase: str, *, ttl: float, arrays: ArrayRecord | None = None,
                 config: ConfigRecord | None = None) -> list[Message]:
        """The requests of `phase` to the parties still in the round (`arrays`/`config` go with a client's input
        phase); `phase` is one of :attr:`phases` (the graph beacon's or the protocol's)."""
        protocol, spec = self.protocol, self.spec
        if phase in _beacon.PHASES and self.beacon is not None:
            requests: Mapping[Party, bytes] = {c: b for c, b in self.beacon.requests(phase).items()}  # noqa: C416 - widens the key type
            beacon = b""
        else:
            assert self.server is not None, "the graph beacon runs before the protocol's phases"
            requests = self.server.requests(phase)
            beacon = b"" if self.beacon is None else self.beacon.field(first=phase == protocol.phases[0])
        attesting = _attest.directory(protocol, spec.n) is not None
        if attesting and phase == input_phase(protocol):
            self._model = _attest.digest(arrays if arrays is not None else ArrayRecord(),
                                         config if config is not None else ConfigRecord())
        # Every listed client's attestation: nodes sign the survivor list only when all match their model.
        attest = _attest.pack(self._attested) if attesting and phase == "consistency_check" else b""
        out = []
        for party, payload in requests.items():
            node = self.node_of(party)
            client, name = (party, "") if isinstance(party, int) else (0, party)
            req = _envelope.Request(protocol.name, self._params, phase, spec.round_index, spec.n, spec.dim,
                                    spec.session_id, self.nonce, self._node_bytes, client, name, self.max_examples,
                                    bytes(payload), beacon, attest if isinstance(party, int) else b"")
            content = RecordDict({_envelope.KEY: req.record()})
            kind = message_type(protocol, phase, party, evaluate=self.evaluate is not None)
            if kind in ("train", "evaluate"):
                content["arrays"] = arrays if arrays is not None else ArrayRecord()
                content["config"] = config if config is not None else ConfigRecord()
            out.append(Message(content, node, kind, ttl=ttl, group_id=str(spec.round_index)))
            self.bytes_to[node] = self.bytes_to.get(node, 0) + len(payload) + len(beacon)
        return out

    def _drop(self, party: Party, phase: str, reason: DropReason, detail: str) -> None:
        if isinstance(party, int):
            self.drops[party] = DropRecord(phase, reason, detail)
            who = f"node {self.nodes[party]} (client {party}) dropped"
        else:  # the protocol decides whether the round can go on without it (HE: it aborts)
            who = f"node {self.auxiliary[party]} ({party}) failed"
        log.warning("round %d, phase %s: %s (%s): %s", self.spec.round_index, phase, who, reason.value, detail)

    def receive(self, phase: str, node: int, reply: Message, *, key: str = _envelope.KEY) -> None:
        """Take `node`'s reply in `phase`: into the aggregate, or the node becomes a dropout.

        `key`: the reply's record that answers this round (``_envelope.NEXT_KEY`` when this round's
        request rode ahead on the previous round's message)."""
        party = self._party[node]
        client, name = (party, "") if isinstance(party, int) else (0, party)
        if reply.has_error():
            err = reply.error
            reason = DropReason.NO_REPLY if err.code in _UNREACHABLE else DropReason.REFUSED
            self._drop(party, phase, reason, f"error reply {err.code}: {(err.reason or '')[:200]}")
            return
        try:
            if reply.metadata.src_node_id != node:
                raise MessageRejected("invalid reply: sent by another node")
            env = _envelope.parse_reply(reply.content, max_payload=self.max_payload, key=key)
            if (env.phase, env.round, env.session, env.client, env.party) != (
                    phase, self.spec.round_index, self.spec.session_id, client, name):
                raise MessageRejected("invalid reply: envelope of another round, session, phase or party")
            self.bytes_from[node] = self.bytes_from.get(node, 0) + len(env.payload)
            self.view.digests.append((party, phase, hashlib.sha256(env.payload).hexdigest(), len(env.payload)))
            if phase in _beacon.PHASES and self.beacon is not None:
                assert isinstance(party, int)
                self.beacon.receive(phase, party, env.payload)
            else:
                assert self.server is not None, "the graph beacon runs before the protocol's phases"
                attesting = _attest.directory(self.protocol, self.spec.n)
                if attesting is not None and isinstance(party, int) and phase == input_phase(self.protocol):
                    # before the sum takes the input: one made from another model, config or run config is not
                    signature = _attest.check_input(attesting, party, self.spec.session_id, self._model,
                                                    env.attest, self.run_digest)
                    self.server.receive(phase, party, env.payload)
                    self._attested[party] = signature
                else:
                    self.server.receive(phase, party, env.payload)
        except MessageRejected as e:
            self._drop(party, phase, DropReason.REJECTED, str(e))

    def finish_phase(self, phase: str) -> None:
        """Close `phase`: nodes that did not answer are dropouts. Raises ProtocolAborted.

        After the graph beacon's last phase the protocol's session id is the beacon's, and its server starts."""
        try:
            if phase in _beacon.PHASES and self.beacon is not None:
                for client in range(len(self.nodes)):
                    got = self.beacon.commitments if phase == _beacon.COMMIT else self.beacon.reveals
                    if client not in got and client not in self.drops:
                        self._drop(client, phase, DropReason.NO_REPLY, "sent nothing")
                self.beacon.finish(phase)
                if phase == _beacon.REVEAL:
                    self._start(dataclasses.replace(self.spec, session_id=self.beacon.session), server=True)
                return
            assert self.server is not None, "the graph beacon runs before the protocol's phases"
            self.server.finish_phase(phase)
        except ProtocolAborted as e:
            e.phase = e.phase or phase
            raise

    @property
    def dropped_nodes(self) -> dict[int, DropRecord]:
        """Node id to the phase and reason it left the round, so far."""
        dropped = {**(self.server.dropped if self.server is not None else {}), **self.drops}
        return {self.nodes[c]: d for c, d in dropped.items() if isinstance(c, int)}

    @property
    def setup_phases(self) -> tuple[str, ...]:
        """The phases before the input phase (what may run ahead on the previous round's messages)."""
        return self.phases[:self.phases.index(input_phase(self.protocol))]

    def outcome(self) -> RoundOutcome:
        """The result after the last phase. Raises ProtocolAborted when no input reached the aggregate."""
        if self.server is None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "the round has not run its protocol's phases")
        total, included = self.server.result()
        if not included:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no client input reached the aggregate")
        result = AggregationResult(total, tuple(included), self.view, {**self.server.dropped, **self.drops}, self.spec)
        return RoundOutcome(result, self.nodes, dict(self.phase_seconds), dict(self.bytes_from), dict(self.bytes_to))


class GridAggregator:
    """Runs rounds of `protocol` over a Flower grid.

    - ``phase_timeout``: seconds each phase waits for replies; ``train_timeout`` the same
      for the input phase, where nodes also train;
    - ``poll_interval``: seconds between pulls of replies;
    - ``max_payload_bytes``: larger replies are rejected before parsing (default
      ``64 * dim + 1 MiB``, room for CKKS at 8192 slots);
    - ``privacy``: ``securefed.privacy.CentralDP`` or ``DistributedDP`` (the nodes need
      the same configuration); the caller adds central noise and accounts;
    - ``auxiliary``: party name to the node id that plays it, for protocols with auxiliary
      parties (``{"decryptor": node}`` for CKKS/BFV with a decryptor); that node is not a client;
    - ``identities``: the federation's identity keys by node id (public keys suffice), for the
      active SecAgg variants when participants change between rounds: each round verifies
      against the directory of its own nodes (nodes build theirs from their own copy); needed
      by active SecAgg+ on a Harary graph, whose rounds start with the graph beacon (its reveals
      are signed; spec section 12);
    - ``run_config``: the run's configuration (the ServerApp's ``context.run_config``), for the active
      SecAgg variants: an input whose model attestation names another is dropped before the sum takes
      it; without it the server takes the node's word for it, and one corrupt node's differing claim makes
      the honest nodes refuse the round (``protocols/flower.md`` section 1).

    Raises ConfigurationError for a protocol whose auxiliary party has no node, or
    identities for a protocol without ``with_identities``. See ``protocols/flower.md``.
    """

    def __init__(
        self,
        protocol: AggregationProtocol,
        *,
        phase_timeout: float = 120.0,
        train_timeout: float = 600.0,
        poll_interval: float = 0.2,
        max_payload_bytes: int | None = None,
        privacy: Any = None,
        auxiliary: Mapping[str, int] | None = None,
        identities: KeyDirectory | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        _privacy.check(privacy)
        if identities is not None and not isinstance(identities, KeyDirectory):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory keyed by node id")
        if identities is not None and not hasattr(protocol, "with_identities"):
            raise ConfigurationError(f"protocol {protocol.name!r} takes no identity keys (identities=)")
        self.auxiliary = dict(auxiliary or {})
        self.identities = identities
        self.run_config = None if run_config is None else dict(run_config)
        for name, value in (("phase_timeout", phase_timeout), ("train_timeout", train_timeout),
                            ("poll_interval", poll_interval)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
        self.protocol = protocol
        self.phase_timeout = float(phase_timeout)
        self.train_timeout = float(train_timeout)
        self.poll_interval = float(poll_interval)
        if max_payload_bytes is not None and (isinstance(max_payload_bytes, bool) or not isinstance(
                max_payload_bytes, int) or max_payload_bytes < 1):
            raise ConfigurationError(f"max_payload_bytes must be a positive number of bytes or None (the default "
                                     f"64 * dim + 1 MiB), got {max_payload_bytes!r}")
        self.max_payload_bytes = max_payload_bytes
        self.privacy = privacy
        #: The round :meth:`run` ran last (to inspect who dropped out after a ProtocolAborted).
        self.last_round: AggregationRound | None = None
        #: The next round, whose setup ran ahead on the last round's messages (``run(..., next_nodes=...)``).
        self.prepared: AggregationRound | None = None

    def run(
        self,
        grid: Grid,
        nodes: Iterable[int],
        *,
        round_index: int,
        dim: int,
        rng: RandomSource,
        arrays: ArrayRecord | None = None,
        config: ConfigRecord | None = None,
        max_examples: int = 0,
        next_nodes: Iterable[int] | None = None,
        next_rng: RandomSource | None = None,
    ) -> RoundOutcome:
        """One round with `nodes` (client i is the i-th smallest node id) on vectors of length `dim`.

        `arrays` and `config` travel with the input phase's requests (the model to train
        and the training configuration); ``max_examples`` > 0 asks nodes to weight their
        update by their example count capped there (0: uniform). `rng` gives the session
        id and the server's coins. Raises ProtocolAborted when the round cannot finish safely.

        ``next_nodes``: the sample of round ``round_index + 1``, drawn before this round starts. Its
        setup (the phases before its input phase, with its own session and keys) then rides on this
        round's messages from the input phase on, one setup phase per message (:attr:`prepared`), and
        the next call with exactly those nodes, that round index, `dim` and `max_examples` goes on from
        there: two client messages per round in steady state (``protocols/flower.md``, section 3). Any
        other next call discards it and runs the full setup. Rounds with the graph beacon, auxiliary
        parties or an HE protocol run no setup ahead (``next_nodes`` is then ignored). ``next_rng``: that
        round's randomness (default ``rng.child("ahead/<round_index + 1>")``); the strategy passes what the
        round would get on its own, so a seeded run is the same with or without the setup riding ahead.
        """
        rnd = self._take_prepared(nodes, round_index, dim, max_examples) or AggregationRound(
            self.protocol, nodes, round_index=round_index, dim=dim, rng=rng, max_payload_bytes=self.max_payload_bytes,
            max_examples=max_examples, privacy=self.privacy, auxiliary=self.auxiliary, identities=self.identities,
            run_config=self.run_config)
        ahead = None if next_nodes is None else self._ahead_round(
            next_nodes, round_index + 1, dim, rng.child(f"ahead/{round_index + 1}") if next_rng is None else next_rng,
            max_examples)
        self.last_round = rnd
        ahead = self._phases(grid, rnd, arrays, config, ahead)
        outcome = rnd.outcome()
        self.prepared = ahead
        return outcome

    def _phases(self, grid: Grid, rnd: AggregationRound, arrays: ArrayRecord | None, config: ConfigRecord | None,
                ahead: AggregationRound | None) -> AggregationRound | None:
        """Run `rnd`'s phases that did not run ahead, `ahead`'s setup phases riding on them from the input phase
        on; returns `ahead`, or None when one of its phases aborted it."""
        carry = list(ahead.setup_phases) if ahead is not None else []
        start = rnd.phases.index(input_phase(rnd.protocol))
        for i, phase in enumerate(rnd.phases):
            if phase in rnd.ran_ahead:
                continue
            timeout = self.train_timeout if phase == input_phase(rnd.protocol) else self.phase_timeout
            messages = rnd.messages(phase, ttl=timeout + _TTL_MARGIN, arrays=arrays, config=config)
            rides = carry.pop(0) if ahead is not None and carry and messages and i >= start else None
            t0 = time.perf_counter()
            if messages:
                ahead = self._exchange(grid, rnd, phase, messages, ahead, rides, timeout)
            rnd.phase_seconds[phase] = time.perf_counter() - t0
            rnd.finish_phase(phase)
        return ahead

    def evaluate(
        self,
        grid: Grid,
        nodes: Iterable[int],
        *,
        round_index: int,
        metrics: Sequence[tuple[str, float]],
        rng: RandomSource,
        arrays: ArrayRecord,
        config: ConfigRecord | None = None,
        max_examples: int = 1000,
    ) -> RoundOutcome:
        """One evaluation round of round `round_index`'s model (`arrays`) with `nodes`: each node evaluates it,
        and the protocol sums its input (``_envelope.evaluation_dim``: each metric ``m_i`` clamped to its bound
        ``b_i`` over ``b_i``, weighted by ``w = min(examples, max_examples) / max_examples``, then ``w``, which
        metrics were clamped, and whether they were not finite) over the included nodes; the server learns only
        that sum (``protocols/flower.md``, section 6, "Federated evaluation"). Its own session (of the evaluation
        kind) and keys; nothing rides ahead and the round prepared by :meth:`run` stays prepared. Raises
        ProtocolAborted when the round cannot finish safely, ConfigurationError with privacy."""
        if not isinstance(max_examples, int) or max_examples < 1:
            raise ConfigurationError(f"max_examples must be a positive int, got {max_examples!r}")
        # Payloads as large as the training round's: an HE key holder's setup does not shrink with the input.
        model = sum(math.prod(a.shape) for a in arrays.values())
        rnd = AggregationRound(self.protocol, nodes, round_index=round_index,
                               dim=_envelope.evaluation_dim(len(metrics)), rng=rng,
                               max_payload_bytes=self.max_payload_bytes or 64 * max(model, 1) + (1 << 20),
                               max_examples=max_examples,
                               privacy=self.privacy, auxiliary=self.auxiliary, identities=self.identities,
                               run_config=self.run_config,
                               evaluate=metrics)
        self.last_round = rnd
        self._phases(grid, rnd, arrays, config, None)
        return rnd.outcome()

    def _take_prepared(self, nodes: Iterable[int], round_index: int, dim: int,
                       max_examples: int) -> AggregationRound | None:
        """The round prepared by the previous :meth:`run` when it is this one (same nodes and settings)."""
        prepared, self.prepared = self.prepared, None
        if prepared is None:
            return None
        if (prepared.nodes, prepared.spec.round_index, prepared.spec.dim, prepared.max_examples) == (
                tuple(sorted({int(v) for v in nodes})), round_index, dim, max_examples):
            return prepared
        log.info("round %d: its setup ran ahead for other nodes or settings: it runs the full setup", round_index)
        return None

    def _ahead_round(self, nodes: Iterable[int], round_index: int, dim: int, rng: RandomSource,
                     max_examples: int) -> AggregationRound | None:
        """Round `round_index` with `nodes` and randomness `rng`, to run its setup ahead; None where none runs
        ahead."""
        nodes = sorted({int(v) for v in nodes})
        if not nodes or self.auxiliary or isinstance(self.protocol, HEProtocol) or _beacon.required(
                self.protocol, len(nodes)):
            return None
        rnd = AggregationRound(self.protocol, nodes, round_index=round_index, dim=dim,
                               rng=rng, max_payload_bytes=self.max_payload_bytes,
                               max_examples=max_examples, privacy=self.privacy, identities=self.identities,
                               run_config=self.run_config)
        return rnd if rnd.setup_phases else None

    def _exchange(self, grid: Grid, rnd: AggregationRound, phase: str, messages: list[Message],
                  ahead: AggregationRound | None, rides: str | None, timeout: float) -> AggregationRound | None:
        """One exchange of `rnd`'s `phase`, carrying `ahead`'s setup phase `rides` (None: nothing rides) on the
        same messages; returns `ahead`, or None when that phase aborted it (its round then runs the full setup)."""
        mine = {m.metadata.dst_node_id for m in messages}
        theirs: set[int] = set()
        if ahead is not None and rides is not None:
            extra = ahead.messages(rides, ttl=timeout + _TTL_MARGIN)
            theirs = {m.metadata.dst_node_id for m in extra}
            messages = _bundle(messages, extra)

        def on_reply(node: int, reply: Message) -> None:
            if node in mine:
                rnd.receive(phase, node, reply)
            if node in theirs:
                assert ahead is not None and rides is not None
                ahead.receive(rides, node, reply, key=_envelope.NEXT_KEY if node in mine else _envelope.KEY)

        silent = exchange(grid, messages, timeout=timeout, poll_interval=self.poll_interval, on_reply=on_reply)
        for node in sorted(silent):
            log.warning("round %d, phase %s: node %d sent nothing within %.0f s",
                        rnd.spec.round_index, phase, node, timeout)
        if ahead is None or rides is None:
            return ahead
        try:
            ahead.finish_phase(rides)
        except ProtocolAborted as e:
            log.warning("round %d, phase %s (run ahead): %s; that round will run its full setup",
                        ahead.spec.round_index, rides, e)
            return None
        ahead.ran_ahead.add(rides)
        return ahead


def _bundle(messages: Sequence[Message], extra: Sequence[Message]) -> list[Message]:
    """`messages`, each also carrying the envelope of `extra`'s message to the same node (under
    ``_envelope.NEXT_KEY``); `extra`'s messages to other nodes go as they are."""
    by_node = {m.metadata.dst_node_id: m for m in messages}
    out = list(messages)
    for m in extra:
        carrier = by_node.get(m.metadata.dst_node_id)
        if carrier is None:
            out.append(m)
        else:
            carrier.content[_envelope.NEXT_KEY] = m.content[_envelope.KEY]
    return out
