"""The securefed record inside a Flower message: protocol payload bytes plus the round they belong to.

Layout (``protocols/flower.md``, "Envelope"): one ``ConfigRecord`` under the key
``"securefed"``. A request carries ``v, protocol, params, phase, round, n, dim,
session, nonce, nodes, client, party, max_examples, payload, beacon, attest`` (``nodes``: the
round's node ids, ascending, 8 bytes each, client i being the i-th; ``session`` =
SHA-256(label, nonce, nodes), so the session names its participants, or, in a round
with the graph beacon (``_beacon``), the session the beacon derives from that one,
whose hashes ``beacon`` carries; ``party``: "" for
client ``client``, else an auxiliary party's name with ``client`` 0; ``max_examples`` >
0: weight the update by examples, capped there; 0: uniform); a reply carries ``v, phase,
round, session, client, party, payload, attest``. The input phase's request to a client also
carries the global model (``ArrayRecord`` ``"arrays"``) and the training configuration
(``ConfigRecord`` ``"config"``).

A message may also carry, under ``"securefed.next"`` (:data:`NEXT_KEY`), a request of the next
round's setup (a phase before its input phase) with the same layout: one Flower message then
serves two rounds, each with its own session, and the reply answers the next round's request under
the same key (``protocols/flower.md``, section 3, "Setup ahead").

Parsing is strict (exact keys and types); anything else is MessageRejected. The
protocol's own header, inside ``payload``, binds round, session, phase and sender
again, so a forged envelope around a replayed payload is still refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from securefed.errors import MessageRejected
from securefed.flower import _beacon
from securefed.protocols.base import AggregationProtocol

__all__ = ["KEY", "MAX_BOUND", "MAX_METRICS", "NEXT_KEY", "RESERVED_METRICS", "VERSION", "Reply", "Request", "binding",
           "describe", "evaluation", "evaluation_dim", "pack_nodes", "parse_reply", "parse_request", "pre_session",
           "session_id"]

#: The record key of securefed's envelope in a Flower ``RecordDict``.
KEY = "securefed"
#: The record key of the next round's setup request (and its reply) riding on a message of this round.
NEXT_KEY = "securefed.next"
#: Envelope layout version (4: the session id binds the round's per-request choices, :func:`binding`;
#: 5: ``attest``, the model attestations of the active variants, ``_attest``).
VERSION = 5

_REQUEST_FIELDS = {
    "v": int, "protocol": str, "params": str, "phase": str, "round": int, "n": int, "dim": int,
    "session": bytes, "nonce": bytes, "nodes": bytes, "client": int, "party": str, "max_examples": int,
    "payload": bytes, "beacon": bytes, "attest": bytes,
}
_REPLY_FIELDS = {"v": int, "phase": str, "round": int, "session": bytes, "client": int, "party": str,
                 "payload": bytes, "attest": bytes}
_NODE = struct.Struct(">Q")
_ATTESTATION = 96  # R || signature (_attest.REPLY)
_SESSION_LABEL = b"securefed/flower/session\x00"
#: An evaluation round's session label: every session names its kind, so a node asked to evaluate and a node
#: asked to train are never in one session (their messages and signatures do not verify across).
_EVALUATE_LABEL = b"securefed/flower/evaluate\x00"


def describe(protocol: AggregationProtocol, n: int, privacy: Mapping[str, Any] | None = None,
             evaluate: Sequence[tuple[str, float]] | None = None) -> str:
    """``protocol.describe(n)`` (plus the round's `privacy` settings, and for an evaluation round its
    metrics and their bounds, `evaluate`) as canonical JSON: what server and client must agree on."""
    desc = protocol.describe(n) if privacy is None else {**protocol.describe(n), "privacy": dict(privacy)}
    if evaluate is not None:
        desc["evaluate"] = [[name, float(bound)] for name, bound in evaluate]
    return json.dumps(desc, sort_keys=True, separators=(",", ":"), default=str)


#: Names an evaluation round cannot ask for: the weight and the strategy's own entries.
RESERVED_METRICS = frozenset({"num-examples", "included", "aborted", "excluded"})
#: The most metrics an evaluation round asks for.
MAX_METRICS = 256
#: The largest bound on a metric (a mean is bound times a sum: larger ones overflow float64 over many nodes).
MAX_BOUND = 1e100


def _parsed(params: str) -> dict[str, Any]:
    """`params` as a JSON object; MessageRejected for anything else (a node must never fail on them)."""
    try:
        out = json.loads(params)
    except (ValueError, TypeError, OverflowError, RecursionError):
        out = None
    if not isinstance(out, dict):
        raise MessageRejected("invalid request: params are not a JSON object")
    return out


def evaluation(params: str) -> tuple[tuple[str, float], ...] | None:
    """The metrics and bounds of an evaluation round's `params` (:func:`describe`); None for a training round.
    MessageRejected for params that are not such JSON, or that ask for a reserved name or a duplicate."""
    return _metrics(_parsed(params))


def _metrics(desc: Mapping[str, Any]) -> tuple[tuple[str, float], ...] | None:
    """:func:`evaluation` of params already parsed."""
    spec = desc.get("evaluate")
    if spec is None:
        return None
    try:
        out = tuple((name, float(bound)) for name, bound in spec if isinstance(name, str))
        ok = isinstance(spec, list) and 0 < len(out) == len(spec) <= MAX_METRICS
    except (ValueError, TypeError, OverflowError, RecursionError):
        ok = False
    if not ok or any(not 0 < b <= MAX_BOUND for _, b in out) or len({k for k, _ in out}) != len(out) or (
            RESERVED_METRICS & {k for k, _ in out}) or any(":" in k for k, _ in out):
        raise MessageRejected("invalid request: malformed evaluation metrics in params")
    return out


def evaluation_dim(k: int) -> int:
    """An evaluation round's input length for `k` metrics: ``[w m~_1 / b_1, ..., w m~_k / b_k, w, c_1, ..., c_k, e]``
    (``m~_i`` the metric clamped to its bound, ``c_i`` 1 when it was, ``e`` 1 for a node whose metrics were not
    finite, whose other coordinates are then 0): ``2 k + 2``."""
    return 2 * k + 2


def binding(round_index: int, dim: int, max_examples: int, privacy: Mapping[str, Any] | None,
            evaluate: Sequence[tuple[str, float]] | None) -> bytes:
    """The SHA-256 of what the server chooses per request beyond the node list, and the session binds: the
    round index, ``dim``, ``max_examples``, the round's privacy description (with a moving clip, the clip and
    count std the nodes build from) and an evaluation round's metrics and bounds. Nodes shown different values
    are in different sessions, whose masks, shares and signatures do not combine (``protocols/flower.md``,
    section 1)."""
    canonical = json.loads(json.dumps(privacy, sort_keys=True, default=str))  # as a request's params carry it
    doc = {"round": round_index, "dim": dim, "max_examples": max_examples, "privacy": canonical,
           "evaluate": None if evaluate is None else [[k, float(b)] for k, b in evaluate]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).digest()


def pack_nodes(nodes: Sequence[int]) -> bytes:
    """The round's node ids (ascending) as 8-byte big-endian words."""
    return b"".join(_NODE.pack(v) for v in nodes)


