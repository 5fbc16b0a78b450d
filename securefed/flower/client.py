"""The client side on Flower: handlers for a ``ClientApp`` that run securefed's client state machine.

The node's protocol state lives in ``context.state`` between phases (as bytes from
``ClientProtocol.dump()``, never pickle). In the input phase the handler runs the
user's ordinary Flower training function, turns the trained model into an update
vector (weighted as the server asked), and hands it to the protocol, which encodes
and masks or encrypts it: the trained model itself never leaves the node. See
``protocols/flower.md``, "Client".

A node gives at most one input per round index as a client, and releases at most one
decryption (or other auxiliary output) per round index as an auxiliary party, whatever the
session: ``context.state[GIVEN_KEY]`` records, per role, the last round index in which it
did and the session it did it in; it refuses to start a round again in which it already
gave (a server rerunning one round over different subsets of nodes would otherwise get
each input by differencing sums) and any round index below one in which it gave
(``protocols/flower.md``, section 5, "One input per round index").

The node's security settings (protocol and threat model, DP, seeding, expected federation
size, roles, keys) are the node's: its setting factories see a :class:`NodeContext`, whose
``run_config`` (chosen by whoever submits ``flwr run``, the server side) cannot be read
(``protocols/flower.md``, section 5, "Trust boundaries").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict, UserConfig
from flwr.clientapp import ClientApp

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
    SecureFedError,
    SeededSecretsWarning,
)
from securefed.flower import _attest, _beacon, _envelope, _identities, _model, _privacy
from securefed.flower.aggregation import evaluation_protocol, message_type
from securefed.protocols.base import AggregationProtocol, ClientProtocol, RoundSpec

if TYPE_CHECKING:
    from securefed.privacy.mechanisms import Privacy

__all__ = ["GIVEN_KEY", "NodeContext", "SecureClient", "client_rng"]

log = logging.getLogger("securefed.flower.client")

#: ``context.state`` key of the node's record of what it gave: a ``ConfigRecord`` holding, per role
#: (``"client"`` or the auxiliary party's name), ``"<role>/round"`` (the last round index in which
#: it gave its input, or released its output) and ``"<role>/session"`` (the session it did it in).
GIVEN_KEY = "securefed.given"

# Flower's error code for an app that raised (flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION):
# the server records the node as having refused.
_REFUSED = 2
# Flower's code for "no reply message": the protocol chose to send nothing (the server records no reply).
_NOTHING = 4

#: ``Message -> Message``: a Flower training function (``@app.train()`` style).
TrainFn = Callable[[Message, Context], Message]
#: ``Message -> Message``: a Flower evaluation function (``@app.evaluate()`` style).
EvaluateFn = Callable[[Message, Context], Message]


def client_rng(seed: int | None, session: bytes, client: int | str, phase: str, round_index: int,
               run_id: int = 0) -> RandomSource:
    """A node's randomness for one phase: from ``os.urandom``, or, seeded (tests and simulation only),
    derived from the seed, the Flower run, the round's number and session id, the client index (or
    auxiliary party) and the phase. Run and round are bound in: a server that sent one session id for two
    rounds, or again in a new run, would otherwise get the same keys twice (and with them one round's
    self-mask and the other's mask key)."""
    if seed is None:
        return RandomSource()
    who = f"client/{client}" if isinstance(client, int) else f"party/{client}"
    return RandomSource(seed).child(f"flower/run/{run_id}/round/{round_index}/{session.hex()}/{who}/{phase}")


def _value(x: Any, context: Context) -> Any:
    return x(context) if callable(x) and not isinstance(x, AggregationProtocol) else x


class NodeContext(Context):
    """What :class:`SecureClient`'s setting factories see of a Flower ``Context``: all of it but ``run_config``.

    ``run_config`` is the run's configuration, chosen by whoever submits ``flwr run``: the server
    side. A node's security settings (protocol and threat model, DP on or off and its parameters,
    seeding, the expected federation size, its roles and keys) come from ``node_config`` (the
    SuperNode's ``--node-config``) or the node's own code, so reading ``run_config`` here raises
    ConfigurationError: a factory cannot take them from the server, even by mistake. ``state`` is
    the node's own (the same object). The training function gets the real ``Context``.
    """

    def __init__(self, context: Context) -> None:
        # Not Context.__init__: it assigns run_config, which this view refuses.
        self.run_id = context.run_id
        self.node_id = context.node_id
        self.node_config = context.node_config
        self.state = context.state
        self.series_id = context.series_id

    @property
    def run_config(self) -> UserConfig:
        raise ConfigurationError(
            "a node's security settings (protocol, privacy, seed, expected federation size, auxiliary roles, "
            "identities) must come from context.node_config (flower-supernode --node-config) or the node's "
            "own code, never from context.run_config, which the server side chooses")

    @run_config.setter
    def run_config(self, value: UserConfig) -> None:
        raise ConfigurationError("a node's security settings cannot be given a run_config")

    def __repr__(self) -> str:
        return f"NodeContext(run_id={self.run_id}, node_id={self.node_id}, node_config={self.node_config!r})"


def _seed(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigurationError(f"seed must be an int or None, got {value!r}")
    return value


def _num_nodes(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigurationError(f"num_nodes (the federation size this node expects) must be a positive int or "
                                 f"None, got {value!r}")
    return value


_LOGGED_SEEDS: set[int] = set()  # seeds this process has logged a warning for


def _warn_seeded(seed: int) -> None:
    """Warn on every seeded request (Python's default filter shows it once per process); log it once."""
    message = (
        f"SecureClient(seed={seed}): this node's keys, masks, DP noise shares and beacon randomness derive from "
        "the seed, so anyone who knows it can recompute them and unmask this node's update: secure aggregation "
        "and DP are void for this node (tests and simulation only; a deployment leaves the seed unset)"
    )
    warnings.warn(message, SeededSecretsWarning, stacklevel=4)
    if seed not in _LOGGED_SEEDS:
        _LOGGED_SEEDS.add(seed)
        log.warning("securefed: %s", message)


class SecureClient:
    """Runs `protocol`'s client side in a Flower ``ClientApp``.

    - ``protocol``: the node's protocol, or a function of the ``Context`` returning it. The
      node never takes the protocol from the server: it refuses a request whose protocol
      or parameters differ from its own;
    - ``phases``: the protocol's phases, needed only when `protocol` is a function;
    - ``privacy``: ``securefed.privacy.CentralDP`` or ``DistributedDP`` (or a function of
      the ``Context`` returning one), as on the server: the node clips its update and,
      with distributed DP, adds its noise share;
    - ``seed``: an int (or a function of the ``Context``) making the node's randomness
      reproducible, for tests and simulation only: a seeded node warns (``SeededSecretsWarning``,
      shown once per process by Python's default filter) and logs it; None (default) draws from the OS;
    - ``num_nodes``: the federation size this node expects (an int, or a function of the
      ``Context``): it refuses a round over more nodes (more than its threat model's corrupt
      fraction and its DP provisioning were made for); None (default): no bound;
    - ``auxiliary``: the auxiliary parties this node agrees to play when the server names it
      (``{"decryptor"}``: it holds an HE round's secret key in its context and decrypts only
      the aggregate), or a function of the ``Context`` returning them; default none;
    - ``identities``: this node's copy of the federation's identity keys by node id (every
      public key, its own signing key: ``KeyDirectory.restricted_to(node_id)``), or a function
      of the ``Context``; each round's directory (client i: the round's i-th node) is built
      from it, never from the server (active SecAgg with changing participants). Needed by active
      SecAgg+ on a Harary graph: the node then commits to and reveals, signed, the randomness
      the round's session id and masking graph derive from (the graph beacon, spec section 12),
      and refuses a round whose beacon is missing or does not check out.

    Every function above is called with a :class:`NodeContext`, whose ``run_config`` (the server's)
    cannot be read: a node's security settings are its own (``node_config`` or its code).

    :meth:`register` installs the handlers on a ``ClientApp``. Raises ConfigurationError
    for missing phases.
    """

    def __init__(
        self,
        protocol: AggregationProtocol | Callable[[Context], AggregationProtocol],
        *,
        phases: Sequence[str] | None = None,
        privacy: Privacy | Callable[[Context], Privacy | None] | None = None,
        seed: int | Callable[[Context], int | None] | None = None,
        auxiliary: Collection[str] | Callable[[Context], Collection[str]] = (),
        identities: KeyDirectory | Callable[[Context], KeyDirectory] | None = None,
        num_nodes: int | Callable[[Context], int | None] | None = None,
    ) -> None:
        if not callable(privacy):
            _privacy.check(privacy)
        if not callable(seed):
            _seed(seed)
        if not callable(num_nodes):
            _num_nodes(num_nodes)
        if isinstance(protocol, AggregationProtocol):
            phases = protocol.phases
        elif phases is None:
            raise ConfigurationError("pass phases= with a protocol factory (the handlers are registered by phase)")
        if not phases:
            raise ConfigurationError("the protocol has no phases")
        if identities is not None and not (isinstance(identities, KeyDirectory) or callable(identities)):
            raise ConfigurationError("identities must be a securefed.crypto.signing.KeyDirectory keyed by node id")
        self.protocol = protocol
        self.phases = tuple(phases)
        self.privacy = privacy
        self.seed = seed
        self.auxiliary = auxiliary
        self.identities = identities
        self.num_nodes = num_nodes

    def register(self, app: ClientApp, train: TrainFn, evaluate: EvaluateFn | None = None) -> None:
        """Handle ``train`` (a client's input phase, where `train` runs), with `evaluate` ``evaluate`` (the input
        phase of a federated evaluation round, where `evaluate` runs), and ``query.<phase>`` for every phase
        (the other phases, and every phase of an auxiliary party).

        `train` is an ordinary Flower training function: it receives the message with
        the global model (``content["arrays"]``) and config (``content["config"]``) and
        returns a reply holding the trained model in ``"arrays"`` and, for weighting by
        examples, ``MetricRecord`` ``"metrics"`` with ``"num-examples"``. `evaluate` is an
        ordinary Flower evaluation function: same message, and a reply holding ``MetricRecord``
        ``"metrics"`` with ``"num-examples"`` and the metrics the server asks for (each within the
        bound it declares). Those replies stay on the node; only the protocol's payload is sent.
        Without `evaluate` the node has no ``evaluate`` handler (Flower refuses such rounds).
        """

        def on_train(msg: Message, context: Context) -> Message:
            return self.handle(msg, context, train)

        app.train()(on_train)
        if evaluate is not None:

            def on_evaluate(msg: Message, context: Context) -> Message:
                return self.handle(msg, context, None, evaluate=evaluate)

            app.evaluate()(on_evaluate)
        for phase in (*self.phases, *_beacon.PHASES):  # the graph beacon's exchanges come as queries too
            app.query(phase)(self._query_handler())

    def _query_handler(self) -> Callable[[Message, Context], Message]:
        def on_query(msg: Message, context: Context) -> Message:
            return self.handle(msg, context, None)

        return on_query

    # -- one message -------------------------------------------------------------------

    def handle(self, msg: Message, context: Context, train: TrainFn | None, *,
               evaluate: EvaluateFn | None = None) -> Message:
        """Answer one request: the protocol's reply, or an error reply when the node refuses.

        `train` runs in the input phase (``train`` messages), `evaluate` in an evaluation round's
        (``evaluate`` messages). :meth:`register` wires this up;
        call it directly only from handlers of your own (for example behind your mods).

        A message may also carry a later round's setup request (``_envelope.NEXT_KEY``): the node
        answers it in the same reply, under the same key, from that round's own state (its own
        state machine, keys and session, kept apart: :func:`_slot`). When it refuses that part it
        still answers this round's; when it refuses this round's, it answers neither.
        """
        kind = msg.metadata.message_type
        try:
            req, arrays, config = _envelope.parse_request(msg.content, input_phase=kind in ("train", "evaluate"))
            answer = self._answer(msg, context, req, arrays, config, evaluate if kind == "evaluate" else train,
                                  kind, None)
        except (MessageRejected, ProtocolAborted, InvalidInput) as e:
            return Message(Error(code=_REFUSED, reason=f"securefed: {type(e).__name__}: {e}"), reply_to=msg)
        if answer is None:
            return Message(Error(code=_NOTHING, reason="securefed: nothing to send in this phase"), reply_to=msg)
        content = RecordDict({_envelope.KEY: _reply(req, *answer)})
        try:
            if (ahead := _envelope.parse_next(msg.content, req)) is not None and (
                    extra := self._answer(msg, context, ahead, None, None, None, f"query.{ahead.phase}", req.round)):
                content[_envelope.NEXT_KEY] = _reply(ahead, *extra)
        except (MessageRejected, ProtocolAborted, InvalidInput) as e:
            log.info("securefed: refused the next round's request riding on round %d's: %s", req.round, e)
        return Message(content, reply_to=msg)

    def _answer(self, msg: Message, context: Context, req: _envelope.Request, arrays: ArrayRecord | None,
                config: ConfigRecord | None, fn: TrainFn | None, kind: str, carrier: int | None
                ) -> tuple[bytes, bytes] | None:
        """The payload answering `req` and its model attestation (of message type `kind`; `fn`: the function of
        its input phase, training or evaluation; `carrier`: the round of the request it rides on, None for a
        message's own); raises MessageRejected, ProtocolAborted or InvalidInput to refuse."""
        is_train = kind in ("train", "evaluate")
        evaluate = _envelope.evaluation(req.params)
        nodes = req.node_ids()
        node = NodeContext(context)  # what the setting factories see: no run_config
        protocol, privacy, identities = self._configure(node, req, nodes, evaluate)
        beacon = not req.party and _beacon.required(protocol, req.n)
        if (req.phase not in protocol.phases and req.phase not in _beacon.PHASES) or (
                message_type(protocol, req.phase, req.party or req.client, evaluate=evaluate is not None) != kind):
            raise MessageRejected("invalid request: unknown phase or wrong message type for it")
        seed = self._node_seed(node)
        # An evaluation round's input (metrics) is recorded apart from the training input: one of each per round.
        role = (req.party or "client") + ("@evaluate" if evaluate is not None else "")
        # An auxiliary party gives in every phase after its first (the decryptor: its one decryption),
        # a client when its input phase's handle returns: recorded per role (GIVEN_KEY).
        aux_gives = bool(req.party) and req.phase != protocol.phases[0]
        self._once(context, req, role, start=req.phase == protocol.phases[0] or req.phase in _beacon.PHASES,
                   is_input=is_train)
        if req.phase in _beacon.PHASES:
            return _beacon_payload(context, req, beacon, identities, seed), b""
        if req.beacon and not beacon:
            raise MessageRejected("invalid request: a graph beacon in a round whose protocol needs none")
        slot = EVALUATION_SLOT if evaluate is not None else _slot(context, req, carrier)
        party: int | str = req.party or req.client
        state = _restore(context, protocol, req, party, seed, slot)
        attesting = None if req.party else _attest.directory(protocol, req.n)
        model = _saved_model(context, req, slot)
        try:
            if beacon:
                _check_beacon(context, req, nodes, identities, slot, first=req.phase == protocol.phases[0])
            if attesting is not None and req.phase == "consistency_check":
                survivors = protocol.survivor_list(_spec(req), req.payload)  # type: ignore[attr-defined]
                _attest.check_survivors(attesting, req.session, model, survivors, req.attest)
            if is_train:
                assert arrays is not None and config is not None
                if fn is None:
                    raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "this node has no evaluation function")
                if attesting is not None:  # before the user's function sees (and may change) them; R: the run config
                    model = _attest.digest(arrays, config) + _attest.run_digest(context.run_config)
                _give(state, req, lambda: _input(msg, context, fn, arrays, req, privacy) if evaluate is None
                      else _metrics_input(msg, context, fn, req, evaluate))
            elif aux_gives:  # counted before its state machine checks anything (a refused decryption too)
                _record(context, req, role)
            payload = state.handle(req.phase, req.payload)
            if is_train:  # the input is the state machine's now: given in this round
                _record(context, req, role)
        except (MessageRejected, ProtocolAborted, InvalidInput):
            _save(context, req, b"", slot)  # refused: this node answers nothing more in this round
            raise
        if req.phase == protocol.phases[-1]:
            context.state.pop(slot, None)
            context.state.pop(_beacon.STATE_KEY, None)
        else:
            _save(context, req, state.dump(), slot, model)
        if payload is None:
            return None
        if is_train and attesting is not None:
            return bytes(payload), model[32:] + _attest.sign(attesting, req.client, req.session, model)
        return bytes(payload), b""

    @staticmethod
    def _once(context: Context, req: _envelope.Request, role: str, *, start: bool, is_input: bool) -> None:
        """Refuse what could make this node give a second input (or output) for one round index.

        Refused, changing nothing: any request of a round index below the largest one in which this node
        gave anything, in any role (a rollback); in a round index in which it already gave in this `role`:
        a `start` of the round (the protocol's first phase or a graph beacon exchange) and a client's
        input phase (`is_input`), whatever the session, and every request of another session. What is
        left are the later phases of the session it gave in, which its state machine answers once each
        (``protocols/flower.md``, section 5, "One input per round index")."""
        given = context.state.get(GIVEN_KEY)
        if not isinstance(given, ConfigRecord):
            return
        last = max((v for k, v in given.items() if k.endswith("/round") and isinstance(v, int)), default=None)
        if last is not None and req.round < last:
            raise MessageRejected(f"invalid request: stale round {req.round} (this node already gave its input "
                                  f"or output in round {last}; round indices only go forward)")
        if given.get(f"{role}/round") != req.round:
            return
        session = given.get(f"{role}/session")
        if start or is_input or session != req.session:
            shown = session.hex()[:16] if isinstance(session, bytes) else "?"
            what = {"client": "input", "client@evaluate": "evaluation input"}.get(role, f"{role} output")
            raise ProtocolAborted(
                AbortReason.REQUEST_REFUSED,
                f"this node already gave its {what} in round {req.round} (session "
                f"{shown}): it gives at most one per round index, so it refuses "
                "to run that round again (a second one would let the server difference two sums)")

    def _node_seed(self, node: NodeContext) -> int | None:
        seed = _seed(_value(self.seed, node))
        if seed is not None:
            _warn_seeded(seed)
        return seed

    def _configure(self, context: NodeContext, req: _envelope.Request, nodes: Sequence[int],
                   evaluate: Sequence[tuple[str, float]] | None
                   ) -> tuple[AggregationProtocol, Any, KeyDirectory | None]:
        """The node's own round protocol, privacy and identities (of an evaluation round of the metrics `evaluate`:
        :func:`~securefed.flower.aggregation.evaluation_protocol`); refuses a request whose size, party, protocol
        or parameters this node is not configured for, and an evaluation round when this node runs with DP."""
        limit = _num_nodes(_value(self.num_nodes, context))
        if limit is not None and req.n > limit:
            raise ProtocolAborted(
                AbortReason.REQUEST_REFUSED,
                f"the server asks for a round of {req.n} nodes; this node expects a federation of at most {limit} "
                "(num_nodes): its threat model and DP provisioning were not made for more")
        if req.party:
            if req.party not in _value(self.auxiliary, context):
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"this node is not configured to play {req.party!r}")
        elif nodes[req.client] != context.node_id:
            raise MessageRejected("invalid request: the round's node list puts another node at this client index")
        privacy = _value(self.privacy, context)
        _privacy.check(privacy)
        if evaluate is not None and privacy is not None:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  "this node runs with differential privacy: federated evaluation would release exact "
                                  "sums of its metrics outside its privacy budget (evaluate centrally instead)")
        privacy = _privacy.for_request(privacy, req.params)  # adaptive + DistributedDP: at the round's clip
        base = _value(self.protocol, context)
        if evaluate is not None:
            base = evaluation_protocol(base)
        if (identities := _value(self.identities, context)) is not None:
            try:
                base = _identities.bind(base, identities, nodes, None if req.party else context.node_id)
            except ConfigurationError as e:
                raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"identity keys: {e}") from None
        protocol = _privacy.round_protocol(base, privacy, session=req.session, dim=req.dim)
        params = _envelope.describe(protocol, req.n, _privacy.describe(privacy, base, req.n, req.dim), evaluate)
        if req.protocol != protocol.name or req.params != params:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  "the server asks for a protocol or parameters this node is not configured for")
        return protocol, privacy, identities



