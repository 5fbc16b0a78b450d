"""The SecAgg / SecAgg+ server's states (fcp/secagg style): one class per phase, no I/O.

Each state builds its phase's requests, takes its phase's replies and, when the phase
closes, checks what the rest of the round needs and returns the next state (or raises
ProtocolAborted, which the facade turns into :class:`Aborted`). What the round keeps
between phases is one :class:`ServerData`; ``server.Server`` drives the states and keeps
the ``ServerProtocol`` interface. See ``protocols/secagg.md`` (server).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from securefed.crypto import kex, shamir, signing
from securefed.crypto.masks import apply_masks
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import DropRecord, Party
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.packed import UnpackAdder
from securefed.protocols.secagg.round import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_INPUT,
    PHASES,
    SECRET_BYTES,
    SHARE_KEYS,
    UNMASKING,
    Round,
    advertise_message,
    commitment,
    mask_key,
    self_mask_key,
)

__all__ = [
    "Aborted",
    "AwaitingConsistency",
    "AwaitingKeys",
    "AwaitingMasked",
    "AwaitingShares",
    "AwaitingUnmask",
    "Done",
    "ServerData",
    "State",
    "route",
    "route_complete",
]


@dataclasses.dataclass
class Unmasked:
    """One responder's reply, checked: its shares are read only if it is among the holders used."""

    ids: np.ndarray
    body: memoryview

    @functools.cached_property
    def shares(self) -> np.ndarray:
        """For each target id (ascending), its 9-word share (a uint32 view of the reply)."""
        return W.list_rows(self.body, W.SHARE).view("<u4")


@dataclasses.dataclass(eq=False)
class ServerData:
    """What the server keeps between phases (public: keys, sealed shares, the masked sum, revealed shares).

    It holds no reference to the states or the facade, so the model-sized accumulator goes with the
    round without waiting for a gc pass."""

    round: Round
    expected: set[int] = dataclasses.field(default_factory=set)  # who must answer the open phase
    replied: set[int] = dataclasses.field(default_factory=set)
    refusals: dict[int, str] = dataclasses.field(default_factory=dict)  # who will refuse the open phase, and why
    alive: set[int] = dataclasses.field(default_factory=set)
    dropped: dict[int, DropRecord] = dataclasses.field(default_factory=dict)
    keys: dict[int, bytes] = dataclasses.field(default_factory=dict)  # U1: each record (c_pk, s_pk[, sig], check)
    shares: dict[int, memoryview] = dataclasses.field(default_factory=dict)  # U2: each share_keys reply body
    expect: dict[int, W.Expected] = dataclasses.field(default_factory=dict)  # the ids each reply must list
    expect_shares: dict[int, W.Expected] = dataclasses.field(default_factory=dict)  # each sender's recipients
    commit: dict[int, bytes] = dataclasses.field(default_factory=dict)
    u3: list[int] = dataclasses.field(default_factory=list)
    sigs: dict[int, bytes] = dataclasses.field(default_factory=dict)  # U4 (active)
    unmasked: dict[int, Unmasked] = dataclasses.field(default_factory=dict)
    acc: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    adder: UnpackAdder | None = None
    aborted: ProtocolAborted | None = None
    result: tuple[np.ndarray, tuple[int, ...]] | None = None

    @classmethod
    def new(cls, rnd: Round) -> ServerData:
        acc = np.zeros(rnd.spec.dim, dtype=rnd.dtype)
        return cls(rnd, alive=set(range(rnd.spec.n)), acc=acc, adder=UnpackAdder(acc, rnd.width))

    def drop(self, party: int, record: DropRecord) -> None:
        self.dropped.setdefault(party, record)
        self.alive.discard(party)
        self.expected.discard(party)

    def members(self, parties: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self.round.spec.n, dtype=bool)
        mask[list(parties)] = True
        return mask

    def need(self, count: int, what: str, phase: int, need: int | None = None) -> None:
        need = self.round.t if need is None else need
        if count < need:
            raise abort(AbortReason.TOO_FEW_SURVIVORS, f"only {count} {what}; the round needs {need}", phase)


def abort(reason: AbortReason, message: str, phase: int) -> ProtocolAborted:
    return ProtocolAborted(reason, message, phase=PHASES[phase])


class State:
    """One phase of the server: its requests, its replies, and the next state when it closes."""

    phase: ClassVar[int]

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        raise NotImplementedError

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        raise MessageRejected("invalid message: out of phase or unexpected sender")

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        raise NotImplementedError


