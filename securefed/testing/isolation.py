"""The isolation attack on active SecAgg+ (a red team's, issue 18) and the ``"coalition"`` property's check.

The server with C corrupt clients lets a victim mask only with its corrupt neighbours and chosen
honest partners W, shows the victim and W a survivor list naming W, and everyone else a list
where W dropped: W's other holders reveal each s_w, the victim's neighbours b_v, and the
victim's input comes out. The quorum of floor((n + C)/2) + 1 signatures on a list
(``Round.quorum``) stops it. :func:`isolations` finds plans by brute force over W
(:func:`predict_isolation` counts the shares), :func:`search_isolation` runs them end to end
through the real clients (:class:`IsolateVictim`), and :func:`find_leak` is what
``check_protocol``'s ``"coalition"`` property checks per round size (with
:func:`securefed.testing.coalition.search`, the split of one victim's holders).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from securefed.crypto import kex, signing
from securefed.crypto.masks import apply_masks, pairwise_signs
from securefed.errors import ConfigurationError, SecureFedError
from securefed.protocols import wire
from securefed.protocols.base import AggregationProtocol
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.packed import column_unpack
from securefed.protocols.secagg.round import Round, commitment, mask_key, self_mask_key
from securefed.testing._harness import (
    AdversarialRun,
    Delivery,
    Deviation,
    RoundContext,
    Send,
    round_spec,
    run_round,
)
from securefed.testing.coalition import (
    CoalitionReport,
    Recovery,
    applies,
    coalition_size,
    corrupt_holders_bound,
    reconstruct,
    run_plans,
    search,
    secagg_round,
)

__all__ = [
    "ISOLATION_BUDGET",
    "IsolateVictim",
    "Isolation",
    "execute_isolation",
    "find_leak",
    "isolation_plan",
    "isolations",
    "predict_isolation",
    "search_isolation",
]

#: Partner sets :func:`isolations` tries per search by default (about 1.5 s when it runs out).
ISOLATION_BUDGET = 1_000_000


# -- isolating the victim (the red team's attack on the neighbourhood-only signature rule) -----------


@dataclasses.dataclass(frozen=True)
class Isolation:
    """One isolation plan: the victim masks with its corrupt neighbours and `partners` only, and each honest
    client is shown one of `lists` (``shown``: (client, list index) pairs; honest clients not in it are shown
    nothing after the masked input).

    The template (:func:`isolation_plan`): list 0 names the victim and its partners but drops its other honest
    neighbours, whose shares it never got; it is shown to the victim and the partners, who sign it with the
    corrupt clients. List 1 names the victim and drops the partners; every other honest client is shown it.
    Holders of list 1 reveal their shares of b_v (the victim is listed) and of each partner's mask key s_w
    (the partner is dropped), the victim reveals its own b-share: with t of each the server strips every mask
    from the victim's masked input.
    """

    victim: int
    corrupt: tuple[int, ...]
    partners: tuple[int, ...]
    lists: tuple[tuple[int, ...], ...]
    shown: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        k, shown = set(self.corrupt), dict(self.shown)
        if self.victim in k or set(self.partners) & (k | {self.victim}) or set(shown) & k:
            raise ConfigurationError("the victim, its partners and the corrupt clients must be distinct; "
                                     "only honest clients are shown a list")
        if any(not 0 <= j < len(self.lists) for j in shown.values()):
            raise ConfigurationError("a client is shown a list the plan does not have")

    def __repr__(self) -> str:
        n = max([*self.corrupt, *dict(self.shown), *(u for L in self.lists for u in L)], default=-1) + 1
        dropped = [sorted(set(range(n)) - set(L)) for L in self.lists]
        return (f"Isolation(victim={self.victim}, corrupt={list(self.corrupt)}, partners={list(self.partners)}, "
                f"lists dropping {dropped})")

    def list_of(self, u: int) -> tuple[int, ...] | None:
        """The survivor list shown to honest client `u` (None: none)."""
        j = dict(self.shown).get(u)
        return None if j is None else self.lists[j]


def _nbhd(graph: MaskingGraph) -> tuple[list[int], list[int]]:
    """Bitmasks of every client's open and closed neighbourhood."""
    open_, closed = [], []
    for u in range(graph.n):
        m = sum(1 << int(w) for w in graph.neighbors(u).tolist())
        open_.append(m)
        closed.append(m | 1 << u)
    return open_, closed