def _beacon_identities(identities: KeyDirectory | None) -> KeyDirectory:
    if identities is None:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                              "active SecAgg+ on a Harary graph runs the graph beacon on Flower, whose reveals "
                              "are signed: give this node the federation's identity keys (identities=)")
    return identities


def _beacon_payload(context: Context, req: _envelope.Request, required: bool, identities: KeyDirectory | None,
                    seed: int | None) -> bytes:
    """Answer ``graph_commit`` (the commitment) or ``graph_reveal`` (rho and its signature): ``_beacon``."""
    if not required:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                              "this round's protocol needs no graph beacon (it is not active SecAgg+ on a "
                              "Harary graph): the server asks for a beacon this node does not run")
    keys = _beacon_identities(identities)
    if req.phase == _beacon.COMMIT:
        rng = client_rng(seed, req.session, req.client, req.phase, req.round, context.run_id)
        payload = _beacon.node_commit(context.state, req, context.node_id, rng)
    else:
        payload = _beacon.node_reveal(context.state, req, context.node_id, keys.signing_key(context.node_id))
    return payload


def _check_beacon(context: Context, req: _envelope.Request, nodes: Sequence[int], identities: KeyDirectory | None,
                  slot: str, *, first: bool) -> None:
    """A protocol request of a beacon round: in the first phase, the beacon's reveals and derived session
    (``_beacon.node_check``); later, the session of this node's saved state of the round."""
    keys = _identities.directory(_beacon_identities(identities), nodes)
    if first:
        _beacon.node_check(context.state, req, _envelope.pre_session(req), nodes, keys)
        return
    saved = context.state.get(slot)
    if not req.beacon or not isinstance(saved, ConfigRecord) or (saved["round"], saved["session"]) != (
            req.round, req.session):
        raise MessageRejected("invalid request: no state of this beacon round and session (out of phase)")