class AwaitingKeys(State):
    """advertise_keys: every client is asked for its two public keys (and, active, its signature on them)."""

    phase = ADVERTISE

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        return dict.fromkeys(sorted(d.alive), d.round.message(ADVERTISE, wire.SERVER, b""))

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        r = d.round
        if len(body) != 2 * W.KEY + (W.SIG if r.active else 0) + W.CHECK:
            raise MessageRejected("invalid message: wrong length of advertised keys")
        record = bytes(body)
        keys = W.check_keys(u, record)
        if r.active:
            c_pk, s_pk, sig = keys[: W.KEY], keys[W.KEY : 2 * W.KEY], keys[2 * W.KEY :]
            signing.verify(r.identities.verify_key(u), sig, advertise_message(r, u, c_pk, s_pk),  # type: ignore[union-attr]
                           purpose="secagg/advertise")
        d.keys[u] = record

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        d.need(len(d.keys), "clients advertised keys", ADVERTISE)
        return AwaitingShares


class AwaitingShares(State):
    """share_keys: each advertiser gets the records of its closed neighbourhood and seals it shares."""

    phase = SHARE_KEYS

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        r = d.round
        senders = np.array(sorted(d.keys), dtype=np.int64)
        # One record (id, c_pk, s_pk[, sig], check) per client that advertised, forwarded as it came
        # (so each neighbour checks it); u gets the rows of U1 ∩ N[u], its own included.
        complete = r.graph.complete
        out: dict[Party, bytes] = {}
        if complete:  # everyone gets the same list: one message, as in the paper's broadcast
            msg = r.message(SHARE_KEYS, wire.SERVER, W.records([(v, d.keys[v]) for v in senders.tolist()]))
            everyone = W.Expected(senders)
        else:
            keys = b"".join(d.keys[v] for v in senders.tolist())
            table = W.record_table(senders, np.frombuffer(keys, dtype=np.uint8).reshape(senders.size, -1))
            advertised = d.members(senders)
        for i, u in enumerate(senders.tolist()):
            if complete:  # u's shares go to everyone else
                count = senders.size
                d.expect[u] = W.Expected.all_but(everyone, i)
                out[u] = msg
            else:
                nb = r.graph.closed_neighborhood(u)
                chosen = np.searchsorted(senders, nb[advertised[nb]])
                count = chosen.size
                d.expect[u] = W.Expected(senders[chosen[chosen != i]])
                out[u] = r.message(SHARE_KEYS, wire.SERVER, W.list_header(count), table[chosen].reshape(-1))
            if count < r.t:  # u and its peers are the holders of its shares
                d.refusals[u] = "fewer than t of its neighbourhood advertised keys"
        return out

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        if len(body) < W.COMMIT:
            raise MessageRejected("invalid message: truncated shares")
        W.check_list(body, W.SEALED, d.expect[u], offset=W.COMMIT)
        d.commit[u] = bytes(body[: W.COMMIT])
        d.shares[u] = body
        d.expect_shares[u] = d.expect[u]

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        d.need(len(d.shares), "clients shared their keys", SHARE_KEYS)
        return AwaitingMasked


def route(d: ServerData, senders: list[int]) -> list[tuple[int, tuple[bytes | memoryview, ...]]]:
    """Every sealed share as a (sender id, sealed) record, grouped by recipient and ordered by sender:
    per sender in turn as a recipient, the count of its records and the pieces of its request body."""
    counts = [d.expect_shares[v].ids.size for v in senders]
    recipients = np.concatenate([d.expect_shares[v].ids for v in senders])
    from_ = np.repeat(np.array(senders, dtype=np.int64), counts)
    order = np.lexsort((from_, recipients))
    rows = np.concatenate([W.list_rows(d.shares[v], W.SEALED, W.COMMIT) for v in senders])
    table = W.record_table(from_[order], rows[order])
    raw, rec = table.reshape(-1).data, table.shape[-1]
    starts = np.searchsorted(recipients[order], senders).tolist()
    ends = np.searchsorted(recipients[order], senders, side="right").tolist()
    return [(b - a, (W.list_header(b - a), raw[a * rec : b * rec])) for a, b in zip(starts, ends)]


def route_complete(d: ServerData, senders: list[int]) -> np.ndarray:
    """:func:`route` on the complete graph, as a table: row j is sender j's request body without its
    count (the n - 1 records addressed to it). Sender i's shares are for every other advertiser in
    id order (so every reply has the same length), the one for sender j at j's place among them;
    one compiled pass finds each record's place, one gather copies them."""
    s = np.array(senders, dtype=np.int64)
    start = W.COMMIT + 4  # the records of a share_keys reply
    records = np.frombuffer(b"".join(d.shares[v][start:] for v in senders), dtype=np.uint8)
    place = np.searchsorted(np.array(sorted(d.keys), dtype=np.int64), s)  # among the advertisers
    return W.route_complete(records.reshape(-1, 4 + W.SEALED), place, s)