def _bits(xs: Sequence[int] | set[int]) -> int:
    return sum(1 << int(x) for x in set(xs))


def isolation_plan(graph: MaskingGraph, victim: int, corrupt: Sequence[int], partners: Sequence[int]) -> Isolation:
    """The two-list template of :class:`Isolation` for `victim`, `corrupt` and `partners` (honest neighbours)."""
    n, v, k, w = graph.n, int(victim), set(map(int, corrupt)), set(map(int, partners))
    others = set(graph.neighbors(v).tolist()) - k - w  # honest neighbours whose shares the victim never gets
    with_w = tuple(u for u in range(n) if u not in others)
    without_w = tuple(u for u in range(n) if u not in w)
    shown = tuple((u, 0 if u == v or u in w else 1) for u in range(n) if u not in k)
    return Isolation(v, tuple(sorted(k)), tuple(sorted(w)), (with_w, without_w), shown)


def predict_isolation(graph: MaskingGraph, t: int, plan: Isolation, quorum: int = 0) -> tuple[int, dict[int, int]]:
    """(shares of b_v, {w: shares of s_w}) the coalition gets with `plan` in a round without dropouts.

    Mirrors the honest-client rules: the victim holds the shares of its partners and corrupt neighbours only;
    a client shown a list signs it when it is listed, holds the shares of every listed neighbour and sees t
    listed in its closed neighbourhood; it answers when t signers of its list are in its closed neighbourhood
    and at least `quorum` clients signed it in all (the corrupt clients sign every list they are on); it
    reveals, for each client it holds shares of, the b-share if that client is listed and the s-share if not.
    """
    open_, closed = _nbhd(graph)
    v, kb = plan.victim, _bits(plan.corrupt)
    lists = [_bits(L) for L in plan.lists]
    held = {u: closed[u] for u in range(graph.n)}
    held[v] = 1 << v | _bits(plan.partners) | (kb & open_[v])
    if held[v].bit_count() < t:  # the victim refuses to mask with fewer than t shares held: no list is shown
        return (kb & open_[v]).bit_count(), {w: (kb & open_[w]).bit_count() for w in plan.partners}
    shown = dict(plan.shown)
    signers = [L & kb for L in lists]
    for u, j in shown.items():
        L = lists[j]
        if L >> u & 1 and not (L & closed[u]) & ~held[u] and (L & closed[u]).bit_count() >= t:
            signers[j] |= 1 << u
    answered = {u: j for u, j in shown.items() if signers[j] >> u & 1
                and (signers[j] & closed[u]).bit_count() >= t and signers[j].bit_count() >= quorum}
    b = (kb & open_[v]).bit_count() + sum(1 for u, j in answered.items() if closed[v] >> u & 1 and lists[j] >> v & 1)
    s = {w: (kb & open_[w]).bit_count()
         + sum(1 for u, j in answered.items() if held[u] >> w & 1 and u != w and not lists[j] >> w & 1)
         for w in plan.partners}
    return b, s