def session_id(nonce: bytes, nodes: bytes, *, evaluate: bool = False, bound: bytes = b"") -> bytes:
    """The round's session id: SHA-256 of a label (a training or an evaluation round's), the server's
    32-byte `nonce`, the packed node ids and the round's :func:`binding` (`bound`).

    Every protocol message and signature binds the session, so a session has exactly one list
    of participants, one kind and one set of per-request choices: a server cannot show nodes
    different lists in one session, ask some of its nodes to train and others to evaluate, or give
    them different weights, bounds, clips or dimensions."""
    return hashlib.sha256((_EVALUATE_LABEL if evaluate else _SESSION_LABEL) + nonce + nodes + bound).digest()


def pre_session(req: Request) -> bytes:
    """The session id `req`'s fields give (:func:`session_id` of its nonce, nodes, kind and :func:`binding`):
    the request's own, or in a round with the graph beacon the one the beacon derives from."""
    desc = _parsed(req.params)
    metrics = _metrics(desc)
    bound = binding(req.round, req.dim, req.max_examples, desc.get("privacy"), metrics)
    return session_id(req.nonce, req.nodes, evaluate=metrics is not None, bound=bound)


@dataclasses.dataclass(frozen=True)
class Request:
    """One protocol request to one client (what the server sends in one phase)."""

    protocol: str
    params: str
    phase: str
    round: int
    n: int
    dim: int
    session: bytes
    nonce: bytes
    nodes: bytes
    client: int
    party: str
    max_examples: int
    payload: bytes
    #: Empty without the graph beacon; else SHA-256(L) || SHA-256(R), plus every signed reveal in the
    #: protocol's first phase (``_beacon``). The beacon's own requests carry none.
    beacon: bytes = b""
    #: Empty but in an active round's consistency_check: every listed client's model attestation (``_attest``).
    attest: bytes = b""

    def record(self) -> ConfigRecord:
        return ConfigRecord({"v": VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}})

    def node_ids(self) -> tuple[int, ...]:
        """The round's node ids, client i being the i-th."""
        return tuple(v for (v,) in _NODE.iter_unpack(self.nodes))


