"""The server of SecAgg / SecAgg+: routes keys and shares, sums masked inputs in place, unmasks the sum.

Memory: one modular accumulator of the vector's length plus O(n x degree) small
state (keys, sealed shares, revealed shares); masked inputs are added as they arrive,
four at a time in one pass over the accumulator (so up to three accepted inputs of at
most 8 MiB each are held, while enough replies are expected to fill the group, until the
fourth comes or the phase ends), and never kept. Before asking anyone to unmask, the server
checks that every secret it will need has t holders left, so a round that cannot
finish aborts before any share is revealed. See ``protocols/secagg.md`` (server).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import cast

import numpy as np

from securefed.crypto import kex, shamir, signing
from securefed.crypto.masks import apply_masks
from securefed.encoding.fixedpoint import check_sum
from securefed.errors import AbortReason, MessageRejected, ProtocolAborted
from securefed.protocols import wire
from securefed.protocols.base import DropReason, DropRecord, Party, ServerProtocol
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.packed import UnpackAdder
from securefed.protocols.secagg.round import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_INPUT,
    PHASE_INDEX,
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

__all__ = ["Server"]

#: The server's handler of each phase's replies, by name: bound methods kept on the server would make
#: a reference cycle, and its model-sized accumulator would outlive the round until a gc pass.
_TAKE = ("_take_keys", "_take_shares", "_take_masked", "_take_signature", "_take_unmask")

@dataclasses.dataclass
class _Unmasked:
    """One responder's reply, checked: its shares are read only if it is among the holders used."""

    ids: np.ndarray
    body: memoryview

    @functools.cached_property
    def shares(self) -> np.ndarray:
        """For each target id (ascending), its 9-word share (a uint32 view of the reply)."""
        return W.list_rows(self.body, W.SHARE).view("<u4")


