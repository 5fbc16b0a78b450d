"""The server with up to C corrupt clients (a coalition) against SecAgg / SecAgg+ (issue 18).

A malicious server that controls C = ``threat_model.corrupt(n)`` clients reads their state
(the shares they hold, their signing keys) and writes their messages. Against the active
variant it can show the victim's honest holders two different survivor lists in the
consistency check (:class:`SplitSurvivorLists`): group A a list with the victim, group B one
without it. The corrupt clients sign both lists, so each honest client sees valid
signatures on its own list; group A (and the victim itself) then reveal their shares of
b_v, group B their shares of the victim's mask key s_v, and the corrupt holders give both.
With t shares of each the server checks b_v against the victim's commitment and s_v against
its advertised public key, strips every mask from the victim's masked input and reads its
input. The threshold rule must make this impossible: a client's secrets have k + 1 holders
(itself included), so it needs 2t > k + 1 + c for c corrupt holders.

:func:`splits` enumerates the plans that the client rules let through on a round's graph
(every victim, every corrupt set of size C and every labelling of the honest clients whose
signatures matter, for n <= 12; the victim's neighbourhood for larger rounds, see
:func:`splits`); :func:`search` runs the first ones end to end with the real clients and
reports a leak only when the recovered vector equals the victim's true input.

:class:`IsolateVictim` is the red team's attack on clients that count survivor-list signatures
from their own neighbourhood only (active SecAgg+ at n = 12-20 and 31-40 before the quorum): the
server forwards the victim the shares of its corrupt neighbours and of a few honest partners W
only, so it masks with them alone; the victim and W sign a list that names them, every other
honest client a list that drops W. The victim reveals its b-share, the others their shares of b_v
and of each s_w, and the server strips every mask from the victim's input. :func:`isolations`
finds such plans by brute force over W (:func:`predict_isolation` counts the shares);
:func:`search_isolation` runs them end to end. The quorum of floor((n + C)/2) + 1 signatures on a
list (``Round.quorum``) stops it: the victim's list carries too few.

The isolation attack lives in :mod:`securefed.testing.isolation`; ``securefed.testing.check_protocol``
runs :func:`search`, then :func:`~securefed.testing.isolation.search_isolation`, as the property
``"coalition"`` (:func:`securefed.testing.isolation.find_leak`).

Usage::

    report = search(lambda: SecAggPlus(adversary="active"), n=10)
    assert report.leak is None
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from securefed.crypto import kex, shamir, signing
from securefed.crypto.masks import apply_masks, pairwise_signs
from securefed.errors import ConfigurationError, MessageRejected, SecureFedError
from securefed.protocols import wire
from securefed.protocols.base import AggregationProtocol
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.packed import column_unpack
from securefed.protocols.secagg.round import (
    SECRET_BYTES,
    Round,
    commitment,
    mask_key,
    self_mask_key,
)
from securefed.testing._harness import (
    AdversarialRun,
    Delivery,
    Deviation,
    RoundContext,
    Send,
    round_spec,
    run_round,
)

__all__ = [
    "EXHAUSTIVE_MAX_N",
    "CoalitionReport",
    "Recovery",
    "Split",
    "SplitSurvivorLists",
    "applies",
    "coalition_size",
    "corrupt_holders_bound",
    "execute",
    "predict",
    "random_inputs",
    "reconstruct",
    "run_plans",
    "search",
    "secagg_round",
    "splits",
]

#: Rounds up to this size are searched exhaustively (every victim and corrupt set).
EXHAUSTIVE_MAX_N = 12
#: Labellings tried per (victim, corrupt set): all of them up to 2^18, a fixed sample of 2^18 beyond.
_MAX_LABEL_BITS = 18


@dataclasses.dataclass(frozen=True)
class Split:
    """One plan: the victim, the corrupt clients, and the honest clients shown each survivor list.

    ``group_a`` (the victim included) is shown the list with the victim, ``group_b`` the list
    without it; honest clients in neither group are shown nothing after the masked input.
    """

    victim: int
    corrupt: tuple[int, ...]
    group_a: tuple[int, ...]
    group_b: tuple[int, ...]

    def __post_init__(self) -> None:
        a, b, k = set(self.group_a), set(self.group_b), set(self.corrupt)
        if self.victim not in a or a & b or (a | b) & k:
            raise ConfigurationError("the victim must be in group_a; groups and corrupt clients must be disjoint")


def applies(protocol: AggregationProtocol) -> bool:
    """Whether the coalition search knows `protocol`: the SecAgg family (a masking graph and a threat model)."""
    return callable(getattr(protocol, "_round", None)) and hasattr(protocol, "threat_model") \
        and callable(getattr(protocol, "parameters", None))


def coalition_size(protocol: AggregationProtocol, n: int) -> int:
    """C = ``protocol.threat_model.corrupt(n)``: the corrupt clients the protocol's threat model allows."""
    return int(protocol.threat_model.corrupt(n))  # type: ignore[attr-defined]