@dataclasses.dataclass(frozen=True)
class Reply:
    """One client's answer to a request."""

    phase: str
    round: int
    session: bytes
    client: int
    party: str
    payload: bytes
    #: Empty but in an active round's input phase: the client's model attestation, ``R || signature`` (``_attest``).
    attest: bytes = b""

    def record(self) -> ConfigRecord:
        return ConfigRecord({"v": VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}})


def _fields(record: Any, spec: Mapping[str, type], what: str) -> dict[str, Any]:
    if not isinstance(record, ConfigRecord) or set(record.keys()) != set(spec):
        raise MessageRejected(f"invalid {what}: not a securefed {what} record")
    out = {}
    for key, kind in spec.items():
        value = record[key]
        # bool is an int subclass; a bool where an int belongs is malformed.
        if type(value) is not kind:
            raise MessageRejected(f"invalid {what}: field {key!r} has the wrong type")
        out[key] = value
    if out.pop("v") != VERSION:
        raise MessageRejected(f"invalid {what}: unsupported envelope version")
    return out


def _request(record: Any) -> Request:
    req = Request(**_fields(record, _REQUEST_FIELDS, "request"))
    if len(req.session) != 32 or len(req.nonce) != 32 or req.n < 1 or req.dim < 1 or not 0 <= req.client < req.n \
            or not 0 <= req.round < 2**32 or req.max_examples < 0 or (req.party and req.client) \
            or len(req.nodes) != _NODE.size * req.n or (req.attest and req.phase != "consistency_check"):
        raise MessageRejected("invalid request: field out of range")
    ids = req.node_ids()
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise MessageRejected("invalid request: node ids not ascending")
    pre = pre_session(req)
    if req.beacon:
        list_hash, reveals_hash, _ = _beacon.split_field(req.beacon, req.n)
        pre = _beacon.session(pre, req.round, list_hash, reveals_hash)
    if pre != req.session:
        raise MessageRejected("invalid request: the session does not bind the round's nodes")
    return req


def parse_request(content: RecordDict, *, input_phase: bool) -> tuple[Request, ArrayRecord | None, ConfigRecord | None]:
    """The envelope of a request and, for the input phase, the model and training config.

    Raises MessageRejected for anything but exactly that layout (plus, optionally, a next round's
    request under :data:`NEXT_KEY`: :func:`parse_next`).
    """
    expected = {KEY, "arrays", "config"} if input_phase else {KEY}
    if set(content.keys()) - {NEXT_KEY} != expected:
        raise MessageRejected("invalid request: unexpected records")
    req = _request(content[KEY])
    if not input_phase:
        return req, None, None
    arrays, config = content["arrays"], content["config"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
        raise MessageRejected("invalid request: wrong record types")
    return req, arrays, config


def parse_next(content: RecordDict, current: Request) -> Request | None:
    """The next round's setup request riding on this message (None when there is none).

    It must be of a later round index than `current` and without the graph beacon, auxiliary
    parties or the input phase (those never ride ahead); MessageRejected otherwise."""
    if NEXT_KEY not in content:
        return None
    req = _request(content[NEXT_KEY])
    if req.round <= current.round or req.beacon or req.party or evaluation(req.params) is not None:
        raise MessageRejected("invalid request: the next round's request must be a later round's client setup")
    return req


def parse_reply(content: RecordDict, *, max_payload: int, key: str = KEY) -> Reply:
    """The envelope under `key` (:data:`KEY`, or :data:`NEXT_KEY` for the next round's part) of a reply;
    MessageRejected for any other layout or a payload over `max_payload` bytes. A reply holds :data:`KEY`
    and, when its request carried the next round's setup, :data:`NEXT_KEY`."""
    if not {KEY} <= set(content.keys()) <= {KEY, NEXT_KEY} or key not in content:
        raise MessageRejected("invalid reply: unexpected records" if key == KEY else
                              "invalid reply: no answer to the next round's request")
    record = content[key]
    payload = record.get("payload") if isinstance(record, ConfigRecord) else None
    if isinstance(payload, bytes) and len(payload) > max_payload:
        raise MessageRejected(f"invalid reply: payload of {len(payload)} bytes exceeds the limit of {max_payload}")
    reply = Reply(**_fields(record, _REPLY_FIELDS, "reply"))
    if len(reply.attest) not in (0, _ATTESTATION):
        raise MessageRejected("invalid reply: a model attestation of the wrong length")
    return reply