def isolations(graph: MaskingGraph, t: int, corrupt: int, *, victims: Sequence[int] | None = None,
               corrupt_sets: Sequence[Sequence[int]] | None = None, quorum: int = 0,
               max_corrupt_holders: int | None = None, budget: int | None = ISOLATION_BUDGET,
               stats: dict[str, int] | None = None) -> Iterator[Isolation]:
    """The template plans (:func:`isolation_plan`) with which the coalition gets t shares of b_v and of every s_w.

    For each corrupt set (default: clients 0..C-1, chosen before the graph is drawn, then, when
    `victims` is given, sets of min(C, bound) neighbours of each victim), each victim (default: every
    honest client), and each set of partners among the victim's honest neighbours, smallest first
    (the victim needs t - 1 - c of them to reach t held shares and t signers). A brute force over
    2^(honest neighbours) partner sets per victim: cheap for the degrees of SecAgg+ at small n.
    `quorum`: the signatures a list needs over the whole round (0: the neighbourhood rule alone).
    Plans whose victim or partner has more than `max_corrupt_holders` corrupt neighbours are skipped.
    Partner sets are grown depth first and cut as soon as a partner has too few holders left for s_w;
    at most `budget` sets are tried in all (None: no limit): exhaustive for the default parameters up to
    n = 60 or so well within it, a bounded sample beyond. `stats`, if given, receives ``tried`` and
    ``complete`` (1 when the enumeration finished within the budget).
    """
    stats = {} if stats is None else stats
    stats.update(tried=0, complete=0)
    n = graph.n
    c = min(int(corrupt), n - 1)
    pairs: list[tuple[tuple[int, ...], int]] = []
    if corrupt_sets is None:
        base = tuple(range(c))
        pairs += [(base, v) for v in (victims if victims is not None else range(n)) if v not in base]
        if victims is not None:
            size = min(c, graph.degree, c if max_corrupt_holders is None else max_corrupt_holders)
            for v in victims:
                pairs += [(ks, v) for ks in itertools.combinations(graph.neighbors(v).tolist(), size) if ks != base]
    else:
        for ks in corrupt_sets:
            ks = tuple(sorted(map(int, ks)))
            pairs += [(ks, v) for v in (victims if victims is not None else range(n)) if v not in ks]
    open_, closed = _nbhd(graph)
    everyone = (1 << n) - 1
    for ks, v in pairs:
        kb = _bits(ks)
        cv = (kb & open_[v]).bit_count()
        if max_corrupt_holders is not None and cv > max_corrupt_holders:
            continue
        honest = [u for u in graph.neighbors(v).tolist() if u not in ks]
        # s_w's holders that can answer list 1: its corrupt neighbours and its honest ones but v and the partners
        room = {w: (kb & open_[w]).bit_count() + (open_[w] & ~kb & ~(1 << v)).bit_count() for w in honest}
        if max_corrupt_holders is not None:
            honest = [u for u in honest if (kb & open_[u]).bit_count() <= max_corrupt_holders]
        # a partner with more than room - t partners among its neighbours has fewer than t holders left for s_w
        cap = {u: room[u] - t for u in honest}
        for w in _partner_sets([u for u in honest if cap[u] >= 0], open_, cap, max(0, t - 1 - cv), stats, budget):
            if _template_leaks(open_, closed, t, v, kb, _bits(w), everyone, quorum):
                yield isolation_plan(graph, v, ks, w)
    if budget is None or stats["tried"] < budget:
        stats["complete"] = 1


def _partner_sets(pool: list[int], open_: list[int], cap: dict[int, int], least: int, stats: dict[str, int],
                  budget: int | None) -> Iterator[tuple[int, ...]]:
    """The subsets of `pool` with at least `least` members, each with at most cap[u] neighbours in the subset
    (depth first; a member over its cap stays over it as the subset grows, so the branch is cut). Counts the
    sets tried in ``stats["tried"]`` and stops at `budget`."""
    def grow(start: int, chosen: list[int], wb: int) -> Iterator[tuple[int, ...]]:
        if len(chosen) >= least:
            yield tuple(chosen)
        for i in range(start, len(pool)):
            if len(chosen) + len(pool) - i < least:
                return
            if budget is not None and stats["tried"] >= budget:
                return
            stats["tried"] += 1
            u = pool[i]
            grown = wb | 1 << u
            if all((open_[x] & grown).bit_count() <= cap[x] for x in (*chosen, u)):
                chosen.append(u)
                yield from grow(i + 1, chosen, grown)
                chosen.pop()
    yield from grow(0, [], 0)