def corrupt_holders_bound(n: int, degree: int, corrupt: int, security_bits: int = 40) -> int:
    """The most corrupt neighbours a client has in the threat model: C on the complete graph; on a random
    graph of `degree` drawn independently of which `corrupt` clients are corrupt (Bell et al. 2020), the
    smallest x with P(X > x) <= 2^-(security_bits + 1) / n, X ~ Hypergeometric(n - 1, C, degree).

    Recomputed here exactly (integers) from the published rule, not from the protocol's code.
    """
    if degree >= n - 1:
        return min(corrupt, n - 1)
    top = min(corrupt, degree)
    total, tail = math.comb(n - 1, degree), 0  # tail = P(X > x) * total
    for x in range(top, -1, -1):
        if tail * n * 2 ** (security_bits + 1) > total:
            return x + 1
        tail += math.comb(corrupt, x) * math.comb(n - 1 - corrupt, degree - x)
    return 0


# -- which plans the client rules let through -------------------------------------------------------


def predict(graph: MaskingGraph, t: int, split: Split, quorum: int = 0) -> tuple[int, int]:
    """(shares of b_v, shares of s_v) the coalition gets with `split` in a round without dropouts.

    Mirrors the honest-client rules: a client shown list X signs it when its closed neighbourhood
    holds t members of X, and answers when it also holds t signers of X (honest clients shown X,
    and the corrupt clients, who sign both) and X has at least `quorum` signers in all (the round's
    ``quorum``; 0: the neighbourhood rule alone); the victim reveals its own b-share; each corrupt
    holder gives both shares.
    """
    v, k = split.victim, set(split.corrupt)
    signers = {True: set(split.group_a) | k, False: (set(split.group_b) | k) - {v}}
    for side, group in ((True, split.group_a), (False, split.group_b)):
        for u in group:  # who signs: t listed in its closed neighbourhood
            nb = set(graph.closed_neighborhood(u).tolist())
            if (len(nb) if side else len(nb - {v})) < t:
                signers[side].discard(u)
    corrupt_holders = len(k & set(graph.neighbors(v).tolist()))
    got = {True: corrupt_holders, False: corrupt_holders}
    for side, group in ((True, split.group_a), (False, split.group_b)):
        if len(signers[side]) < quorum:
            continue
        for u in group:
            nb = set(graph.closed_neighborhood(u).tolist())
            listed = len(nb) if side else len(nb - {v})
            if v in nb and listed >= t and len(nb & signers[side]) >= t:
                got[side] += 1
    return got[True], got[False]


def splits(graph: MaskingGraph, t: int, corrupt: int, *, exhaustive: bool | None = None,
           victims: Sequence[int] | None = None, max_corrupt_holders: int | None = None) -> Iterator[Split]:
    """The plans with which the coalition would get t shares of both secrets of one client (:func:`predict`).

    `corrupt`: C. Exhaustive (default for n <= :data:`EXHAUSTIVE_MAX_N`): every victim, every
    corrupt set of size C, every labelling of the honest clients within distance 2 of the victim
    (the others' signatures reach no holder of its shares). Targeted (larger rounds): the
    victims given (default: client 0; the graphs are vertex-transitive, so one stands for all),
    corrupt sets of the victim's neighbours (as many as allowed), labellings exhaustive up to 2^18
    (a fixed sample above).
    A (victim, corrupt set) is skipped when its c corrupt holders exceed `max_corrupt_holders`
    (None: no bound; :func:`search` passes :func:`corrupt_holders_bound`, so that a graph-aware
    choice of corrupt clients stays within the threat model) or when 2t > k + 1 + c: its
    k + 1 - c honest holders reveal one share each, too few for both secrets.
    """
    n, k = graph.n, graph.degree
    exhaustive = n <= EXHAUSTIVE_MAX_N if exhaustive is None else exhaustive
    most = min(corrupt, k, k if max_corrupt_holders is None else max_corrupt_holders)
    if 2 * t > k + 1 + most:  # no corrupt set can do it: skip the enumeration
        return
    for v in (range(n) if victims is None and exhaustive else victims or [0]):
        nbrs = graph.neighbors(v).tolist()
        pool = [u for u in range(n) if u != v] if exhaustive else nbrs
        size = min(corrupt, len(pool)) if exhaustive else most  # (targeted: corrupt holders only)
        for ks in itertools.combinations(pool, size):
            c = len(set(ks) & set(nbrs))
            if 2 * t > k + 1 + c or (max_corrupt_holders is not None and c > max_corrupt_holders):
                continue
            yield from _labellings(graph, t, v, ks)


