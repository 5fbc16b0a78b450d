"""A server that deviates in named ways, to test that honest clients refuse what they must.

:func:`run_round` drives one round like :func:`~securefed.protocols.base.simulate_aggregation`,
but every request the honest server produces passes through a list of
:class:`Deviation` objects first. A deviation may rewrite, drop, add or repeat
requests (the replies to added requests go to the deviation, not to the honest
server) and sees every reply. The run records each delivery: what was sent, what
came back, and what the client raised if it refused. ``run_round(..., corrupt=...)`` hands the
deviations the clients the adversary controls (:attr:`RoundContext.corrupt`).

Deviations for SecAgg / SecAgg+ (Bonawitz et al. 2017, Sec. 4 and 6):

- :class:`AskBothSecrets`: a second unmasking request that marks a peer the other
  way (the server would get both b_v's and s_v's shares from one client);
- :class:`UnmaskBelowThreshold`: a survivor list with fewer than t survivors;
- :class:`InconsistentSurvivorLists` (active): two halves of the clients sign
  different survivor lists, then each is shown the other half's list or signatures;
- :class:`SubstitutePublicKey` (active): the server replaces a peer's advertised key
  with its own (a man in the middle on the share channel);
- :class:`DropEveryone`: the server claims that every other client dropped (an empty key
  or share list, or a survivor list of the client alone);
- :class:`ReplayOldShares`: the server sends a client the shares its peers sealed to it
  in an earlier round (see :func:`old_shares`);
- :class:`SplitSurvivorLists` (active, with corrupt clients: :mod:`securefed.testing.coalition`):
  the server and C corrupt clients show two groups of a victim's holders two consistent survivor
  lists, one with the victim and one without, to reconstruct both of its secrets;
- :class:`IsolateVictim` (active, with corrupt clients: :mod:`securefed.testing.isolation`): the
  victim masks only with its corrupt neighbours and a few honest partners, which two survivor lists
  show as survivors to the victim and as dropped to their other holders.

For every protocol, :class:`AskAgain` sends a party a second request in a phase it has
answered (byte-identical, or with one bit flipped). Each deviation's :meth:`Deviation.violation`
says what honest parties did wrong against it; ``securefed.testing.check_protocol`` draws
deviations from ``securefed.testing.strategies.deviations``.

Usage::

    run = run_round(SecAgg(), inputs, [AskBothSecrets(target=0, victim=1)], seed=1)
    assert run.refused("unmasking", 0)
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np

from securefed.crypto import kex
from securefed.crypto.random import RandomSource
from securefed.protocols import wire
from securefed.protocols.base import AggregationProtocol, RoundSpec
from securefed.protocols.secagg import wire as W
from securefed.testing._harness import (
    AdversarialRun,
    Delivery,
    Deviation,
    RoundContext,
    Send,
    round_spec,
    run_round,
)
from securefed.testing.coalition import SplitSurvivorLists
from securefed.testing.isolation import IsolateVictim

__all__ = [
    "AdversarialRun",
    "AskAgain",
    "AskBothSecrets",
    "Delivery",
    "Deviation",
    "DropEveryone",
    "InconsistentSurvivorLists",
    "IsolateVictim",
    "ReplayOldShares",
    "RoundContext",
    "Send",
    "SplitSurvivorLists",
    "SubstitutePublicKey",
    "UnmaskBelowThreshold",
    "old_shares",
    "round_spec",
    "run_round",
]


# -- SecAgg / SecAgg+ deviations ----------------------------------------------------------------


def _survivor_bits(ctx: RoundContext, request: bytes, phase: str) -> tuple[np.ndarray, bytes]:
    survivors, rest = W.split_bitmap(ctx.body(phase, request), ctx.spec.n)
    return survivors, bytes(rest)


class AskBothSecrets(Deviation):
    """After `target` answers unmasking, ask it again with `victim` marked the other way."""

    name = "ask_both_secrets"

    def __init__(self, target: int, victim: int) -> None:
        self.target, self.victim = target, victim

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != "unmasking":
            return sends
        out = list(sends)
        for s in sends:
            if s.party == self.target:
                survivors, rest = _survivor_bits(ctx, s.request, phase)
                flipped = set(survivors.tolist()) ^ {self.victim}
                body = W.bitmap(sorted(flipped), ctx.spec.n) + rest
                out.append(Send(self.target, ctx.message(phase, body), forward=False, label=self.name))
        return out

    def violation(self, run: AdversarialRun) -> str | None:
        return _refused_then_silent(run, self.target, "unmasking", self.name)

    def __repr__(self) -> str:
        return f"AskBothSecrets(target={self.target}, victim={self.victim})"


class UnmaskBelowThreshold(Deviation):
    """Send `target` a survivor list with t - 1 members of its neighbourhood (itself included)."""

    name = "unmask_below_threshold"

    def __init__(self, target: int, phase: str = "unmasking") -> None:
        self.target, self.phase = target, phase

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != self.phase:
            return sends
        out = []
        for s in sends:
            if s.party != self.target:
                out.append(s)
                continue
            survivors, rest = _survivor_bits(ctx, s.request, phase)
            nbhd = set(ctx.secagg.graph.closed_neighborhood(self.target).tolist())
            keep = [self.target] + [v for v in survivors.tolist() if v in nbhd and v != self.target]
            small = keep[: ctx.secagg.t - 1]
            others = [v for v in survivors.tolist() if v not in nbhd]
            out.append(Send(self.target, ctx.message(phase, W.bitmap(sorted(small + others), ctx.spec.n) + rest),
                            forward=False, label=self.name))
        return out

    def violation(self, run: AdversarialRun) -> str | None:
        return _refused_then_silent(run, self.target, self.phase, self.name)

    def __repr__(self) -> str:
        return f"UnmaskBelowThreshold(target={self.target}, phase={self.phase!r})"


class InconsistentSurvivorLists(Deviation):
    """Active variant: clients in `group` sign a list without `victim`, the others the true list.

    In unmasking, ``mode="swap"`` shows each client the list (and signatures) of the
    other group; ``mode="foreign_signatures"`` shows each its own list with the other
    group's signatures. An honest client refuses both. The two lists differ by construction:
    when `victim` sent no masked input (it dropped), the survivor at index ``victim`` modulo
    their number is left out instead (else both groups would sign the same list, and a client
    answering valid signatures on it would be reported for no fault).
    """

    name = "inconsistent_survivor_lists"

    def __init__(self, victim: int, group: set[int], mode: str = "swap") -> None:
        if mode not in ("swap", "foreign_signatures"):
            raise ValueError("mode must be 'swap' or 'foreign_signatures'")
        self.victim, self.group, self.mode = victim, set(group), mode
        self._lists: dict[bool, bytes] = {}
        self._sigs: dict[bool, dict[int, bytes]] = {True: {}, False: {}}

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase == "consistency_check":
            out = []
            for s in sends:
                survivors, _ = _survivor_bits(ctx, s.request, phase)
                members = survivors.tolist()
                left_out = self.victim if self.victim in members or not members else members[self.victim % len(members)]
                lists = {False: W.bitmap(survivors, ctx.spec.n),
                         True: W.bitmap([v for v in members if v != left_out], ctx.spec.n)}
                self._lists = lists
                mine = s.party in self.group
                out.append(Send(s.party, ctx.message(phase, lists[mine]), forward=not mine, label=self.name))
            return out
        if phase == "unmasking" and self._lists:
            out = []
            for party in sorted({*self._sigs[True], *self._sigs[False]}):  # every client that signed a list
                mine = party in self.group
                shown = (not mine) if self.mode == "swap" else mine
                signer_group = (not mine) if self.mode == "foreign_signatures" else shown
                nbhd = set(ctx.secagg.graph.closed_neighborhood(party).tolist())
                sigs = sorted((v, sig) for v, sig in self._sigs[signer_group].items() if v in nbhd)
                body = W.records(sigs, prefix=self._lists[shown])
                out.append(Send(party, ctx.message(phase, body), forward=False, label=self.name))
            return out
        return sends

    def observe(self, delivery: Delivery) -> None:
        if delivery.phase == "consistency_check" and delivery.reply is not None:
            sig = wire.body(delivery.reply)
            self._sigs[delivery.party in self.group][delivery.party] = sig  # type: ignore[index]

    def violation(self, run: AdversarialRun) -> str | None:
        answered = [d.party for d in run.deliveries if d.label == self.name and d.phase == "unmasking" and d.reply]
        return f"clients {answered} answered an unmasking request with an inconsistent survivor list" if answered \
            else None

    def __repr__(self) -> str:
        return f"InconsistentSurvivorLists(victim={self.victim}, group={sorted(self.group)}, mode={self.mode!r})"


class SubstitutePublicKey(Deviation):
    """Replace `victim`'s advertised keys, as shown to `target`, with the server's own."""

    name = "substitute_public_key"

    def __init__(self, target: int, victim: int) -> None:
        self.target, self.victim = target, victim

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != "share_keys":
            return sends
        out = []
        rec = 2 * W.KEY + (W.SIG if ctx.secagg.active else 0) + W.CHECK
        forged = kex.public_bytes(kex.generate_private_key(RandomSource(b"server-mitm")))
        for s in sends:
            if s.party != self.target:
                out.append(s)
                continue
            ids, rows = W.parse_records(ctx.body(phase, s.request), rec)
            if self.victim not in ids.tolist():  # not a neighbour of the target: nothing to substitute
                out.append(s)
                continue
            entries = []
            for i, v in enumerate(ids.tolist()):
                entry = rows[i].tobytes()
                if v == self.victim:  # a malicious server recomputes the integrity check: only signatures stop it
                    keys = forged + forged[::-1] + entry[2 * W.KEY : -W.CHECK]
                    entry = keys + W.key_check(v, keys)
                entries.append((v, entry))
            out.append(Send(s.party, ctx.message(phase, W.records(entries)), label=self.name))
        return out

    def violation(self, run: AdversarialRun) -> str | None:
        return _refused_then_silent(run, self.target, "share_keys", self.name)

    def __repr__(self) -> str:
        return f"SubstitutePublicKey(target={self.target}, victim={self.victim})"


class DropEveryone(Deviation):
    """Tell `target` in `phase` that every other client dropped.

    ``share_keys``: a key list of `target`'s own record alone; ``masked_input``: an empty share
    list; ``consistency_check`` /
    ``unmasking``: a survivor list of `target` alone. A client that went on would give the
    server its shares alone (or an input masked only by its self mask); an honest one refuses
    and sends nothing more.
    """

    name = "drop_everyone"
    PHASES: ClassVar[tuple[str, ...]] = ("share_keys", "masked_input", "consistency_check", "unmasking")

    def __init__(self, target: int, phase: str) -> None:
        if phase not in self.PHASES:
            raise ValueError(f"phase must be one of {self.PHASES}")
        self.target, self.phase = target, phase

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != self.phase:
            return sends
        out = []
        for s in sends:
            if s.party != self.target:
                out.append(s)
                continue
            if phase == "share_keys":  # its own record alone (the list always carries it)
                rec = 2 * W.KEY + (W.SIG if ctx.secagg.active else 0) + W.CHECK
                ids, rows = W.parse_records(ctx.body(phase, s.request), rec)
                body = W.records([(v, rows[i].tobytes()) for i, v in enumerate(ids.tolist()) if v == self.target])
            elif phase == "masked_input":
                body = W.records([])
            else:
                _, rest = _survivor_bits(ctx, s.request, phase)
                body = W.bitmap([self.target], ctx.spec.n) + rest
            out.append(Send(self.target, ctx.message(phase, body), forward=False, label=self.name))
        return out

    def violation(self, run: AdversarialRun) -> str | None:
        return _refused_then_silent(run, self.target, self.phase, self.name)

    def __repr__(self) -> str:
        return f"DropEveryone(target={self.target}, phase={self.phase!r})"


def old_shares(protocol: AggregationProtocol, n: int, dim: int, target: int, *, seed: int | bytes) -> bytes:
    """The body of `target`'s masked_input request (its peers' sealed shares) in an honest round with `seed`.

    Empty when `target` got no such request. Inputs do not matter to the shares: zeros are used.
    """
    run = run_round(protocol, [np.zeros(dim)] * n, seed=seed)
    for d in run.outcomes("masked_input", target):
        return wire.body(d.request)
    return b""


class ReplayOldShares(Deviation):
    """In masked_input, send `target` the shares its peers sealed to it in an earlier round, framed as this
    round's: the honest round (see :func:`old_shares`) whose seed is :meth:`old_round_seed`.

    The old round is another round by construction: its seed is derived from this round's
    session id, a label and `old_seed`, so its session differs from this one whatever
    `old_seed` is (hypothesis shrinks `old_seed` and the round's seed alike; were the old
    round this one, its shares would be this round's and the client right to take them).
    An honest client cannot open them (the AEAD binds session, round, sender and recipient)
    and refuses to send its masked input.
    """

    name = "replay_old_shares"

    def __init__(self, target: int, old_seed: int | bytes) -> None:
        self.target, self.old_seed = target, old_seed

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != "masked_input" or all(s.party != self.target for s in sends):
            return sends
        old = old_shares(ctx.protocol, ctx.spec.n, ctx.spec.dim, self.target, seed=self.old_round_seed(ctx.spec))
        if not old:
            return sends
        return [s if s.party != self.target else
                Send(s.party, ctx.message(phase, old), forward=False, label=self.name) for s in sends]

    def old_round_seed(self, spec: RoundSpec) -> bytes:
        """The seed of the replayed round: derived from `spec`'s session id, so never this round's seed."""
        tag = self.old_seed if isinstance(self.old_seed, bytes) else str(self.old_seed).encode()
        attempt = 0
        while True:
            seed = b"securefed/testing/old-round\x00" + spec.session_id + struct.pack(">I", attempt) + tag
            if round_spec(spec.n, spec.dim, seed).session_id != spec.session_id:  # (a hash collision otherwise)
                return seed
            attempt += 1

    def violation(self, run: AdversarialRun) -> str | None:
        return _refused_then_silent(run, self.target, "masked_input", self.name)

    def __repr__(self) -> str:
        return f"ReplayOldShares(target={self.target}, old_seed={self.old_seed!r})"


# -- any protocol -----------------------------------------------------------------------------------


def _flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    bit %= 8 * len(out)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


class AskAgain(Deviation):
    """Send a party a second request in `phase` right after its first: the same bytes, or one bit flipped.

    ``index`` picks the party among the phase's addressees (modulo their number; auxiliary
    parties such as an HE decryptor included); ``flip``: None repeats the request byte for
    byte, an int flips that bit (negative: counted from the end). An honest party answers
    at most one request per phase: it refuses the second, or answers a byte-identical one
    with the byte-identical reply (a retransmission). Answering a different request twice
    is how a client would reveal both secrets of a peer.
    """

    name = "ask_again"

    def __init__(self, phase: str, index: int = 0, flip: int | None = None) -> None:
        self.phase, self.index, self.flip = phase, index, flip

    def requests(self, ctx: RoundContext, phase: str, sends: list[Send]) -> list[Send]:
        if phase != self.phase or not sends:
            return sends
        i = self.index % len(sends)
        first = sends[i]
        if self.flip is not None and not first.request:
            return sends
        again = first.request if self.flip is None else _flip_bit(first.request, self.flip)
        return [*sends[: i + 1], Send(first.party, again, forward=False, label=self.name), *sends[i + 1 :]]

    def violation(self, run: AdversarialRun) -> str | None:
        for d in run.deliveries:
            if d.label != self.name or d.reply is None:
                continue
            first = next(iter(run.outcomes(d.phase, d.party, "honest")), None)
            same = first is not None and d.request == first.request
            if same and first is not None and d.reply == first.reply:
                continue
            kind = "byte-identical" if same else "different"
            return (f"{d.party!r} answered a second, {kind} request in phase {d.phase!r}"
                    + (" with a different reply" if same else "") + "; a party answers one request per phase")
        return None

    def __repr__(self) -> str:
        how = "the same request" if self.flip is None else f"the request with bit {self.flip} flipped"
        return f"AskAgain(phase={self.phase!r}, index={self.index}: {how})"


def _refused_then_silent(run: AdversarialRun, party: int, phase: str, label: str) -> str | None:
    """None if `party` answered no `label` request of `phase` and nothing after the first of them."""
    deviating = [d for d in run.deliveries if d.phase == phase and d.party == party and d.label == label]
    if not deviating:
        return None
    answered = [d for d in deviating if d.reply is not None]
    if answered:
        return f"client {party} answered the {label} request in phase {phase!r}"
    start = run.deliveries.index(deviating[0])
    later = [d for d in run.deliveries[start + 1 :] if d.party == party and d.reply is not None]
    if later:
        return f"client {party} refused in {phase!r} but then answered a {later[0].phase!r} request"
    return None