def _template_leaks(open_: list[int], closed: list[int], t: int, v: int, kb: int, wb: int, everyone: int,
                    quorum: int) -> bool:
    """:func:`predict_isolation` of :func:`isolation_plan` on bitmasks: t shares of b_v and of every s_w."""
    held_v = 1 << v | wb | (kb & open_[v])
    if held_v.bit_count() < t:
        return False
    lists = (everyone & ~(open_[v] & ~kb & ~wb), everyone & ~wb)
    group0 = 1 << v | wb
    signers = [lists[0] & kb, lists[1] & kb]
    for u in range(len(open_)):
        if kb >> u & 1:
            continue
        j = 0 if group0 >> u & 1 else 1
        L, held = lists[j], (held_v if u == v else closed[u])
        if L >> u & 1 and not (L & closed[u]) & ~held and (L & closed[u]).bit_count() >= t:
            signers[j] |= 1 << u
    ok = [sig.bit_count() >= quorum for sig in signers]
    answered = [0, 0]
    for j in (0, 1):
        if not ok[j]:
            continue
        for u in range(len(open_)):
            if signers[j] >> u & 1 and not kb >> u & 1 and (signers[j] & closed[u]).bit_count() >= t:
                answered[j] |= 1 << u
    b = (kb & open_[v]).bit_count() + ((answered[0] | answered[1]) & closed[v]).bit_count()
    if b < t:
        return False
    # s_w: list 1 drops w (its holders reveal s-shares); list 0 lists it (the victim and the partners reveal b_w)
    return all((kb & open_[w]).bit_count() + (answered[1] & open_[w]).bit_count() >= t
               for w in range(len(open_)) if wb >> w & 1)


