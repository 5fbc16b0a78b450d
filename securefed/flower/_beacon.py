"""The graph beacon: commit-then-reveal randomness for the SecAgg+ masking graph (``protocols/flower.md``, section 12).

SecAgg+ masks along a random Harary graph drawn from the session id. On Flower the
server draws the nonce, so an active server could try nonces offline until a victim
sits among corrupt neighbours. For rounds that need it (:func:`required`: an active
adversary and a non-complete graph) the nodes of the round make the session id
themselves before the protocol's first phase:

1. ``graph_commit``: node i draws 32 bytes rho_i and answers the commitment
   ``h_i = SHA-256(label || pre || round || node_i || rho_i)`` (``pre``: the server's
   session id from the nonce and the node list);
2. ``graph_reveal``: the server sends every node the list ``L = h_0 .. h_{n-1}``; a node
   checks that it has n entries and its own is unchanged, keeps ``L`` and answers rho_i
   with its identity signature over ``(pre, round, node_i, SHA-256(L), rho_i)``; it reveals
   for one list only;
3. the protocol's first request carries ``SHA-256(L) || SHA-256(R) || (rho_i || sig_i)_i``
   (``R = rho_0 .. rho_{n-1}``); a node checks every reveal against its own copy of ``L``
   and every signature against the federation's key of that node, and the round's
   session id is ``SHA-256(label' || pre || round || SHA-256(L) || SHA-256(R))``
   (:func:`session`); later requests carry ``SHA-256(L) || SHA-256(R)``.

The commitments are fixed before any reveal, so the corrupt nodes and the server can
only abort a draw, not steer it; every signature is over the list its signer saw, so
nodes shown different lists refuse before any key is advertised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from typing import Protocol

from flwr.app import ConfigRecord, RecordDict

from securefed.crypto.random import RandomSource
from securefed.crypto.signing import (
    SIGNATURE_BYTES,
    Ed25519PrivateKey,
    KeyDirectory,
    sign,
    verify,
)
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols.base import AggregationProtocol


class BeaconRequest(Protocol):
    """What the beacon reads of an ``_envelope.Request`` (which imports this module: typed, not imported)."""

    @property
    def round(self) -> int: ...

    @property
    def n(self) -> int: ...

    @property
    def session(self) -> bytes: ...

    @property
    def client(self) -> int: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def beacon(self) -> bytes: ...

__all__ = ["COMMIT", "PHASES", "REVEAL", "STATE_KEY", "ServerBeacon", "commitment", "node_check", "node_commit",
           "node_reveal", "required", "session", "split_field", "tombstone"]

#: The beacon's two exchanges, in order, before the protocol's first phase.
COMMIT, REVEAL = "graph_commit", "graph_reveal"
PHASES = (COMMIT, REVEAL)
#: Where a node keeps its beacon state in ``context.state``.
STATE_KEY = "securefed.beacon"

RHO = 32
HASH = 32
REVEAL_BYTES = RHO + SIGNATURE_BYTES
_U64 = struct.Struct(">Q")
_COMMIT_LABEL = b"securefed/flower/graph-commit\x00"
_SESSION_LABEL = b"securefed/flower/graph-session\x00"
_PURPOSE = "flower/graph-reveal"


def required(protocol: AggregationProtocol, n: int) -> bool:
    """Whether a round of n of `protocol` needs the beacon: an active adversary and a Harary (non-complete) graph.

    A semi-honest server draws its nonce honestly; the complete graph does not depend on the session."""
    desc = protocol.describe(n)
    return desc.get("graph") == "harary" and desc.get("adversary") == "active"


def commitment(pre: bytes, round_index: int, node: int, rho: bytes) -> bytes:
    """Node `node`'s commitment to its 32 bytes `rho` in the round with server session `pre`."""
    return hashlib.sha256(_COMMIT_LABEL + pre + _U64.pack(round_index) + _U64.pack(node) + rho).digest()


def _signed(pre: bytes, round_index: int, node: int, list_hash: bytes, rho: bytes) -> bytes:
    return pre + _U64.pack(round_index) + _U64.pack(node) + list_hash + rho


def session(pre: bytes, round_index: int, list_hash: bytes, reveals_hash: bytes) -> bytes:
    """The protocol's session id after the beacon (the graph derives from it)."""
    return hashlib.sha256(_SESSION_LABEL + pre + _U64.pack(round_index) + list_hash + reveals_hash).digest()