def _labellings(graph: MaskingGraph, t: int, v: int, corrupt: tuple[int, ...]) -> Iterator[Split]:
    """The feasible labellings for victim `v` and corrupt set `corrupt`, vectorized over labellings."""
    k = set(corrupt)
    holders = [u for u in graph.closed_neighborhood(v).tolist() if u not in k]
    near = sorted({w for u in holders for w in graph.closed_neighborhood(u).tolist()} - k - {v} - set(holders))
    reach = sorted([u for u in holders if u != v] + near[: max(0, 62 - len(holders))])  # labels are 64-bit
    if graph.complete:  # every honest client is alike: only how many are in group A matters
        labels = np.array([(1 << a) - 1 for a in range(len(reach) + 1)], dtype=np.uint64)
    elif len(reach) <= _MAX_LABEL_BITS:
        labels = np.arange(1 << len(reach), dtype=np.uint64)
    else:
        gen = np.random.default_rng(v)  # a fixed sample (test data, not a secret)
        labels = gen.integers(0, 1 << len(reach), 1 << _MAX_LABEL_BITS, dtype=np.uint64)
    bit = {w: j for j, w in enumerate(reach)}
    c = len(k & set(graph.neighbors(v).tolist()))
    got_a, got_b = np.full(labels.size, c), np.full(labels.size, c)
    for u in holders:
        nb = graph.closed_neighborhood(u).tolist()
        mask = np.uint64(sum(1 << bit[w] for w in nb if w in bit))
        fixed = len(k.intersection(nb))
        sig_a = np.bitwise_count(labels & mask) + fixed + 1  # + the victim, in group A and in nb
        if u == v:
            got_a += sig_a >= t
            continue
        sig_b = np.bitwise_count(~labels & mask) + fixed
        in_a = ((labels >> np.uint64(bit[u])) & np.uint64(1)).astype(bool)
        got_a += in_a & (sig_a >= t) & (len(nb) >= t)
        got_b += ~in_a & (sig_b >= t) & (len(nb) - 1 >= t)
    for label in labels[(got_a >= t) & (got_b >= t)].tolist():
        a = tuple(sorted([v, *(w for w in reach if label >> bit[w] & 1)]))
        b = tuple(w for w in reach if not label >> bit[w] & 1)
        yield Split(v, tuple(corrupt), a, b)


# -- the deviation ------------------------------------------------------------------------------------


def secagg_round(ctx: RoundContext) -> Round:
    if not isinstance(ctx.round, Round):
        raise ConfigurationError(f"{ctx.protocol!r} is not of the SecAgg family: no coalition plan applies")
    return ctx.round


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What the coalition got from one run: shares of each secret, the checks, and the input if unmasked."""

    b_shares: int
    s_shares: int
    t: int
    b_valid: bool
    s_valid: bool
    input: np.ndarray | None
    detail: str

    @property
    def both_secrets(self) -> bool:
        """Whether b_v and s_v were both reconstructed and passed the server's checks."""
        return self.b_valid and self.s_valid