class IsolateVictim(Deviation):
    """The server and the `corrupt` clients isolate `victim`: it masks with its corrupt neighbours and `partners`
    only, and two survivor lists split the honest clients (:class:`Isolation`; the red team's attack on active
    SecAgg+ at n = 12-20 and 31-40, where each client counted signatures from its own neighbourhood only).

    `lists`, `shown`: an explicit plan; None: :func:`isolation_plan` on the round's graph. The corrupt clients
    (run the round with ``run_round(..., corrupt=...)``) sign every list they are on with their signing keys.
    Each honest client shown a list gets, with it, every signature on it (the round's `quorum` field present)
    or those from its closed neighbourhood (older rounds). :meth:`recover` reconstructs b_v and each partner's
    s_w from the revealed and the corrupt clients' held shares, checks them against the victim's commitment and
    the advertised keys, strips every mask from the victim's masked input and returns its input.
    """

    name = "isolate_victim"

    def __init__(self, victim: int, corrupt: Sequence[int], partners: Sequence[int],
                 lists: Sequence[Sequence[int]] | None = None, shown: Sequence[tuple[int, int]] | None = None) -> None:
        self.victim, self.corrupt = int(victim), tuple(sorted(map(int, corrupt)))
        self.partners = tuple(sorted(map(int, partners)))
        self.plan: Isolation | None = None if lists is None else Isolation(
            self.victim, self.corrupt, self.partners, tuple(tuple(sorted(L)) for L in lists),
            tuple(sorted((int(u), int(j)) for u, j in (shown or ()))))
        self._ctx: RoundContext | None = None
        self._keys: dict[int, bytes] = {}
        self._victim: dict[str, Any] = {}
        self._bitmaps: list[bytes] = []
        self._sigs: list[dict[int, bytes]] = []
        self._replies: dict[int, dict[int, bytes]] = {}  # honest client -> {peer: revealed share}

    @classmethod
    def from_plan(cls, plan: Isolation) -> IsolateVictim:
        """The deviation that carries out `plan`."""
        return cls(plan.victim, plan.corrupt, plan.partners, plan.lists, plan.shown)

    def __repr__(self) -> str:
        return f"IsolateVictim(victim={self.victim}, corrupt={list(self.corrupt)}, partners={list(self.partners)})"

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        self._ctx = ctx
        r = secagg_round(ctx)
        if self.plan is None:
            self.plan = isolation_plan(r.graph, self.victim, self.corrupt, self.partners)
        if phase == "masked_input":
            keep = set(self.partners) | set(self.corrupt)
            out = []
            for s in sends:
                if s.party == self.victim:
                    ids, rows = W.parse_records(ctx.body(phase, s.request), W.SEALED)
                    recs = [(int(u), rows[j].tobytes()) for j, u in enumerate(ids.tolist()) if u in keep]
                    s = Send(s.party, ctx.message(phase, W.records(recs)), label=self.name)
                out.append(s)
            return out
        if phase == "consistency_check":
            if "masked" not in self._victim:
                return []  # no masked input of the victim: nothing to unmask
            self._bitmaps = [W.bitmap(sorted(L), ctx.spec.n) for L in self.plan.lists]
            self._sigs = [{} for _ in self.plan.lists]
            return [Send(u, ctx.message(phase, self._bitmaps[j]), forward=False, label=self.name)
                    for u, j in self.plan.shown]
        if phase == "unmasking":
            return self._unmasking(ctx, r)
        return sends

    def _unmasking(self, ctx: RoundContext, r: Round) -> list[Send]:
        if not self._bitmaps or self.plan is None:
            return []
        for j, L in enumerate(self.plan.lists):  # the coalition signs every list its clients are on
            for w in set(self.corrupt) & set(L):
                key = r.identities.signing_key(w)  # type: ignore[union-attr]
                self._sigs[j][w] = signing.sign(key, r.context() + self._bitmaps[j], purpose="secagg/survivors")
        every = getattr(r, "quorum", None) is not None
        out = []
        for u, j in self.plan.shown:
            if u not in self._sigs[j]:
                continue  # it refused to sign: it would refuse to unmask
            nb = set(r.graph.closed_neighborhood(u).tolist())
            sigs = sorted((w, s) for w, s in self._sigs[j].items() if every or w in nb)
            out.append(Send(u, ctx.message("unmasking", W.records(sigs, prefix=self._bitmaps[j])), forward=False,
                            label=self.name))
        return out

    def observe(self, delivery: Delivery) -> None:
        d, v = delivery, self.victim
        if d.reply is None:
            return
        body = wire.body(d.reply)
        if d.phase == "advertise_keys":
            self._keys[int(d.party)] = bytes(body[W.KEY : 2 * W.KEY])
        elif d.phase == "share_keys" and d.party == v:
            self._victim["commitment"] = bytes(body[: W.COMMIT])
        elif d.phase == "masked_input" and d.party == v:
            self._victim["masked"] = bytes(body)
            self._victim["peers"] = W.parse_records(memoryview(wire.body(d.request)), W.SEALED)[0].tolist()
        elif d.phase == "consistency_check" and d.label == self.name and self.plan is not None:
            self._sigs[dict(self.plan.shown)[int(d.party)]][int(d.party)] = bytes(body)
        elif d.phase == "unmasking" and d.label == self.name:
            ids, rows = W.parse_records(memoryview(body), W.SHARE)
            self._replies[int(d.party)] = {int(u): rows[i].tobytes() for i, u in enumerate(ids.tolist())}

    def _shares(self, run: AdversarialRun, u: int, b_share: bool) -> dict[int, bytes]:
        """The shares of u's b (or of its mask key) that the coalition holds: revealed, and its clients' own."""
        assert self.plan is not None
        out = {h: rep[u] for h, rep in self._replies.items()
               if u in rep and (u in self.plan.list_of(h)) == b_share}  # type: ignore[operator]
        for w in self.corrupt:
            held = getattr(getattr(run.clients.get(w), "data", None), "held", {})
            if u in held:
                out[w] = held[u][: W.SHARE] if b_share else held[u][W.SHARE :]
        return out

    def recover(self, run: AdversarialRun) -> Recovery:
        """Reconstruct b_v and every partner's s_w, check them, and unmask the victim's input (:class:`Recovery`;
        ``s_shares``: the fewest shares of any partner's key)."""
        ctx = self._ctx
        if ctx is None or ctx.round is None or self.plan is None:
            return Recovery(0, 0, 0, False, False, None, "the deviation never ran")
        r, v = secagg_round(ctx), self.victim
        t = r.t
        b_from = self._shares(run, v, True)
        b = reconstruct(b_from, t)
        b_ok = b is not None and commitment(r, v, b) == self._victim.get("commitment")
        sks: dict[int, bytes] = {}
        counts = {}
        for w in self.partners:
            s_from = self._shares(run, w, False)
            counts[w] = len(s_from)
            s = reconstruct(s_from, t)
            if s is not None and w in self._keys and kex.public_bytes(kex.load_private_key(s)) == self._keys[w]:
                sks[w] = s
        s_ok = len(sks) == len(self.partners)
        least = min(counts.values(), default=t)
        detail = (f"{len(b_from)} shares of b_{v} and " + ", ".join(f"{x} of s_{w}" for w, x in counts.items())
                  + f" (t = {t})")
        if not (b_ok and s_ok) or "masked" not in self._victim:
            return Recovery(len(b_from), least, t, b_ok, s_ok, None, detail)
        keys = []
        for u in self._victim["peers"]:
            if u in self.corrupt:  # the mask key the corrupt neighbour agreed with the victim
                keys.append(run.clients[u].data.peers[v][1])  # type: ignore[attr-defined]
            else:
                keys.append(mask_key(r, kex.load_private_key(sks[u]), self._keys[v], u, v))
        add, sub = pairwise_signs(v, self._victim["peers"], keys)
        add.append(self_mask_key(r, v, b))  # type: ignore[arg-type]
        y = np.ascontiguousarray(column_unpack(self._victim["masked"], r.width, ctx.spec.dim))
        apply_masks(y, add=sub, subtract=add)  # the victim added `add` and subtracted `sub`
        if r.width < 8 * y.itemsize:
            y &= y.dtype.type((1 << r.width) - 1)
        x = np.asarray(r.encoder.decode(y, n=ctx.spec.n, count=1), dtype=np.float64)
        return Recovery(len(b_from), least, t, True, True, x, detail + ": every secret checked, input unmasked")

    def violation(self, run: AdversarialRun) -> str | None:
        rec = self.recover(run)
        if rec.input is None:
            return None
        return f"the coalition {self!r} got {rec.detail}: client {self.victim}'s input is {rec.input!r}"