def split_field(field: bytes, n: int) -> tuple[bytes, bytes, list[tuple[bytes, bytes]] | None]:
    """``(SHA-256(L), SHA-256(R), reveals or None)`` from a request's ``beacon`` field.

    MessageRejected for any length but 64 or 64 + 96 n, or reveals that do not hash to SHA-256(R)."""
    if len(field) == 2 * HASH:
        return field[:HASH], field[HASH:], None
    if len(field) != 2 * HASH + n * REVEAL_BYTES:
        raise MessageRejected("invalid request: graph beacon field of the wrong length")
    body = field[2 * HASH:]
    reveals = [(body[o:o + RHO], body[o + RHO:o + REVEAL_BYTES]) for o in range(0, len(body), REVEAL_BYTES)]
    if hashlib.sha256(b"".join(rho for rho, _ in reveals)).digest() != field[HASH:2 * HASH]:
        raise MessageRejected("invalid request: the graph beacon's reveals do not match their hash")
    return field[:HASH], field[HASH:2 * HASH], reveals


def _verify_reveal(keys: KeyDirectory, client: int, pre: bytes, round_index: int, node: int, list_hash: bytes,
                   expected: bytes, rho: bytes, sig: bytes) -> None:
    if commitment(pre, round_index, node, rho) != expected:
        raise MessageRejected(f"invalid graph beacon: node {node}'s reveal does not open its commitment")
    try:
        verify(keys.verify_key(client), sig, _signed(pre, round_index, node, list_hash, rho), purpose=_PURPOSE)
    except MessageRejected:
        raise MessageRejected(f"invalid graph beacon: node {node}'s reveal is not signed over this commitment "
                              "list (forged, or the server showed it another list)") from None


class ServerBeacon:
    """The server's side of the beacon for one round: collects commitments, then reveals.

    `keys`: the round's identity directory by client index (public keys). :meth:`requests`,
    :meth:`receive` (MessageRejected for a bad reply) and :meth:`finish` (ProtocolAborted unless
    every node answered) per phase; then :attr:`session` and :meth:`field` for the protocol's requests.
    """

    def __init__(self, pre: bytes, round_index: int, nodes: Sequence[int], keys: KeyDirectory) -> None:
        self.pre, self.round, self.nodes, self.keys = pre, round_index, tuple(nodes), keys
        self.commitments: dict[int, bytes] = {}
        self.reveals: dict[int, tuple[bytes, bytes]] = {}
        self.list_hash = b""
        self.session = b""
        self._first = b""

    def requests(self, phase: str) -> dict[int, bytes]:
        """Payload per client: empty for ``graph_commit``, the commitment list for ``graph_reveal``."""
        if phase == COMMIT:
            return dict.fromkeys(range(len(self.nodes)), b"")
        listing = b"".join(self.commitments[i] for i in range(len(self.nodes)))
        return dict.fromkeys(range(len(self.nodes)), listing)

    def receive(self, phase: str, client: int, payload: bytes) -> None:
        """Take client's commitment or reveal; MessageRejected for a malformed or false one."""
        if phase == COMMIT:
            if len(payload) != HASH:
                raise MessageRejected("invalid graph commitment: not 32 bytes")
            self.commitments[client] = payload
            return
        if len(payload) != REVEAL_BYTES:
            raise MessageRejected(f"invalid graph reveal: not {REVEAL_BYTES} bytes")
        rho, sig = payload[:RHO], payload[RHO:]
        _verify_reveal(self.keys, client, self.pre, self.round, self.nodes[client], self.list_hash,
                       self.commitments[client], rho, sig)
        self.reveals[client] = (rho, sig)

    def finish(self, phase: str) -> None:
        """Close a beacon phase. ProtocolAborted unless every node answered: the beacon needs all of them."""
        got = self.commitments if phase == COMMIT else self.reveals
        missing = [v for i, v in enumerate(self.nodes) if i not in got]
        if missing:
            raise ProtocolAborted(AbortReason.TOO_FEW_SURVIVORS,
                                  f"graph beacon: nodes {missing} sent no valid {phase.split('_')[1]}; the masking "
                                  "graph needs every node of the round (run the next round without them)",
                                  phase=phase)
        if phase == COMMIT:
            self.list_hash = hashlib.sha256(b"".join(self.commitments[i] for i in range(len(self.nodes)))).digest()
            return
        rhos = b"".join(self.reveals[i][0] for i in range(len(self.nodes)))
        reveals_hash = hashlib.sha256(rhos).digest()
        self.session = session(self.pre, self.round, self.list_hash, reveals_hash)
        body = b"".join(rho + sig for rho, sig in (self.reveals[i] for i in range(len(self.nodes))))
        self._first = self.list_hash + reveals_hash + body

    def field(self, *, first: bool) -> bytes:
        """The ``beacon`` field of a protocol request: with every signed reveal in the protocol's first phase."""
        return self._first if first else self._first[:2 * HASH]