def _restore(context: Context, protocol: AggregationProtocol, req: _envelope.Request, party: int | str,
             seed: int | None, slot: str) -> ClientProtocol:
    """The state machine of `party` for this request's round: the saved one, or a new one.

    New for the protocol's first phase (a new round, or the same one started again before
    this party gave anything in it: :meth:`SecureClient._once` has refused the rest), or
    when the node holds no state of this round (the first phase this party is addressed
    in; its state machine refuses any phase it cannot start with). Refused: a request of
    an older round than the saved state (stale), or one of a round whose saved state
    belongs to another session or party (out of phase).
    """
    rng = client_rng(seed, req.session, party, req.phase, req.round, context.run_id)
    saved = context.state.get(slot)
    saved = saved if isinstance(saved, ConfigRecord) else None
    if saved is not None and req.round < cast(int, saved["round"]):  # the fields are _save's
        raise MessageRejected("invalid request: stale round")
    if req.phase != protocol.phases[0] and saved is not None and saved["round"] == req.round:
        if (saved["session"], saved["client"], saved["party"]) != (req.session, req.client, req.party):
            raise MessageRejected("invalid request: no state for this round and session (out of phase)")
        if not saved["state"]:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "this node left the round earlier")
        return protocol.load_client(cast(bytes, saved["state"]), rng=rng)
    spec = _spec(req)
    if isinstance(party, int):
        return protocol.client(spec, party, rng=rng)
    aux = protocol.auxiliary(spec, rng=rng)
    if party not in aux:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, f"protocol {protocol.name!r} has no party {party!r}")
    return aux[party]