class SplitSurvivorLists(Deviation):
    """The server and the `corrupt` clients show two groups of the victim's holders two survivor lists.

    Active SecAgg / SecAgg+: group A (the victim included) signs and is shown the list of every
    client that sent a masked input, group B the same list without the victim; the corrupt
    clients (run the round with ``run_round(..., corrupt=...)``) sign both with their signing
    keys, and each honest client is shown its own list with every signature on it from its
    neighbourhood. :meth:`recover` reconstructs b_v and s_v from the revealed shares and the
    corrupt clients' held shares, checks them as the server does (commitment, public key) and
    unmasks the victim's masked input. :meth:`violation` reports the unmasked input.
    """

    name = "split_survivor_lists"

    def __init__(self, victim: int, corrupt: Sequence[int], group_a: Sequence[int],
                 group_b: Sequence[int]) -> None:
        self.split = Split(int(victim), tuple(sorted(corrupt)), tuple(sorted({*group_a, victim})),
                           tuple(sorted(group_b)))
        self._ctx: RoundContext | None = None
        self._keys: dict[int, bytes] = {}  # s_pk of every client that advertised
        self._victim: dict[str, bytes] = {}  # the victim's commitment, masked input, and the share list it got
        self._lists: dict[bool, bytes] = {}
        self._sigs: dict[bool, dict[int, bytes]] = {True: {}, False: {}}
        self._survivors: list[int] = []
        self._revealed: dict[bool, dict[int, bytes]] = {True: {}, False: {}}  # holder -> share of v
        self._held: dict[int, bytes] = {}  # corrupt holder -> b-share || sk-share of v

    @classmethod
    def from_split(cls, split: Split) -> SplitSurvivorLists:
        """The deviation that carries out `split`."""
        return cls(split.victim, split.corrupt, split.group_a, split.group_b)

    def __repr__(self) -> str:
        s = self.split
        return (f"SplitSurvivorLists(victim={s.victim}, corrupt={list(s.corrupt)}, group_a={list(s.group_a)}, "
                f"group_b={list(s.group_b)})")

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        self._ctx = ctx
        if phase == "consistency_check":
            return self._consistency(ctx)
        if phase == "unmasking":
            return self._unmasking(ctx)
        return sends

    def _consistency(self, ctx: RoundContext) -> list[Send]:
        v, n = self.split.victim, ctx.spec.n
        if v not in self._survivors:
            return []  # no masked input of the victim: nothing to unmask
        self._lists = {True: W.bitmap(self._survivors, n),
                       False: W.bitmap([u for u in self._survivors if u != v], n)}
        shown = [(u, True) for u in self.split.group_a] + [(u, False) for u in self.split.group_b]
        return [Send(u, ctx.message("consistency_check", self._lists[side]), forward=False, label=self.name)
                for u, side in sorted(shown) if u in self._survivors]

    def _unmasking(self, ctx: RoundContext) -> list[Send]:
        if not self._lists:
            return []
        r, v = secagg_round(ctx), self.split.victim
        for w, client in ctx.corrupt.items():  # the coalition reads what its clients hold, and signs for them
            held = getattr(getattr(client, "data", None), "held", {})
            if v in held:
                self._held[int(w)] = held[v]
            if w in self._survivors:
                key = client.round.identities.signing_key(w)  # type: ignore[attr-defined]
                for side, listed in self._lists.items():
                    if w != v:
                        self._sigs[side][int(w)] = signing.sign(key, r.context() + listed, purpose="secagg/survivors")
        out = []
        every = getattr(r, "quorum", None) is not None  # rounds with a quorum: every signature on the list
        for side in (True, False):
            honest = [u for u in self._sigs[side] if u not in ctx.corrupt]
            for u in sorted(honest):
                nb = r.graph.closed_neighborhood(u).tolist()
                sigs = sorted((w, s) for w, s in self._sigs[side].items() if every or w in nb)
                body = W.records(sigs, prefix=self._lists[side])
                out.append(Send(u, ctx.message("unmasking", body), forward=False, label=self.name))
        return out

    def observe(self, delivery: Delivery) -> None:
        d, v = delivery, self.split.victim
        if d.reply is None:
            return
        body = wire.body(d.reply)
        if d.phase == "advertise_keys":
            self._keys[int(d.party)] = body[W.KEY : 2 * W.KEY]
        elif d.phase == "share_keys" and d.party == v:
            self._victim["commitment"] = body[: W.COMMIT]
        elif d.phase == "masked_input":
            self._survivors = sorted({*self._survivors, int(d.party)})
            if d.party == v:
                self._victim["masked"], self._victim["shares_in"] = body, wire.body(d.request)
        elif d.phase == "consistency_check" and d.label == self.name:
            self._sigs[int(d.party) in self.split.group_a][int(d.party)] = body
        elif d.phase == "unmasking" and d.label == self.name:
            ids, rows = W.parse_records(memoryview(body), W.SHARE)
            hit = np.flatnonzero(ids == v)
            if hit.size:
                self._revealed[int(d.party) in self.split.group_a][int(d.party)] = rows[hit[0]].tobytes()

    def recover(self, run: AdversarialRun) -> Recovery:
        """Reconstruct b_v and s_v, check them, and unmask the victim's input (:class:`Recovery`)."""
        ctx = self._ctx
        t = ctx.round.t if ctx is not None and ctx.round is not None else 0
        b_from = {**self._revealed[True], **{w: s[: W.SHARE] for w, s in self._held.items()}}
        s_from = {**self._revealed[False], **{w: s[W.SHARE :] for w, s in self._held.items()}}
        b = reconstruct(b_from, t)
        s = reconstruct(s_from, t)
        if ctx is None or not t:
            return Recovery(len(b_from), len(s_from), t, False, False, None, "the deviation never ran")
        v, r = self.split.victim, secagg_round(ctx)
        b_ok = b is not None and commitment(r, v, b) == self._victim.get("commitment")
        s_ok = s is not None and v in self._keys and \
            kex.public_bytes(kex.load_private_key(s)) == self._keys[v]
        counts = f"{len(b_from)} shares of b_{v} and {len(s_from)} of s_{v} (t = {t})"
        if not (b_ok and s_ok) or "masked" not in self._victim:
            return Recovery(len(b_from), len(s_from), t, b_ok, s_ok, None, counts)
        x = self._unmask(ctx, b, s)  # type: ignore[arg-type]
        return Recovery(len(b_from), len(s_from), t, True, True, x, counts + ": both secrets checked, input unmasked")

    def _unmask(self, ctx: RoundContext, b: bytes, s_sk: bytes) -> np.ndarray:
        """The victim's input: its masked vector minus its self mask and every pairwise mask."""
        r, v = secagg_round(ctx), self.split.victim
        peers, _ = W.parse_records(memoryview(self._victim["shares_in"]), W.SEALED)
        sk = kex.load_private_key(s_sk)
        keys = [mask_key(r, sk, self._keys[u], v, u) for u in peers.tolist()]
        add, sub = pairwise_signs(v, peers.tolist(), keys)
        add.append(self_mask_key(r, v, b))
        y = np.ascontiguousarray(column_unpack(self._victim["masked"], r.width, ctx.spec.dim))
        apply_masks(y, add=sub, subtract=add)  # the victim added `add` and subtracted `sub`
        if r.width < 8 * y.itemsize:
            y &= y.dtype.type((1 << r.width) - 1)
        return np.asarray(r.encoder.decode(y, n=ctx.spec.n, count=1), dtype=np.float64)

    def violation(self, run: AdversarialRun) -> str | None:
        rec = self.recover(run)
        if rec.input is None:
            return None
        return f"the coalition {self!r} got {rec.detail}: client {self.split.victim}'s input is {rec.input!r}"