class AwaitingMasked(State):
    """masked_input: each sharer gets the shares sealed to it and answers with its masked input, which is
    added to the accumulator as it arrives and never kept."""

    phase = MASKED_INPUT

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        r = d.round
        senders = sorted(d.shares)
        if r.graph.complete and len(senders) > 1:  # bodies all of one length: one header, one copy each
            table = route_complete(d, senders)
            if len(senders) < r.t:
                d.refusals.update(dict.fromkeys(senders, "fewer than t of its neighbourhood shared keys"))
            head = r.header(MASKED_INPUT, wire.SERVER, 4 + table.shape[1]) + W.list_header(len(senders) - 1)
            raw, size = table.reshape(-1).data, table.shape[1]
            return {u: head + raw[j * size : (j + 1) * size] for j, u in enumerate(senders)}
        out: dict[Party, bytes] = {}
        heads: dict[int, bytes] = {}  # one header per body length
        for u, (count, pieces) in zip(senders, route(d, senders)):
            if count + 1 < r.t:
                d.refusals[u] = "fewer than t of its neighbourhood shared keys"
            size = sum(len(p) for p in pieces)
            header = heads.get(size)
            if header is None:
                header = heads[size] = r.header(MASKED_INPUT, wire.SERVER, size)
            out[u] = b"".join((header, *pieces))
        return out

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        assert d.adder is not None
        d.adder.check(body)
        # (held for a group of four only while enough replies are still expected to fill it)
        d.adder.add(body, more=len(d.expected) - len(d.replied) - 1)
        d.u3.append(u)

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        assert d.adder is not None
        d.adder.flush()  # the inputs it held back for a group
        d.adder = None
        d.need(len(d.u3), "masked inputs arrived", MASKED_INPUT)
        return AwaitingConsistency


class AwaitingConsistency(State):
    """consistency_check (active only: semi-honest rounds ask nobody): the survivors sign the survivor list.
    Closing it checks, before anything is revealed, that every needed secret keeps t holders."""

    phase = CONSISTENCY

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        r = d.round
        if not r.active:
            return {}
        return dict.fromkeys(sorted(d.u3), r.message(CONSISTENCY, wire.SERVER, W.bitmap(d.u3, r.spec.n)))

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        r = d.round
        if len(body) != W.SIG:
            raise MessageRejected("invalid message: wrong signature length")
        message = r.context() + W.bitmap(d.u3, r.spec.n)
        signing.verify(r.identities.verify_key(u), body, message, purpose="secagg/survivors")  # type: ignore[union-attr]
        d.sigs[u] = bytes(body)

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        if d.round.active:
            d.need(len(d.sigs), "clients signed the survivor list", CONSISTENCY, d.round.survivors_needed)
        check_reconstructible(d, set(d.sigs) if d.round.active else set(d.u3), CONSISTENCY)
        return AwaitingUnmask