def _spec(req: _envelope.Request) -> RoundSpec:
    return RoundSpec(n=req.n, dim=req.dim, session_id=req.session, round_index=req.round)


def _save(context: Context, req: _envelope.Request, state: bytes, slot: str, model: bytes = b"") -> None:
    """Keep `req`'s round state in `slot`, with the digest of the model and config of its input (``_attest``)."""
    context.state[slot] = ConfigRecord(
        {"round": req.round, "session": req.session, "client": req.client, "party": req.party, "state": state,
         "model": model}
    )


def _saved_model(context: Context, req: _envelope.Request, slot: str) -> bytes:
    """The model digest saved with `req`'s round and session in `slot` (empty before its input phase)."""
    saved = context.state.get(slot)
    if not isinstance(saved, ConfigRecord) or (saved.get("round"), saved.get("session")) != (req.round, req.session):
        return b""
    model = saved.get("model", b"")
    return model if isinstance(model, bytes) else b""


def _reply(req: _envelope.Request, payload: bytes, attest: bytes = b"") -> ConfigRecord:
    return _envelope.Reply(req.phase, req.round, req.session, req.client, req.party, payload, attest).record()


#: ``context.state`` keys of the node's protocol state: one round's each, so that a later round's setup
#: can run (riding on this round's messages) while this round is still open.
_SLOTS = (_envelope.KEY, _envelope.NEXT_KEY)
#: ``context.state`` key of the node's state of an evaluation round: its own, so that an evaluation round of
#: round r runs while round r + 1's setup, run ahead, waits in its slot.
EVALUATION_SLOT = "securefed.evaluate"