def reconstruct(shares: dict[int, bytes], t: int) -> bytes | None:
    if t < 1 or len(shares) < t:
        return None
    holders = sorted(shares)[:t]
    ys = np.stack([np.frombuffer(shares[h], dtype="<u4").astype(np.uint32) for h in holders])[:, None, :]
    try:
        return shamir.reconstruct(holders, ys, t, SECRET_BYTES)[0]
    except (MessageRejected, ValueError):
        return None


# -- the search ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class CoalitionReport:
    """One search: the round's parameters, how many plans passed :func:`predict`, what the runs gave.

    ``leak``: the first plan whose run recovered the victim's input, the recovery, and the largest
    difference from the true input (within the encoder's quantization step); None if none did.
    """

    protocol: str
    n: int
    t: int
    degree: int
    corrupt: int
    exhaustive: bool
    candidates: int
    executed: list[tuple[Any, Recovery]]  # (plan, recovery); a plan is a Split or an isolation.Isolation
    leak: tuple[Any, Recovery, float] | None
    seed: int
    seconds: float

    def summary(self) -> str:
        found = "no plan leaks" if self.leak is None else f"leak with {self.leak[0]} (max error {self.leak[2]:.3g})"
        return (f"{self.protocol} n={self.n} degree={self.degree} t={self.t} C={self.corrupt} "
                f"{'exhaustive' if self.exhaustive else 'targeted'}: {self.candidates} plans pass the client rules, "
                f"{len(self.executed)} run end to end, {found} ({self.seconds:.2f} s)")