class AwaitingUnmask(State):
    """unmasking: the responders reveal one share per peer; closing it reconstructs and unmasks the sum."""

    phase = UNMASKING

    @staticmethod
    def requests(d: ServerData) -> dict[Party, bytes]:
        r = d.round
        survivors = W.bitmap(d.u3, r.spec.n)
        responders = sorted(d.sigs) if r.active else sorted(d.u3)
        shared = d.members(d.shares)
        everyone = np.flatnonzero(shared)
        if r.graph.complete:  # each answers for the clients whose shares it holds: on this graph, all
            d.expect.update(dict.fromkeys(responders, W.Expected(everyone)))
        else:
            for u in responders:
                nb = r.graph.closed_neighborhood(u)
                d.expect[u] = W.Expected(nb[shared[nb]])
        if not r.active:
            return dict.fromkeys(responders, r.message(UNMASKING, wire.SERVER, survivors))
        # Every signature to everyone: a client checks the quorum over the whole round (one message for all).
        msg = r.message(UNMASKING, wire.SERVER, W.records(sorted(d.sigs.items()), survivors))
        return dict.fromkeys(responders, msg)

    @staticmethod
    def receive(d: ServerData, u: int, body: memoryview) -> None:
        W.check_list(body, W.SHARE, d.expect[u], share_words=W.SHARE // 4)
        d.unmasked[u] = Unmasked(d.expect[u].ids, body)

    @staticmethod
    def finish(d: ServerData) -> type[State]:
        d.need(len(d.unmasked), "clients answered the unmasking request", UNMASKING)
        check_reconstructible(d, set(d.unmasked), UNMASKING)
        unmask(d)
        return Done


class Done(State):
    """The sum is unmasked: ``result()`` returns it; no phase is left."""

    phase = len(PHASES)


class Aborted(State):
    """The round cannot finish safely: every call raises the abort (``ServerData.aborted``)."""

    phase = -1


def targets(d: ServerData) -> tuple[list[int], list[int]]:
    """(survivors whose b_u is needed, dropped clients whose mask key is needed)."""
    g, survivors = d.round.graph, sorted(d.u3)
    gone = sorted(set(d.shares).difference(survivors))  # shared keys, sent no masked input
    if not gone:
        return survivors, []
    u3 = d.members(survivors)
    return survivors, [v for v in gone if u3[g.neighbors(v)].any()]


def check_reconstructible(d: ServerData, responders: set[int], phase: int) -> None:
    """Abort before anything is revealed unless every needed secret has t holders among `responders`."""
    g, t = d.round.graph, d.round.t
    survivors, dropped = targets(d)
    needed = survivors + dropped
    if g.complete:  # every responder holds a share of every secret: the first stands for all
        counts = [(needed[0], len(responders))] if needed else []
    else:
        alive = d.members(responders)
        counts = [(v, int(alive[g.closed_neighborhood(v)].sum())) for v in needed]
    for v, count in counts:
        if count < t:
            raise abort(AbortReason.TOO_FEW_SURVIVORS, f"client {v}'s secrets have {count} holders left; "
                        f"t = {t} are needed", phase)


def unmask(d: ServerData) -> None:
    """Remove the survivors' self masks and the dropped clients' pairwise masks from the sum, and decode it."""
    r = d.round
    survivors, dropped = targets(d)
    secrets = reconstruct(d, [(v, 0) for v in survivors] + [(v, 1) for v in dropped])
    add: list[bytes] = []
    sub: list[bytes] = []
    for v in survivors:
        b = secrets[v, 0]
        if commitment(r, v, b) != d.commit[v]:
            raise abort(AbortReason.RECONSTRUCTION_FAILED,
                        f"client {v}'s self-mask seed does not match its commitment", UNMASKING)
        sub.append(self_mask_key(r, v, b))
    u3 = set(survivors)
    for v in dropped:
        sk = kex.load_private_key(secrets[v, 1])
        if kex.public_bytes(sk) != d.keys[v][W.KEY : 2 * W.KEY]:
            raise abort(AbortReason.RECONSTRUCTION_FAILED,
                        f"client {v}'s mask key does not match its public key", UNMASKING)
        for u in r.graph.neighbors(v).tolist():
            if u in u3:  # y_u holds +PRG(s_uv) if v > u, -PRG(s_uv) if v < u: take it out
                (sub if v > u else add).append(mask_key(r, sk, d.keys[u][W.KEY : 2 * W.KEY], v, u))
    apply_masks(d.acc, add, sub)
    if r.width < 8 * d.acc.itemsize:
        d.acc &= d.acc.dtype.type((1 << r.width) - 1)
    total = r.encoder.decode(d.acc, n=r.spec.n, count=len(survivors))
    d.result = (np.asarray(total, dtype=np.float64), tuple(survivors))


def reconstruct(d: ServerData, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """Secrets (v, 0) = b_v and (v, 1) = mask key of v from the first t holders' shares."""
    g, t = d.round.graph, d.round.t
    wanted = sorted(wanted)  # each group's ids ascending, as in every holder's reply
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    if g.complete:  # everyone holds a share of everything: one group, the first t responders
        groups[tuple(sorted(d.unmasked)[:t])] = wanted
    else:
        answered = d.members(d.unmasked)
        for v, kind in wanted:
            nb = g.closed_neighborhood(v)
            groups.setdefault(tuple(nb[answered[nb]][:t].tolist()), []).append((v, kind))
    out: dict[tuple[int, int], bytes] = {}
    for holders, group in groups.items():
        vs = np.array([v for v, _ in group])
        # vs is a sorted subset of every holder's ids: of the same size, it is all of them in order
        shares = np.stack([x.shares if x.ids.size == vs.size else x.shares[np.searchsorted(x.ids, vs)]
                           for x in (d.unmasked[h] for h in holders)])
        try:
            values = shamir.reconstruct(list(holders), shares, t, SECRET_BYTES)
        except MessageRejected:
            raise abort(AbortReason.RECONSTRUCTION_FAILED, "the revealed shares are inconsistent",
                        UNMASKING) from None
        out.update(zip(group, values))
    return out