class Server(ServerProtocol):
    """The server of one round: routes keys and shares, sums masked inputs in place, unmasks the sum."""

    def __init__(self, rnd: Round) -> None:
        self.round = rnd
        n = rnd.spec.n
        self._next = 0  # index of the next phase to open
        self._open: int | None = None
        self._expected: set[int] = set()
        self._replied: set[int] = set()
        self._refusals: dict[int, str] = {}
        self._alive = set(range(n))
        self._dropped: dict[int, DropRecord] = {}
        self._keys: dict[int, bytes] = {}  # U1: each advertised record (c_pk, s_pk[, sig], check), as checked
        self._key_record = 2 * W.KEY + (W.SIG if rnd.active else 0) + W.CHECK
        self._shares: dict[int, memoryview] = {}  # U2: each sender's share_keys reply body (checked)
        self._expect: dict[int, W.Expected] = {}  # the ids each party's reply of this phase must list
        self._expect_shares: dict[int, W.Expected] = {}  # the recipients of each sender's shares, ascending
        self._commit: dict[int, bytes] = {}
        self._u3: list[int] = []
        self._sigs: dict[int, bytes] = {}  # U4 (active)
        self._unmasked: dict[int, _Unmasked] = {}
        self._acc = np.zeros(rnd.spec.dim, dtype=rnd.dtype)
        self._adder = UnpackAdder(self._acc, rnd.width)
        self._aborted: ProtocolAborted | None = None
        self._result: tuple[np.ndarray, tuple[int, ...]] | None = None

    @property
    def dropped(self) -> Mapping[int, DropRecord]:
        return self._dropped

    def _abort(self, reason: AbortReason, message: str, phase: int) -> ProtocolAborted:
        self._aborted = ProtocolAborted(reason, message, phase=PHASES[phase])
        return self._aborted

    def _need(self, count: int, what: str, phase: int, need: int | None = None) -> None:
        need = self.round.t if need is None else need
        if count < need:
            raise self._abort(AbortReason.TOO_FEW_SURVIVORS, f"only {count} {what}; the round needs {need}", phase)

    # requests --------------------------------------------------------------------------------

    def requests(self, phase: str) -> Mapping[Party, bytes]:
        if self._aborted is not None:
            raise self._aborted
        if PHASE_INDEX.get(phase) != self._next or self._open is not None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"requests({phase!r}) out of order", phase=phase)
        p = self._next
        build = (self._advertise_requests, self._share_requests, self._masked_requests,
                 self._consistency_requests, self._unmask_requests)[p]
        reqs = build()
        # SecAgg's parties are its clients: int ids
        self._open, self._expected, self._replied = p, set(cast(Mapping[int, bytes], reqs)), set()
        return reqs

    def _advertise_requests(self) -> dict[Party, bytes]:
        msg = self.round.message(ADVERTISE, wire.SERVER, b"")
        return dict.fromkeys(sorted(self._alive), msg)

    def _share_requests(self) -> dict[Party, bytes]:
        r = self.round
        senders = np.array(sorted(self._keys), dtype=np.int64)
        # One record (id, c_pk, s_pk[, sig], check) per client that advertised, forwarded as it came
        # (so each neighbour checks it); u gets the rows of U1 ∩ N[u], its own included.
        complete = r.graph.complete
        out: dict[Party, bytes] = {}
        if complete:  # everyone gets the same list: one message, as in the paper's broadcast
            msg = r.message(SHARE_KEYS, wire.SERVER, W.records([(v, self._keys[v]) for v in senders.tolist()]))
            everyone = W.Expected(senders)
        else:
            keys = b"".join(self._keys[v] for v in senders.tolist())
            table = W.record_table(senders, np.frombuffer(keys, dtype=np.uint8).reshape(senders.size, -1))
            advertised = self._members(senders)
        for i, u in enumerate(senders.tolist()):
            if complete:  # u's shares go to everyone else
                count = senders.size
                self._expect[u] = W.Expected.all_but(everyone, i)
                out[u] = msg
            else:
                nb = r.graph.closed_neighborhood(u)
                chosen = np.searchsorted(senders, nb[advertised[nb]])
                count = chosen.size
                self._expect[u] = W.Expected(senders[chosen[chosen != i]])
                out[u] = r.message(SHARE_KEYS, wire.SERVER, W.list_header(count), table[chosen].reshape(-1))
            if count < r.t:  # u and its peers are the holders of its shares
                self._refusals[u] = "fewer than t of its neighbourhood advertised keys"
        return out

    def _masked_requests(self) -> dict[Party, bytes]:
        r = self.round
        senders = sorted(self._shares)
        if r.graph.complete and len(senders) > 1:  # bodies all of one length: one header, one copy each
            table = self._route_complete(senders)
            if len(senders) < r.t:
                self._refusals.update(dict.fromkeys(senders, "fewer than t of its neighbourhood shared keys"))
            head = r.header(MASKED_INPUT, wire.SERVER, 4 + table.shape[1]) + W.list_header(len(senders) - 1)
            raw, size = table.reshape(-1).data, table.shape[1]
            return {u: head + raw[j * size : (j + 1) * size] for j, u in enumerate(senders)}
        out: dict[Party, bytes] = {}
        heads: dict[int, bytes] = {}  # one header per body length
        for u, (count, pieces) in zip(senders, self._route(senders)):
            if count + 1 < r.t:
                self._refusals[u] = "fewer than t of its neighbourhood shared keys"
            size = sum(len(p) for p in pieces)
            header = heads.get(size)
            if header is None:
                header = heads[size] = r.header(MASKED_INPUT, wire.SERVER, size)
            out[u] = b"".join((header, *pieces))
        return out

    def _route(self, senders: list[int]) -> list[tuple[int, tuple[bytes | memoryview, ...]]]:
        """Every sealed share as a (sender id, sealed) record, grouped by recipient and ordered by sender:
        per sender in turn as a recipient, the count of its records and the pieces of its request body."""
        counts = [self._expect_shares[v].ids.size for v in senders]
        recipients = np.concatenate([self._expect_shares[v].ids for v in senders])
        from_ = np.repeat(np.array(senders, dtype=np.int64), counts)
        order = np.lexsort((from_, recipients))
        rows = np.concatenate([W.list_rows(self._shares[v], W.SEALED, W.COMMIT) for v in senders])
        table = W.record_table(from_[order], rows[order])
        raw, rec = table.reshape(-1).data, table.shape[-1]
        starts = np.searchsorted(recipients[order], senders).tolist()
        ends = np.searchsorted(recipients[order], senders, side="right").tolist()
        return [(b - a, (W.list_header(b - a), raw[a * rec : b * rec])) for a, b in zip(starts, ends)]

    def _route_complete(self, senders: list[int]) -> np.ndarray:
        """:meth:`_route` on the complete graph, as a table: row j is sender j's request body without its
        count (the n - 1 records addressed to it). Sender i's shares are for every other advertiser in
        id order (so every reply has the same length), the one for sender j at j's place among them;
        one compiled pass finds each record's place, one gather copies them."""
        s = np.array(senders, dtype=np.int64)
        start = W.COMMIT + 4  # the records of a share_keys reply
        records = np.frombuffer(b"".join(self._shares[v][start:] for v in senders), dtype=np.uint8)
        place = np.searchsorted(np.array(sorted(self._keys), dtype=np.int64), s)  # among the advertisers
        return W.route_complete(records.reshape(-1, 4 + W.SEALED), place, s)

    def _consistency_requests(self) -> dict[Party, bytes]:
        r = self.round
        if not r.active:
            return {}
        msg = r.message(CONSISTENCY, wire.SERVER, W.bitmap(self._u3, r.spec.n))
        return dict.fromkeys(sorted(self._u3), msg)

    def _unmask_requests(self) -> dict[Party, bytes]:
        r = self.round
        survivors = W.bitmap(self._u3, r.spec.n)
        responders = sorted(self._sigs) if r.active else sorted(self._u3)
        shared = self._members(self._shares)
        everyone = np.flatnonzero(shared)
        if r.graph.complete:  # each answers for the clients whose shares it holds: on this graph, all
            self._expect.update(dict.fromkeys(responders, W.Expected(everyone)))
        else:
            for u in responders:
                nb = r.graph.closed_neighborhood(u)
                self._expect[u] = W.Expected(nb[shared[nb]])
        if not r.active:
            msg = r.message(UNMASKING, wire.SERVER, survivors)
            return dict.fromkeys(responders, msg)
        # Every signature to everyone: a client checks the quorum over the whole round (one message for all).
        msg = r.message(UNMASKING, wire.SERVER, W.records(sorted(self._sigs.items()), survivors))
        return dict.fromkeys(responders, msg)

    # replies ---------------------------------------------------------------------------------

    def receive(self, phase: str, party: Party, payload: bytes) -> None:
        if self._aborted is not None:
            raise self._aborted
        p = PHASE_INDEX.get(phase, -1)
        if p != self._open or party not in self._expected:
            raise MessageRejected("invalid message: out of phase or unexpected sender")
        if party in self._replied:
            raise MessageRejected("invalid message: replayed reply")
        assert isinstance(party, int)
        try:
            getattr(self, _TAKE[p])(party, self.round.body(payload, p, party))
        except MessageRejected as e:
            self._drop(party, DropRecord(phase, DropReason.REJECTED, str(e)))
            raise
        self._replied.add(party)

    def _drop(self, party: int, record: DropRecord) -> None:
        self._dropped.setdefault(party, record)
        self._alive.discard(party)
        self._expected.discard(party)

    def _take_keys(self, u: int, body: memoryview) -> None:
        r = self.round
        if len(body) != self._key_record:
            raise MessageRejected("invalid message: wrong length of advertised keys")
        record = bytes(body)
        keys = W.check_keys(u, record)
        if r.active:
            c_pk, s_pk, sig = keys[: W.KEY], keys[W.KEY : 2 * W.KEY], keys[2 * W.KEY :]
            signing.verify(r.identities.verify_key(u), sig, advertise_message(r, u, c_pk, s_pk),  # type: ignore[union-attr]
                           purpose="secagg/advertise")
        self._keys[u] = record

    def _mask_public_key(self, v: int) -> bytes:
        """s_pk of client v, from its advertised record."""
        return self._keys[v][W.KEY : 2 * W.KEY]

    def _take_shares(self, u: int, body: memoryview) -> None:
        if len(body) < W.COMMIT:
            raise MessageRejected("invalid message: truncated shares")
        W.check_list(body, W.SEALED, self._expect[u], offset=W.COMMIT)
        self._commit[u] = bytes(body[: W.COMMIT])
        self._shares[u] = body
        self._expect_shares[u] = self._expect[u]

    def _take_masked(self, u: int, body: memoryview) -> None:
        self._adder.check(body)
        # (held for a group of four only while enough replies are still expected to fill it)
        self._adder.add(body, more=len(self._expected) - len(self._replied) - 1)
        self._u3.append(u)

    def _take_signature(self, u: int, body: memoryview) -> None:
        r = self.round
        if len(body) != W.SIG:
            raise MessageRejected("invalid message: wrong signature length")
        message = r.context() + W.bitmap(self._u3, r.spec.n)
        signing.verify(r.identities.verify_key(u), body, message, purpose="secagg/survivors")  # type: ignore[union-attr]
        self._sigs[u] = bytes(body)

    def _take_unmask(self, u: int, body: memoryview) -> None:
        W.check_list(body, W.SHARE, self._expect[u], share_words=W.SHARE // 4)
        self._unmasked[u] = _Unmasked(self._expect[u].ids, body)

    # closing phases --------------------------------------------------------------------------

    def finish_phase(self, phase: str) -> None:
        if self._aborted is not None:
            raise self._aborted
        p = PHASE_INDEX.get(phase, -1)
        if p != self._open:
            raise ProtocolAborted(AbortReason.INVALID_STATE, f"finish_phase({phase!r}) out of order", phase=phase)
        for u in sorted(self._expected - self._replied):
            why = self._refusals.pop(u, None)
            self._drop(u, DropRecord(phase, DropReason.REFUSED, why) if why else DropRecord(phase, DropReason.NO_REPLY))
        self._open, self._next = None, p + 1
        if p == ADVERTISE:
            self._need(len(self._keys), "clients advertised keys", p)
        elif p == SHARE_KEYS:
            self._need(len(self._shares), "clients shared their keys", p)
        elif p == MASKED_INPUT:
            self._adder.flush()  # the inputs it held back for a group
            self._adder = None  # type: ignore[assignment]
            self._need(len(self._u3), "masked inputs arrived", p)
        elif p == CONSISTENCY:
            if self.round.active:
                self._need(len(self._sigs), "clients signed the survivor list", p, self.round.survivors_needed)
            self._check_reconstructible(set(self._sigs) if self.round.active else set(self._u3), p)
        else:
            self._need(len(self._unmasked), "clients answered the unmasking request", p)
            self._check_reconstructible(set(self._unmasked), p)
            self._unmask()

    def _members(self, parties) -> np.ndarray:
        mask = np.zeros(self.round.spec.n, dtype=bool)
        mask[list(parties)] = True
        return mask

    def _targets(self) -> tuple[list[int], list[int]]:
        """(survivors whose b_u is needed, dropped clients whose mask key is needed)."""
        g, survivors = self.round.graph, sorted(self._u3)
        gone = sorted(set(self._shares).difference(survivors))  # shared keys, sent no masked input
        if not gone:
            return survivors, []
        u3 = self._members(survivors)
        return survivors, [v for v in gone if u3[g.neighbors(v)].any()]

    def _check_reconstructible(self, responders: set[int], phase: int) -> None:
        """Abort before anything is revealed unless every needed secret has t holders among `responders`."""
        g, t = self.round.graph, self.round.t
        survivors, dropped = self._targets()
        needed = survivors + dropped
        if g.complete:  # every responder holds a share of every secret: the first stands for all
            counts = [(needed[0], len(responders))] if needed else []
        else:
            alive = self._members(responders)
            counts = [(v, int(alive[g.closed_neighborhood(v)].sum())) for v in needed]
        for v, count in counts:
            if count < t:
                raise self._abort(AbortReason.TOO_FEW_SURVIVORS,
                                  f"client {v}'s secrets have {count} holders left; t = {t} are needed", phase)

    def _unmask(self) -> None:
        r = self.round
        survivors, dropped = self._targets()
        secrets = self._reconstruct([(v, 0) for v in survivors] + [(v, 1) for v in dropped])
        add: list[bytes] = []
        sub: list[bytes] = []
        for v in survivors:
            b = secrets[v, 0]
            if commitment(r, v, b) != self._commit[v]:
                raise self._abort(AbortReason.RECONSTRUCTION_FAILED,
                                  f"client {v}'s self-mask seed does not match its commitment", UNMASKING)
            sub.append(self_mask_key(r, v, b))
        u3 = set(survivors)
        for v in dropped:
            sk = kex.load_private_key(secrets[v, 1])
            if kex.public_bytes(sk) != self._mask_public_key(v):
                raise self._abort(AbortReason.RECONSTRUCTION_FAILED,
                                  f"client {v}'s mask key does not match its public key", UNMASKING)
            for u in r.graph.neighbors(v).tolist():
                if u in u3:  # y_u holds +PRG(s_uv) if v > u, -PRG(s_uv) if v < u: take it out
                    (sub if v > u else add).append(mask_key(r, sk, self._mask_public_key(u), v, u))
        apply_masks(self._acc, add, sub)
        if r.width < 8 * self._acc.itemsize:
            self._acc &= self._acc.dtype.type((1 << r.width) - 1)
        total = r.encoder.decode(self._acc, n=r.spec.n, count=len(survivors))
        self._result = (np.asarray(total, dtype=np.float64), tuple(survivors))

    def _reconstruct(self, targets: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Secrets (v, 0) = b_v and (v, 1) = mask key of v from the first t holders' shares."""
        g, t = self.round.graph, self.round.t
        targets = sorted(targets)  # each group's ids ascending, as in every holder's reply
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        if g.complete:  # everyone holds a share of everything: one group, the first t responders
            groups[tuple(sorted(self._unmasked)[:t])] = targets
        else:
            answered = self._members(self._unmasked)
            for v, kind in targets:
                nb = g.closed_neighborhood(v)
                groups.setdefault(tuple(nb[answered[nb]][:t].tolist()), []).append((v, kind))
        out: dict[tuple[int, int], bytes] = {}
        for holders, group in groups.items():
            vs = np.array([v for v, _ in group])
            # vs is a sorted subset of every holder's ids: of the same size, it is all of them in order
            shares = np.stack([x.shares if x.ids.size == vs.size else x.shares[np.searchsorted(x.ids, vs)]
                               for x in (self._unmasked[h] for h in holders)])
            try:
                values = shamir.reconstruct(list(holders), shares, t, SECRET_BYTES)
            except MessageRejected:
                raise self._abort(AbortReason.RECONSTRUCTION_FAILED, "the revealed shares are inconsistent",
                                  UNMASKING) from None
            out.update(zip(group, values))
        return out

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        if self._aborted is not None:
            raise self._aborted
        if self._result is None:
            raise ProtocolAborted(AbortReason.INVALID_STATE, "result() before the unmasking phase finished")
        check_sum(self._result[0], len(self._result[1]))  # finite inputs may still sum beyond float64
        return self._result