# -- the node's side ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _State:
    """A node's beacon of one round: its rho and, once revealed, the list it revealed for (empty rho: refused)."""

    round: int
    session: bytes
    client: int
    rho: bytes
    list_hash: bytes
    commitments: bytes

    @classmethod
    def load(cls, state: RecordDict) -> _State | None:
        saved = state.get(STATE_KEY)
        if not isinstance(saved, ConfigRecord):
            return None
        fields = {f.name: saved.get(f.name) for f in dataclasses.fields(cls)}
        if any(type(fields[k]) is not (int if k in ("round", "client") else bytes) for k in fields):
            return None
        return cls(**fields)  # type: ignore[arg-type]


def _saved(state: RecordDict, req: BeaconRequest, *, pre: bytes) -> _State:
    saved = _State.load(state)
    if saved is None or (saved.round, saved.session, saved.client) != (req.round, pre, req.client):
        raise MessageRejected("invalid request: this node holds no graph commitment for this round and session "
                              "(out of phase: the beacon starts with graph_commit)")
    if not saved.rho:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED, "this node refused this round's graph beacon earlier")
    return saved


def _store(state: RecordDict, req: BeaconRequest, pre: bytes, rho: bytes, list_hash: bytes, listing: bytes) -> None:
    record = _State(req.round, pre, req.client, rho, list_hash, listing)
    state[STATE_KEY] = ConfigRecord(dataclasses.asdict(record))


def tombstone(state: RecordDict, req: BeaconRequest, pre: bytes) -> None:
    """Mark this round's beacon as refused: the node reveals and accepts nothing more of it."""
    _store(state, req, pre, b"", b"", b"")


def node_commit(state: RecordDict, req: BeaconRequest, node: int, rng: RandomSource) -> bytes:
    """``graph_commit``: draw rho, keep it in `state`, answer the commitment (a new commit replaces an older one)."""
    if req.payload:
        raise MessageRejected("invalid graph_commit request: non-empty payload")
    saved = _State.load(state)
    if saved is not None and req.round < saved.round:
        raise MessageRejected("invalid request: stale round")
    rho = rng.token_bytes(RHO)
    _store(state, req, req.session, rho, b"", b"")
    return commitment(req.session, req.round, node, rho)


def node_reveal(state: RecordDict, req: BeaconRequest, node: int, key: Ed25519PrivateKey) -> bytes:
    """``graph_reveal``: check the commitment list (n entries, this node's unchanged), keep it, answer rho and
    the signature over the list. One list per commitment: another list is refused."""
    saved = _saved(state, req, pre=req.session)
    listing, n, rho = req.payload, req.n, saved.rho
    try:
        if len(listing) != n * HASH:
            raise MessageRejected(f"invalid graph_reveal request: the commitment list must have {n} entries")
        if listing[req.client * HASH:(req.client + 1) * HASH] != commitment(req.session, req.round, node, rho):
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  "graph beacon: the server's commitment list changes this node's commitment")
        list_hash = hashlib.sha256(listing).digest()
        if saved.list_hash and saved.list_hash != list_hash:
            raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                                  "graph beacon: the server asks this node to reveal for a second, different list")
    except (MessageRejected, ProtocolAborted):
        tombstone(state, req, req.session)  # this commitment is never opened
        raise
    _store(state, req, req.session, rho, list_hash, listing)
    return rho + sign(key, _signed(req.session, req.round, node, list_hash, rho), purpose=_PURPOSE)


def node_check(state: RecordDict, req: BeaconRequest, pre: bytes, nodes: Sequence[int], keys: KeyDirectory) -> None:
    """The protocol's first request of a beacon round: every reveal opens this node's copy of the list and is
    signed over it by its node, this node's own reveal is its rho, and the session is the derived one.

    MessageRejected / ProtocolAborted otherwise (the node then advertises nothing)."""
    if not req.beacon:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                              "this round's protocol needs the graph beacon (active SecAgg+ on a Harary graph); "
                              "the server skipped it")
    saved = _saved(state, req, pre=pre)
    try:
        _check_reveals(saved, req, pre, nodes, keys)
    except (MessageRejected, ProtocolAborted):
        tombstone(state, req, pre)
        raise


def _check_reveals(saved: _State, req: BeaconRequest, pre: bytes, nodes: Sequence[int], keys: KeyDirectory) -> None:
    list_hash, reveals_hash, reveals = split_field(req.beacon, req.n)
    if reveals is None or not saved.list_hash or list_hash != saved.list_hash:
        raise ProtocolAborted(AbortReason.REQUEST_REFUSED,
                              "graph beacon: the request's commitment list is not the one this node revealed for")
    listing = saved.commitments
    for i, (rho, sig) in enumerate(reveals):
        _verify_reveal(keys, i, pre, req.round, nodes[i], list_hash, listing[i * HASH:(i + 1) * HASH], rho, sig)
    if reveals[req.client][0] != saved.rho:
        raise MessageRejected("invalid graph beacon: this node's reveal was replaced")
    if req.session != session(pre, req.round, list_hash, reveals_hash):
        raise MessageRejected("invalid request: the session id is not the one the graph beacon gives")