def execute_isolation(protocol: AggregationProtocol, inputs: Sequence[np.ndarray], plan: Isolation, *,
                      seed: int = 0) -> Recovery:
    """Run `plan` end to end (real clients, :class:`IsolateVictim`) and return what it recovered."""
    dev = IsolateVictim.from_plan(plan)
    try:
        run = run_round(protocol, list(inputs), [dev], seed=seed, corrupt=plan.corrupt)
    except SecureFedError as e:
        return Recovery(0, 0, 0, False, False, None, f"the round raised {type(e).__name__}: {e}")
    return dev.recover(run)


def search_isolation(protocol_factory: Callable[[], AggregationProtocol], n: int, *, seed: int = 0, dim: int = 4,
                     runs: int = 1, victims: Sequence[int] | None = None,
                     corrupt_sets: Sequence[Sequence[int]] | None = None,
                     budget: int | None = ISOLATION_BUDGET) -> CoalitionReport:
    """Search a round of n for an isolation plan (:func:`isolations`) and run up to `runs` end to end.

    The plans are those the neighbourhood rule lets through (``quorum=0``): against a protocol whose clients
    also demand a quorum of signatures, they are run all the same and must be refused. ``candidates``: the
    plans found (the search stops at `runs`, one per victim and corrupt set). Corrupt clients: 0..C-1,
    chosen before the graph (see :func:`isolations`); graph-aware sets within :func:`corrupt_holders_bound`
    when `victims` is given. ``exhaustive`` in the report: the enumeration finished within `budget` partner
    sets (else it stopped there: no plan found is then no proof that none exists).
    """
    t0 = time.perf_counter()
    protocol = protocol_factory()
    if not applies(protocol) or not protocol.threat_model.active:  # type: ignore[attr-defined]
        raise ConfigurationError("the isolation search needs an active protocol of the SecAgg family")
    spec = round_spec(n, dim, seed)
    rnd = secagg_round(RoundContext(protocol, spec))
    graph, t, c = rnd.graph, rnd.t, coalition_size(protocol, n)
    bound = corrupt_holders_bound(n, graph.degree, c, int(protocol.describe(n).get("statistical_security_bits", 40)))
    chosen: list[Isolation] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    found, stats = 0, dict[str, int]()
    for plan in isolations(graph, t, c, victims=victims, corrupt_sets=corrupt_sets, budget=budget, stats=stats,
                           max_corrupt_holders=None if victims is None and corrupt_sets is None else bound):
        found += 1
        if (plan.victim, plan.corrupt) not in seen:
            chosen.append(plan)
            seen.add((plan.victim, plan.corrupt))
        if len(chosen) >= runs:
            break
    report = CoalitionReport(protocol.name, n, t, graph.degree, c, bool(stats.get("complete")), found, [], None,
                             seed, 0.0)
    return run_plans(report, protocol_factory, chosen, execute_isolation, dim=dim, started=t0)


