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
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from securefed.crypto.random import RandomSource
from securefed.errors import AbortReason, ConfigurationError, MessageRejected, ProtocolAborted
from securefed.flower import _envelope, _privacy
from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    DropReason,
    DropRecord,
    RoundSpec,
    ServerView,
)

__all__ = ["AggregationRound", "GridAggregator", "RoundOutcome", "exchange", "input_phase", "message_type"]

log = logging.getLogger("securefed.flower")

# Flower error codes that mean the message or node was unreachable (the node sent nothing),
# as opposed to a node that ran and refused (flwr.common.constant.ErrorCode).
_UNREACHABLE = {3, 4, 5}
# A message outlives its phase by this much (a reply that arrives just in time is not expired), and
# not much more: a SuperNode handles its messages one at a time, so stale ones delay current ones.
_TTL_MARGIN = 5.0


def input_phase(protocol: AggregationProtocol) -> str:
    """The phase in which nodes train: the protocol's declared ``input_phase``, else its first phase.

    Training before the first phase is always correct (the input is set before any
    phase needs it), only earlier than necessary; a protocol that declares where its
    input enters lets nodes that drop out before that phase skip training.
    """
    return protocol.input_phase or protocol.phases[0]


def message_type(protocol: AggregationProtocol, phase: str) -> str:
    """``train`` for the input phase (the node trains then), ``query.<phase>`` for the others."""
    return "train" if phase == input_phase(protocol) else f"query.{phase}"


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
    i-th smallest node id. ``privacy``: a ``CentralDP``/``DistributedDP`` configuration
    (the nodes must have the same).
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
    ) -> None:
        self.nodes = tuple(sorted(set(int(v) for v in nodes)))
        if not self.nodes:
            raise ProtocolAborted(AbortReason.NO_INPUTS, "no nodes to aggregate over")
        self.spec = RoundSpec(n=len(self.nodes), dim=dim, session_id=rng.child("session").token_bytes(32),
                              round_index=round_index)
        #: The round's protocol (with distributed DP: carrying the round's noise encoder).
        self.protocol = _privacy.round_protocol(protocol, privacy, session=self.spec.session_id, dim=dim)
        self.server = self.protocol.server(self.spec, rng=rng.child("server"))
        self.max_payload = max_payload_bytes or 64 * dim + (1 << 20)
        self.max_examples = max_examples
        self.view = ServerView()
        self.drops: dict[int, DropRecord] = {}
        self.phase_seconds: dict[str, float] = {}
        self.bytes_from = dict.fromkeys(self.nodes, 0)
        self.bytes_to = dict.fromkeys(self.nodes, 0)
        self._client = {node: i for i, node in enumerate(self.nodes)}
        self._params = _envelope.describe(self.protocol, self.spec.n)

    def messages(self, phase: str, *, ttl: float, arrays: ArrayRecord | None = None,
                 config: ConfigRecord | None = None) -> list[Message]:
        """The requests of `phase` to the nodes still in the round (`arrays`/`config` go with the input phase)."""
        protocol, spec = self.protocol, self.spec
        out = []
        for party, payload in self.server.requests(phase).items():
            if not isinstance(party, int):
                raise ConfigurationError(f"protocol {protocol.name!r} has auxiliary parties ({party!r}); "
                                         "the Flower runtime does not support them yet")
            req = _envelope.Request(protocol.name, self._params, phase, spec.round_index, spec.n, spec.dim,
                                    spec.session_id, party, self.max_examples, bytes(payload))
            content = RecordDict({_envelope.KEY: req.record()})
            if phase == input_phase(protocol):
                content["arrays"] = arrays if arrays is not None else ArrayRecord()
                content["config"] = config if config is not None else ConfigRecord()
            out.append(Message(content, self.nodes[party], message_type(protocol, phase), ttl=ttl,
                               group_id=str(spec.round_index)))
            self.bytes_to[self.nodes[party]] += len(payload)
        return out

    def _drop(self, client: int, phase: str, reason: DropReason, detail: str) -> None:
        self.drops[client] = DropRecord(phase, reason, detail)
        log.warning("round %d, phase %s: node %d (client %d) dropped (%s): %s",
                    self.spec.round_index, phase, self.nodes[client], client, reason.value, detail)

    def receive(self, phase: str, node: int, reply: Message) -> None:
        """Take `node`'s reply in `phase`: into the aggregate, or the node becomes a dropout."""
        client = self._client[node]
        if reply.has_error():
            err = reply.error
            reason = DropReason.NO_REPLY if err.code in _UNREACHABLE else DropReason.REFUSED
            self._drop(client, phase, reason, f"error reply {err.code}: {(err.reason or '')[:200]}")
            return
        try:
            if reply.metadata.src_node_id != node:
                raise MessageRejected("invalid reply: sent by another node")
            env = _envelope.parse_reply(reply.content, max_payload=self.max_payload)
            if (env.phase, env.round, env.session, env.client) != (phase, self.spec.round_index,
                                                                     self.spec.session_id, client):
                raise MessageRejected("invalid reply: envelope of another round, session, phase or client")
            self.bytes_from[node] += len(env.payload)
            self.view.digests.append((client, phase, hashlib.sha256(env.payload).hexdigest(), len(env.payload)))
            self.server.receive(phase, client, env.payload)
        except MessageRejected as e:
            self._drop(client, phase, DropReason.REJECTED, str(e))

    def finish_phase(self, phase: str) -> None:
        """Close `phase`: nodes that did not answer are dropouts. Raises ProtocolAborted."""
        try:
            self.server.finish_phase(phase)
        except ProtocolAborted as e:
            e.phase = e.phase or phase
            raise

    @property
    def dropped_nodes(self) -> dict[int, DropRecord]:
        """Node id to the phase and reason it left the round, so far."""
        dropped = {**self.server.dropped, **self.drops}
        return {self.nodes[c]: d for c, d in dropped.items() if isinstance(c, int)}

    def outcome(self) -> RoundOutcome:
        """The result after the last phase. Raises ProtocolAborted when no input reached the aggregate."""
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
      the same configuration); the caller adds central noise and accounts.

    Raises ConfigurationError for protocols with auxiliary parties (not supported on
    Flower yet). See ``protocols/flower.md``.
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
    ) -> None:
        _privacy.check(privacy)
        for name, value in (("phase_timeout", phase_timeout), ("train_timeout", train_timeout),
                            ("poll_interval", poll_interval)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
        self.protocol = protocol
        self.phase_timeout = float(phase_timeout)
        self.train_timeout = float(train_timeout)
        self.poll_interval = float(poll_interval)
        self.max_payload_bytes = max_payload_bytes
        self.privacy = privacy
        #: The round :meth:`run` ran last (to inspect who dropped out after a ProtocolAborted).
        self.last_round: AggregationRound | None = None

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
    ) -> RoundOutcome:
        """One round with `nodes` (client i is the i-th smallest node id) on vectors of length `dim`.

        `arrays` and `config` travel with the input phase's requests (the model to train
        and the training configuration); ``max_examples`` > 0 asks nodes to weight their
        update by their example count capped there (0: uniform). `rng` gives the session
        id and the server's coins. Raises ProtocolAborted when the round cannot finish safely.
        """
        rnd = AggregationRound(self.protocol, nodes, round_index=round_index, dim=dim, rng=rng,
                               max_payload_bytes=self.max_payload_bytes, max_examples=max_examples,
                               privacy=self.privacy)
        self.last_round = rnd
        for phase in rnd.protocol.phases:
            timeout = self.train_timeout if phase == input_phase(rnd.protocol) else self.phase_timeout
            messages = rnd.messages(phase, ttl=timeout + _TTL_MARGIN, arrays=arrays, config=config)
            t0 = time.perf_counter()
            if messages:
                silent = exchange(grid, messages, timeout=timeout, poll_interval=self.poll_interval,
                                  on_reply=lambda node, reply, phase=phase: rnd.receive(phase, node, reply))
                for node in sorted(silent):
                    log.warning("round %d, phase %s: node %d sent nothing within %.0f s",
                                round_index, phase, node, timeout)
            rnd.phase_seconds[phase] = time.perf_counter() - t0
            rnd.finish_phase(phase)
        return rnd.outcome()