def search(protocol_factory: Callable[[], AggregationProtocol], n: int, *, seed: int = 0, dim: int = 4,
           runs: int = 1, exhaustive: bool | None = None, count: bool = False,
           limit: int = 1_000_000) -> CoalitionReport:
    """Search a round of n of `protocol_factory`'s protocol for a coalition that unmasks an honest input.

    Enumerates :func:`splits` on the graph of the round with `seed`, with at most
    :func:`corrupt_holders_bound` corrupt holders per victim (all of them, up to `limit`,
    when `count`; else until `runs` are chosen), runs up to `runs` of them end to end (one per
    victim and corrupt set first)
    with random inputs in the protocol's value range, and stops at the first run whose
    recovered vector matches the victim's input. Needs an active protocol of the SecAgg
    family (:func:`applies`); ConfigurationError otherwise.
    """
    t0 = time.perf_counter()
    protocol = protocol_factory()
    if not applies(protocol) or not protocol.threat_model.active:  # type: ignore[attr-defined]
        raise ConfigurationError("the coalition search needs an active protocol of the SecAgg family")
    spec = round_spec(n, dim, seed)
    rnd = secagg_round(RoundContext(protocol, spec))
    graph, t, c = rnd.graph, rnd.t, coalition_size(protocol, n)
    exhaustive = n <= EXHAUSTIVE_MAX_N if exhaustive is None else exhaustive
    found, chosen, seen = 0, list[Split](), set[tuple[int, tuple[int, ...]]]()
    bound = corrupt_holders_bound(n, graph.degree, c, int(protocol.describe(n).get("statistical_security_bits", 40)))
    for plan in splits(graph, t, c, exhaustive=exhaustive, max_corrupt_holders=bound):
        found += 1
        if len(chosen) < runs and (plan.victim, plan.corrupt) not in seen:
            chosen.append(plan)
            seen.add((plan.victim, plan.corrupt))
        if found >= limit or (not count and len(chosen) >= runs):
            break
    report = CoalitionReport(protocol.name, n, t, graph.degree, c, exhaustive, found, [], None, seed, 0.0)
    return run_plans(report, protocol_factory, chosen, execute, dim=dim, started=t0)


def run_plans(report: CoalitionReport, protocol_factory: Callable[[], AggregationProtocol], plans: Sequence[Any],
              execute_plan: Callable[..., Recovery], *, dim: int, started: float) -> CoalitionReport:
    """Run `plans` end to end (``execute_plan(protocol, inputs, plan, seed=...)``) on random inputs in the
    protocol's value range; ``report.leak`` is the first whose recovered vector is the victim's input within
    the encoder's quantization step. Fills ``report.executed`` and ``report.seconds``."""
    protocol = protocol_factory()
    inputs = random_inputs(protocol, report.n, dim, report.seed)
    tol = float(protocol.error_bound(1))
    for plan in plans:
        rec = execute_plan(protocol_factory(), inputs, plan, seed=report.seed)
        report.executed.append((plan, rec))
        if rec.input is not None:
            err = float(np.max(np.abs(rec.input - inputs[plan.victim])))
            if err <= tol:
                report.leak = (plan, rec, err)
                break
    report.seconds = time.perf_counter() - started
    return report


def execute(protocol: AggregationProtocol, inputs: Sequence[np.ndarray], plan: Split, *, seed: int = 0) -> Recovery:
    """Run `plan` end to end (real clients, the coalition's deviation) and return what it recovered."""
    dev = SplitSurvivorLists.from_split(plan)
    try:
        run = run_round(protocol, list(inputs), [dev], seed=seed, corrupt=plan.corrupt)
    except SecureFedError as e:
        return Recovery(0, 0, 0, False, False, None, f"the round raised {type(e).__name__}: {e}")
    return dev.recover(run)


def random_inputs(protocol: Any, n: int, dim: int, seed: int) -> list[np.ndarray]:
    c = getattr(getattr(protocol, "encoder", None), "value_range", 1.0) or 1.0
    gen = np.random.default_rng(seed)  # test data, not a secret
    return [gen.uniform(-c, c, dim) for _ in range(n)]