def find_leak(protocol_factory: Callable[[], AggregationProtocol], n: int, *, dim: int = 4,
              runs: int = 1) -> tuple[str, str] | None:
    """What the ``"coalition"`` property checks in a round of n: None, or (violation, note).

    Active protocols: :func:`search` with seed n, up to `runs` plans end to end, then
    :func:`search_isolation` (one plan end to end: corrupt clients 0..C-1, every victim, the partner sets
    the neighbourhood rule lets through). Semi-honest ones follow the protocol, so the coalition only
    pools shares: it needs t corrupt holders of one client's shares (at most
    :func:`corrupt_holders_bound` of them).
    """
    protocol = protocol_factory()
    if not protocol.threat_model.active:  # type: ignore[attr-defined]
        t = protocol.parameters(n).threshold  # type: ignore[attr-defined]
        bits = int(protocol.describe(n).get("statistical_security_bits", 40))
        c = corrupt_holders_bound(n, protocol.parameters(n).degree,  # type: ignore[attr-defined]
                                  coalition_size(protocol, n), bits)
        return None if c < t else ((f"n={n}: {c} corrupt neighbours of a client hold t = {t} shares of its "
                                    "secrets (semi-honest needs t > corrupt holders)"), "")
    report = search(protocol_factory, n, seed=n, dim=dim, runs=runs)
    if report.leak is None:
        report = search_isolation(protocol_factory, n, seed=n, dim=dim, runs=1)
    if report.leak is None:
        return None
    plan, rec, err = report.leak
    return ((f"n={n}: the server with {report.corrupt} corrupt clients {list(plan.corrupt)} unmasked client "
             f"{plan.victim}'s input (max error {err:.3g} from the true input): {rec.detail}"),
            f"{plan!r}, seed={n}, dim={dim} ({report.summary()})")