def _slot(context: Context, req: _envelope.Request, carrier: int | None) -> str:
    """Where the node keeps its state of `req`'s round: the slot holding that round index; else, for a
    request riding on round `carrier`'s, the slot not holding round `carrier` (which is still open);
    else the first (a new round started by its own message takes it over, as without riding)."""
    held = {k: s["round"] for k in _SLOTS if isinstance(s := context.state.get(k), ConfigRecord)}
    for key, index in held.items():
        if index == req.round:
            return key
    if carrier is None:
        return _envelope.KEY
    return next(k for k in _SLOTS if held.get(k) != carrier)


def _record(context: Context, req: _envelope.Request, role: str) -> None:
    given = context.state.get(GIVEN_KEY)
    given = ConfigRecord(dict(given)) if isinstance(given, ConfigRecord) else ConfigRecord()
    given[f"{role}/round"] = req.round
    given[f"{role}/session"] = req.session
    context.state[GIVEN_KEY] = given


def _input(msg: Message, context: Context, train: TrainFn, arrays: ArrayRecord, req: _envelope.Request,
           privacy: Any) -> np.ndarray:
    """Train, then the update vector: (trained - global), weighted as the request says."""
    reply = train(msg, context)
    if not isinstance(reply, Message) or not reply.has_content() or "arrays" not in reply.content:
        raise InvalidInput("the training function must return a Message with the trained model in 'arrays'")
    trained = reply.content["arrays"]
    if not isinstance(trained, ArrayRecord):
        raise InvalidInput("'arrays' in the training reply must be an ArrayRecord")
    _model.same_layout(arrays, trained)
    start, spec = _model.flatten_record(arrays)
    new, _ = _model.flatten_record(trained)
    update = new.astype(np.float64) - start.astype(np.float64)
    if privacy is not None:
        if req.max_examples:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  "with differential privacy every node weighs the same; the server asks otherwise")
        round_config = msg.content.get("config")  # carries the round's adaptive clip, if any
        update = _privacy.client_input(privacy, update, [p.size for p in spec.params], round_config)
    elif req.max_examples:
        metrics = reply.content.get("metrics")
        examples = metrics.get("num-examples") if isinstance(metrics, MetricRecord) else None
        if not isinstance(examples, int) or examples < 1:
            raise InvalidInput("weighting by examples: the training reply needs MetricRecord 'metrics' "
                               "with a positive int 'num-examples'")
        w = min(examples, req.max_examples) / req.max_examples
        update = np.append(update * w, w)
    if update.size != req.dim:
        raise InvalidInput(f"the update has {update.size} values, the round expects {req.dim}")
    return update


def _give(state: ClientProtocol, req: _envelope.Request, make: Callable[[], np.ndarray]) -> None:
    """Make this node's input (running the user's training or evaluation function) and hand it to its state
    machine. An InvalidInput raised there, or any exception of the user's function, is logged here in full and
    refused with a fixed reason: its text may show a private value (a metric, an update coordinate out of
    range, a user's error message), and the error reply goes to the server. securefed's other refusals (the
    round's settings, not the node's data) pass as they are."""
    try:
        state.set_input(make())
    except SecureFedError as e:
        if not isinstance(e, InvalidInput):
            raise
        log.warning("securefed: round %d: this node's input failed a local check and was not sent: %s", req.round, e)
    except Exception:  # the user's function: Flower would send its text
        log.exception("securefed: round %d: this node's training or evaluation function raised", req.round)
    else:
        return
    raise InvalidInput("this node's input failed a local check and was not sent (the node's log says which; "
                       "the reason stays on the node, as it may show a private value)")


def _metrics_input(msg: Message, context: Context, evaluate: EvaluateFn, req: _envelope.Request,
                   metrics: Sequence[tuple[str, float]]) -> np.ndarray:
    """Evaluate, then the evaluation round's input (``_envelope.evaluation_dim``): ``w m~_i / b_i`` for the
    requested metrics ``(m_i, b_i)``, ``m~_i`` clamped to ``[-b_i, b_i]``, then ``w = min(examples, max_examples)
    / max_examples``, then ``c_i`` (1 where ``m_i`` was clamped) and ``e`` (1, everything else 0, when a metric
    is not finite). The node answers alike whatever its values, so its reply is no oracle on them (a refusal
    over a server-chosen bound was); the server learns how many nodes were clamped, never which. InvalidInput
    for a reply without the metrics or a valid ``num-examples``: the node's code, not its data."""
    k = len(metrics)
    if req.max_examples < 1 or req.dim != _envelope.evaluation_dim(k):
        raise MessageRejected("invalid request: an evaluation round weights by examples over 2 k + 2 values")
    reply = evaluate(msg, context)
    record = reply.content.get("metrics") if isinstance(reply, Message) and reply.has_content() else None
    if not isinstance(record, MetricRecord):
        raise InvalidInput("the evaluation function must return a Message with MetricRecord 'metrics'")
    examples = record.get("num-examples")
    if type(examples) is not int or examples < 0:
        raise InvalidInput("the evaluation reply's 'metrics' needs an int 'num-examples' >= 0")
    got = [record.get(name) for name, _ in metrics]
    if missing := [name for (name, _), v in zip(metrics, got) if not isinstance(v, (int, float)) or
                   isinstance(v, bool)]:
        raise InvalidInput(f"the evaluation reply's 'metrics' lacks the numbers {missing} the server asks for")
    values = [_as_float(v) for v in got]
    out = np.zeros(_envelope.evaluation_dim(k))
    if examples == 0 or not all(np.isfinite(v) for v in values):  # data, not code: answered like any other
        log.warning("securefed: round %d: no examples, or a metric that is not finite: this node's evaluation "
                    "counts as excluded", req.round)
        out[-1] = 1.0
        return out
    w = min(examples, req.max_examples) / req.max_examples
    for i, ((name, bound), value) in enumerate(zip(metrics, values)):
        if abs(value) > bound:
            log.warning("securefed: round %d: metric %r is outside [-%g, %g]: clamped (the server counts clamped "
                        "nodes, not which)", req.round, name, bound, bound)
            out[k + 1 + i] = 1.0
        out[i] = w * min(max(value, -bound), bound) / bound
    out[k] = w
    return out


def _as_float(value: Any) -> float:
    """A metric as a float; an int too large for one is infinite (never an error: the node's data)."""
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")
