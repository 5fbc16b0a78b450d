"""The conformance suite: the properties every aggregation protocol must have, checked with hypothesis.

:func:`check_protocol` runs them on any :class:`~securefed.protocols.base.AggregationProtocol`
(a factory gives a fresh one per example); :func:`conformance_tests` makes a pytest test class
with one test per property. A failure raises :class:`ConformanceError` naming the property,
what was wrong, and hypothesis' smallest counterexample (the round's inputs, dropouts and seed,
and what was altered or which deviation was used). Needs ``securefed[testing]``.

Properties (the names are stable; ``n`` is the round size, ``t = min_survivors(n)``, the
*input phase* is ``protocol.input_phase``, or the last phase when unset):

``configuration``
    For each n in ``clients``, either the protocol refuses n (``min_survivors(n)`` and
    ``simulate_aggregation`` raise ConfigurationError) or ``describe(n)`` is JSON-serializable,
    states ``min_survivors == t``, and ``check_description(describe(n))`` finds no problem.
``input_validation``
    NaN, +-Inf, a wrong length, a 2-D or integer array, or a coordinate beyond the declared
    value range makes ``simulate_aggregation`` raise InvalidInput.
``correctness``
    For every dropout schedule (half the rounds have none) the round ends in ProtocolAborted or in a
    result where
    ``.included`` holds no client that dropped at or before the input phase and at least t
    clients, and every coordinate of ``.total`` is within ``error_bound(n)`` (plus float64
    summation slack, 4 n 2^-52 sum |x_i|) of the sum of the included inputs.
``liveness``
    A round without dropouts finishes with every client included; so does every schedule
    ``must_finish(n, dropouts)`` accepts (by default only the empty one).
``abort``
    When more than n - t clients drop at or before the input phase, the round ends in
    ProtocolAborted (never a result, never another error).
``malformed_messages``
    A reply truncated or extended in transit is rejected (``server.receive`` raises
    MessageRejected, never another error); one with a flipped bit is rejected or accepted. After a
    rejection the round goes on without that reply: its sender is in ``.dropped`` with reason
    ``REJECTED``, out of ``.included`` if the reply was at or before the input phase, and the
    total is correct over ``.included``. An accepted flip must leave the total correct too, unless
    it altered an input-phase reply (the server cannot tell an altered input from another input).
    Rounds of two clients or more, without dropouts; ``message_phases=`` limits which phases'
    replies are altered.
``replayed_messages``
    A reply delivered twice, delivered as another client's, delivered in a later phase or taken
    from another round is rejected, with the same rules after a rejection (a duplicate leaves
    the round as it was: same ``.included``, correct total). Delivering a phase's replies in
    another order gives the same ``.included`` and a correct total.
``no_clear_input``
    No payload the server receives contains a window of W = min(16, len(r)) consecutive bytes of
    a representation r of any client's input (r of 8 bytes or more): float64 or float32, either
    byte order; the protocol's integer encoding (``protocol.encoder``) in its storage dtype, either
    byte order, or bit-packed at the modulus width, when encoding twice gives the same integers.
    Inputs are random (seeded) with |x_i| in [c/4, c], on the encoder's grid when it has a
    ``scale``; n >= 2 and no dropouts, so the aggregate the server may learn equals no input.
    Skipped for a protocol declared ``unprotected=True`` (Plain, the baseline, fails it).
``determinism``
    Two runs with the same seed, inputs and schedule give bitwise-equal totals, the same
    ``.included`` and ``.dropped``, and, unless ``deterministic_view=False``, byte-identical
    server views.
``honest_client``
    Against a deviating server (:mod:`securefed.testing.adversary`, drawn by
    :func:`securefed.testing.strategies.deviations`), honest parties refuse what
    they must: a party answers at most one request per phase (a second one is refused, or answered
    identically when it is byte-identical); for SecAgg and SecAgg+ also Bonawitz et al.'s rules:
    never both secrets of a peer, no unmasking for fewer than t survivors or for a server that
    claims everyone dropped, no use of replayed old shares, and (active) no answer to inconsistent
    survivor lists or substituted keys. ``handle`` may refuse only with MessageRejected or
    ProtocolAborted.
``coalition``
    The server with C = ``threat_model.corrupt(n)`` corrupt clients whose state it reads and
    whose messages it writes (:mod:`securefed.testing.coalition`) cannot unmask an honest
    client's input. For an active protocol of the SecAgg family, for each n: the plans that
    show two groups of a victim's holders two survivor lists, one with it and one without,
    with the corrupt clients signing both (:class:`~securefed.testing.adversary.SplitSurvivorLists`),
    searched on the round's graph (every victim, corrupt set and labelling for n <= 12; the
    victim's neighbourhood above), and up to ``min(max_examples, 3)`` of those the client rules
    let through run end to end; a violation is a run that reconstructs b_v and s_v, checks them
    against the commitment and the public key, and recovers the victim's true input. For a
    semi-honest one: no client has t corrupt holders of its shares. Corrupt sets are chosen knowing
    the graph, with at most :func:`~securefed.testing.coalition.corrupt_holders_bound` corrupt
    holders per victim (C on the complete graph; Bell et al.'s t1 on a random graph, which the
    threat model draws independently of the corruption).
    Deterministic (the rounds' seeds are the round sizes). Other protocols pass.

Choices: inputs are drawn within the declared value range (``value_range=`` or the protocol's
``value_range`` / ``encoder.value_range``; [-1, 1] when it declares none); sender binding is the
protocol's job (a message delivered under another client's name must be refused), as in
``protocols/wire.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import numpy as np

try:
    from hypothesis import HealthCheck, Phase, assume, given, note, seed, settings
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "securefed.testing.check_protocol needs hypothesis: install the extra with pip install 'securefed[testing]'"
    ) from e

from securefed import errors
from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import IntegerEncoder
from securefed.encoding.packing import pack
from securefed.errors import ConfigurationError, InvalidInput, ProtocolAborted
from securefed.protocols.base import (
    AggregationProtocol,
    AggregationResult,
    DropReason,
    simulate_aggregation,
)
from securefed.protocols.secagg.packed import column_pack
from securefed.testing import _driver, adversary, isolation
from securefed.testing import strategies as sfst
from securefed.testing._violations import ConformanceError, Violation, find_violation, report

__all__ = ["PROPERTIES", "ConformanceError", "check_protocol", "conformance_tests"]

PROPERTIES = (
    "configuration",
    "input_validation",
    "correctness",
    "liveness",
    "abort",
    "malformed_messages",
    "replayed_messages",
    "no_clear_input",
    "determinism",
    "honest_client",
    "coalition",
)

#: Which hypothesis test checks which properties (some share their rounds).
_GROUPS = {
    "configuration": ("configuration",),
    "input_validation": ("input_validation",),
    "correctness": ("correctness", "liveness"),
    "abort": ("abort",),
    "malformed_messages": ("malformed_messages",),
    "replayed_messages": ("replayed_messages",),
    "no_clear_input": ("no_clear_input",),
    "determinism": ("determinism",),
    "honest_client": ("honest_client",),
    "coalition": ("coalition",),
}

_WINDOW = 16


@dataclasses.dataclass(frozen=True)
class Case:
    """One round: n clients' inputs, a dropout schedule and a seed."""

    inputs: tuple[np.ndarray, ...]
    dropouts: Mapping[int, str]
    seed: int

    @property
    def n(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        xs = ", ".join(np.array2string(x, precision=17, separator=", ", threshold=64) for x in self.inputs)
        return (f"Case(n={self.n}, dim={self.inputs[0].size}, dropouts={dict(self.dropouts)}, seed={self.seed}, "
                f"inputs=[{xs}])")


MustFinish = Callable[[int, Mapping[int, str]], bool]


def _no_dropouts(n: int, dropouts: Mapping[int, str]) -> bool:
    return not dropouts


class _Harness:
    """One protocol factory with its options: the cases to draw, the runs and the checks every property shares."""

    def __init__(
        self,
        factory: Callable[[], AggregationProtocol],
        *,
        clients: tuple[int, int],
        dimension: tuple[int, int],
        value_range: float | None,
        unprotected: bool,
        must_finish: MustFinish,
        deterministic_view: bool,
        message_phases: Collection[str] | None,
        settings_: settings,
        wanted: Collection[str] = PROPERTIES,
        seed_: int | None = None,
    ) -> None:
        self.factory = factory
        self.probe = factory()
        if not isinstance(self.probe, AggregationProtocol):
            raise ConfigurationError(f"protocol_factory must return an AggregationProtocol, got "
                                     f"{type(self.probe).__name__}")
        lo, hi = clients  # checked by check_protocol
        self.clients, self.dimension = clients, dimension
        self.sizes = [n for n in range(lo, hi + 1) if self._accepts(n)]
        self.declared_range = value_range if value_range is not None else sfst.input_range(self.probe)
        self.range = self.declared_range or 1.0
        self.unprotected, self.must_finish = unprotected, must_finish
        self.deterministic_view = deterministic_view
        unknown = set(message_phases or ()) - set(self.probe.phases)
        if unknown:
            raise ConfigurationError(f"message_phases {sorted(unknown)} are not phases of {self.probe.phases}")
        self.message_phases = None if message_phases is None else set(message_phases)
        self.settings = settings_
        self.seed = seed_
        self.wanted = set(wanted)
        shown = repr(self.probe)
        kind = type(self.probe).__name__
        self.name = shown if shown.startswith(kind) else f"{kind} ({shown})"  # a subclass with its base's repr

    def _accepts(self, n: int) -> bool:
        try:
            self.probe.min_survivors(n)
        except ConfigurationError:
            return False
        return True

    def run(self, prop: Callable[[], None]) -> None:
        """Run the hypothesis test `prop`, from the suite's seed when one was given."""
        (prop if self.seed is None else seed(self.seed)(prop))()

    # -- strategies -----------------------------------------------------------------------------

    def cases(self, schedules: str = "any", *, min_n: int = 1, distinct: bool = False) -> st.SearchStrategy[Case]:
        sizes = [n for n in self.sizes if n >= min_n]
        if not sizes:
            return st.nothing()
        magnitude = self.range / 4 if distinct else 0.0
        cache: dict[tuple[int, int], st.SearchStrategy[Case]] = {}  # building strategies is not free

        def for_size(n: int, dim: int) -> st.SearchStrategy[Case]:
            if (n, dim) not in cache:
                xs = st.lists(sfst.updates(dim, value_range=self.range, min_magnitude=magnitude),
                              min_size=n, max_size=n).map(tuple)
                if schedules == "none":
                    drops: st.SearchStrategy[dict[int, str]] = st.just({})
                else:
                    too_many = {"any": None, "allowed": False, "too_many": True}[schedules]
                    drops = sfst.dropout_schedules(self.probe, n, too_many=too_many)
                cache[n, dim] = st.builds(Case, inputs=xs, dropouts=drops, seed=st.integers(0, 2**32 - 1))
            return cache[n, dim]

        return st.tuples(st.sampled_from(sizes), st.integers(*self.dimension)).flatmap(lambda t: for_size(*t))

    # -- checks shared by the properties ---------------------------------------------------------

    def _input_index(self) -> int:
        return sfst.input_phase_index(self.probe)

    def _dropped_early(self, protocol: AggregationProtocol, dropouts: Mapping[int, str]) -> set[int]:
        k = sfst.input_phase_index(protocol)
        return {c for c, p in dropouts.items() if protocol.phases.index(p) <= k}

    def check_total(self, prop: str, protocol: AggregationProtocol, case: Case, total: Any,
                    included: Sequence[int], context: str = "") -> None:
        n, dim = case.n, case.inputs[0].size
        where = f" ({context})" if context else ""
        if not isinstance(total, np.ndarray) or total.shape != (dim,) or total.dtype != np.float64:
            raise Violation(prop, f"the total is {type(total).__name__} {getattr(total, 'dtype', '')} "
                                   f"{getattr(total, 'shape', '')}, expected float64 of shape ({dim},){where}")
        xs = np.array([np.asarray(x, dtype=np.float64) for x in case.inputs])
        expect = xs[list(included)].sum(axis=0) if included else np.zeros(dim)
        slack = 4.0 * n * 2.0**-52 * np.abs(xs).sum(axis=0)
        tol = protocol.error_bound(n) + slack
        err = np.abs(total - expect)
        bad = ~(err <= tol)
        if bad.any():
            k = int(np.argmax(np.where(bad, err, -1.0)))
            raise Violation(prop, f"the total differs from the sum of the inputs of .included {tuple(included)} "
                                   f"by {err[k]:.6g} at coordinate {k} (total {float(total[k])!r}, "
                                   f"expected {float(expect[k])!r}, allowed error {tol[k]:.3g}){where}")

    def check_result(self, prop: str, protocol: AggregationProtocol, case: Case, res: AggregationResult) -> None:
        included = tuple(res.included)
        n, t = case.n, protocol.min_survivors(case.n)
        if list(included) != sorted(set(included)) or any(not 0 <= c < n for c in included):
            raise Violation(prop, f".included {included} is not an ascending tuple of client indices in 0..{n - 1}")
        early = self._dropped_early(protocol, case.dropouts) & set(included)
        if early:
            raise Violation(prop, f"clients {sorted(early)} dropped at or before the input phase but are in "
                                   f".included {included}")
        if len(included) < t:
            raise Violation(prop, f"the round finished with {len(included)} clients in .included, "
                                   f"fewer than min_survivors(n={n}) = {t}")
        self.check_total(prop, protocol, case, res.total, included)

    def simulate(self, prop: str, protocol: AggregationProtocol, case: Case, **kw: Any) -> AggregationResult | None:
        """simulate_aggregation; None when it aborts; any other error is a violation of `prop`."""
        try:
            return simulate_aggregation(protocol, list(case.inputs), dict(case.dropouts), seed=case.seed, **kw)
        except ProtocolAborted as e:
            note(f"aborted: {e.reason.value}: {e}")
            return None
        except Exception as e:  # anything else is what the property forbids
            raise Violation(prop, f"simulate_aggregation raised {type(e).__name__}: {e} "
                                   "(a round may only end in a result or ProtocolAborted)") from e



class _Suite(_Harness):
    """The properties of one protocol factory, each run under hypothesis by :func:`check_protocol`."""

    def configuration(self) -> None:
        lo, hi = self.clients
        for n in range(lo, hi + 1):
            protocol = self.factory()
            try:
                t = protocol.min_survivors(n)
            except ConfigurationError:
                try:
                    simulate_aggregation(protocol, [np.zeros(self.dimension[0])] * n, seed=0)
                except ConfigurationError:
                    continue
                except Exception as e:
                    raise Violation("configuration", f"n={n}: min_survivors raises ConfigurationError but "
                                                      f"simulate_aggregation raised {type(e).__name__}: {e}") from e
                raise Violation("configuration", f"n={n}: min_survivors raises ConfigurationError but a round "
                                                  "of that size ran") from None
            if not isinstance(t, int) or not 1 <= t <= n:
                raise Violation("configuration", f"n={n}: min_survivors is {t!r}, not an int in 1..{n}")
            description = protocol.describe(n)
            try:
                json.dumps(description, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise Violation("configuration", f"n={n}: describe() is not JSON-serializable: {e}") from e
            if description.get("min_survivors") != t:
                raise Violation("configuration", f"n={n}: describe() states min_survivors "
                                                  f"{description.get('min_survivors')!r}, min_survivors(n) is {t}")
            problems = type(protocol).check_description(description)
            if problems:
                raise Violation("configuration", f"n={n}: check_description(describe(n)) reports {problems}")

    def input_validation(self) -> None:
        @self.settings
        @given(case=self.cases("none"), data=st.data())
        def prop(case: Case, data: st.DataObject) -> None:
            i = data.draw(st.integers(0, case.n - 1), label="bad client")
            what, bad = data.draw(sfst.invalid_updates(case.inputs[0].size, value_range=self.declared_range,
                                                       wrong_length=case.n > 1), label="bad input")
            inputs = list(case.inputs)
            inputs[i] = bad
            try:
                simulate_aggregation(self.factory(), inputs, seed=case.seed)
            except InvalidInput:
                return
            except Exception as e:
                raise Violation("input_validation", f"client {i}'s input with {what} raised {type(e).__name__}: "
                                                     f"{e}, expected InvalidInput") from e
            raise Violation("input_validation", f"client {i}'s input with {what} was accepted; expected InvalidInput")

        self.run(prop)

    def correctness(self) -> None:
        @self.settings
        @given(case=st.one_of(self.cases("none"), self.cases("any")))  # half the rounds without dropouts
        def prop(case: Case) -> None:
            protocol = self.factory()
            res = self.simulate("correctness", protocol, case)
            if res is not None and "correctness" in self.wanted:
                self.check_result("correctness", protocol, case, res)
            if "liveness" in self.wanted:
                self._liveness(case, res)

        self.run(prop)

    def _liveness(self, case: Case, res: AggregationResult | None) -> None:
        if not case.dropouts and res is not None and tuple(res.included) != tuple(range(case.n)):
            raise Violation("liveness", f"a round without dropouts finished with .included {res.included}, "
                                         f"not every client")
        if res is None and (not case.dropouts or self.must_finish(case.n, case.dropouts)):
            raise Violation("liveness", f"the round aborted though the schedule {dict(case.dropouts)} must finish")

    def abort(self) -> None:
        @self.settings
        @given(case=self.cases("too_many"))
        def prop(case: Case) -> None:
            protocol = self.factory()
            res = self.simulate("abort", protocol, case)
            if res is not None:
                t = protocol.min_survivors(case.n)
                raise Violation("abort", f"the round finished with .included {res.included} although more than "
                                          f"n - min_survivors = {case.n - t} clients dropped by the input phase; "
                                          "expected ProtocolAborted")

        self.run(prop)

    def _messages(self, prop_name: str, kinds: Sequence[str]) -> None:
        # Two clients or more where the protocol allows: one client can hardly be confused with another.
        min_n = 2 if any(n >= 2 for n in self.sizes) else 1

        @self.settings
        @given(case=self.cases("none", min_n=min_n, distinct=True), data=st.data())
        def prop(case: Case, data: st.DataObject) -> None:
            protocol = self.factory()
            honest = _drive(prop_name, "the untampered round", protocol, case)
            if honest.aborted is not None:
                raise Violation("liveness", f"a round without dropouts aborted: {honest.aborted}")
            usable = [k for k in kinds if sfst.tamperable_replies(honest.replies, k, None, self.message_phases)]
            assume(usable)
            kind = data.draw(st.sampled_from(usable), label="kind")
            old = None
            if kind == "other_round":
                old = _drive(prop_name, "another round", self.factory(),
                             dataclasses.replace(case, seed=case.seed ^ 0x5EED)).replies
            tampering = data.draw(sfst.tamperings(honest.replies, other_round=old, kinds=[kind],
                                                  phases=self.message_phases), label="tampering")
            tampered = _drive(prop_name, tampering.detail, protocol_b := self.factory(), case, tampering.alter)
            self._check_tampered(prop_name, protocol_b, case, honest, tampered, tampering)

        self.run(prop)

    def malformed_messages(self) -> None:
        self._messages("malformed_messages", sfst.MALFORMED_KINDS)

    def replayed_messages(self) -> None:
        self._messages("replayed_messages", sfst.REPLAY_KINDS)

    def _check_tampered(self, prop: str, protocol: AggregationProtocol, case: Case, honest: _driver.Run,
                        run: _driver.Run, tampering: sfst.Tampering) -> None:
        altered = [d for d in run.deliveries if d.label != "honest"]
        if tampering.kind != "reorder" and not altered:
            return  # the target did not reply in this run (nothing was altered)
        must_reject = tampering.kind not in ("bit_flip", "reorder")
        for d in altered:
            if d.accepted and must_reject:
                raise Violation(prop, f"{tampering.detail} was accepted; expected MessageRejected")
        rejected = [d for d in altered if not d.accepted]
        target = tampering.party
        if rejected and tampering.kind != "duplicate" and isinstance(target, int) and (
                target not in run.dropped or run.dropped[target].reason is not DropReason.REJECTED):
            record = run.dropped.get(target)
            raise Violation(prop, f"{tampering.detail} was rejected but its sender {target} is not recorded as "
                                   f"dropped for it (.dropped has {record})")
        if run.result is None:
            return  # aborting is always allowed
        total, included = run.result
        k = protocol.phases.index(tampering.phase)
        if rejected and tampering.kind != "duplicate" and isinstance(target, int) and k <= self._input_index() \
                and target in included:
            raise Violation(prop, f"{tampering.detail} was rejected, yet client {target} is in .included {included}")
        if tampering.kind in ("duplicate", "reorder"):
            assert honest.result is not None
            if included != honest.result[1]:
                raise Violation(prop, f"after {tampering.detail}, .included is {included}, "
                                       f"{honest.result[1]} without it")
        input_altered = tampering.kind == "bit_flip" and not rejected and k == self._input_index()
        if not input_altered:
            self.check_total(prop, protocol, case, total, included, context=f"after {tampering.detail}")

    def no_clear_input(self) -> None:
        @self.settings
        @given(case=self.cases("none", min_n=2), data_seed=st.integers(0, 2**32 - 1))
        def prop(case: Case, data_seed: int) -> None:
            protocol = self.factory()
            inputs = self._random_inputs(protocol, case, data_seed)
            case = dataclasses.replace(case, inputs=tuple(inputs))
            res = self.simulate("no_clear_input", protocol, case)
            if res is None:
                raise Violation("liveness", "a round without dropouts aborted")
            reps = [_representations(protocol, x, case.n) for x in inputs]
            for party, phase, payload in res.server_view.messages:
                for i, named in enumerate(reps):
                    for name, rep in named:
                        at = _find_window(payload, rep)
                        if at is not None:
                            raise Violation(
                                "no_clear_input",
                                f"client {i}'s input appears in the clear ({name}) in the {phase!r} message "
                                f"from {party!r}, at byte {at[0]} (bytes {at[1]}..{at[1] + at[2] - 1} of the input)")

        if not self.unprotected:
            self.run(prop)

    def _random_inputs(self, protocol: AggregationProtocol, case: Case, data_seed: int) -> list[np.ndarray]:
        gen = np.random.default_rng(data_seed)  # test data, not a secret
        c, dim = self.range, case.inputs[0].size
        out = []
        for _ in range(case.n):
            x = gen.uniform(c / 4, c, dim) * gen.choice([-1.0, 1.0], dim)
            scale = getattr(getattr(protocol, "encoder", None), "scale", None)
            if isinstance(scale, float) and scale > 0:
                x = np.clip(np.round(x * scale) / scale, -c, c)
            out.append(x)
        return out

    def determinism(self) -> None:
        @self.settings
        @given(case=self.cases("any"))
        def prop(case: Case) -> None:
            protocol = self.factory()  # one configuration (an active protocol's identities included), run twice
            a = self.simulate("determinism", protocol, case)
            b = self.simulate("determinism", protocol, case)
            if (a is None) != (b is None):
                raise Violation("determinism", "the same seed gave one result and one abort")
            if a is None or b is None:
                return
            if a.included != b.included or not np.array_equal(a.total, b.total, equal_nan=True):
                raise Violation("determinism", f"the same seed gave totals/included {a.total}/{a.included} "
                                                f"and {b.total}/{b.included}")
            da = {c: (r.phase, r.reason) for c, r in a.dropped.items()}
            db = {c: (r.phase, r.reason) for c, r in b.dropped.items()}
            if da != db:
                raise Violation("determinism", f"the same seed gave dropouts {da} and {db}")
            if self.deterministic_view and a.server_view.messages != b.server_view.messages:
                first = next(i for i, (x, y) in enumerate(zip(a.server_view.messages, b.server_view.messages))
                             if x != y) if len(a.server_view.messages) == len(b.server_view.messages) else None
                where = "a different number of messages" if first is None else (
                    f"message {first} ({a.server_view.messages[first][1]!r} from "
                    f"{a.server_view.messages[first][0]!r}) differs")
                raise Violation("determinism", f"the same seed gave different server views: {where} "
                                                "(pass deterministic_view=False if a backend draws its own randomness)")

        self.run(prop)

    def honest_client(self) -> None:
        @self.settings
        @given(case=st.one_of(self.cases("none"), self.cases("allowed")), data=st.data())
        def prop(case: Case, data: st.DataObject) -> None:
            protocol = self.factory()
            deviation = data.draw(sfst.deviations(protocol, case.n), label="deviation")
            try:
                run = adversary.run_round(protocol, list(case.inputs), [deviation], seed=case.seed,
                                          dropouts=dict(case.dropouts))
            except Exception as e:
                raise Violation("honest_client", f"against {deviation!r} the round raised {type(e).__name__}: "
                                                  f"{e}") from e
            problem = deviation.violation(run)
            if problem:
                raise Violation("honest_client", f"against {deviation!r}: {problem}")

        self.run(prop)

    def coalition(self) -> None:
        if not isolation.applies(self.probe):
            return
        runs = max(1, min(3, self.settings.max_examples))
        for n in self.sizes:
            found = isolation.find_leak(self.factory, n, dim=min(self.dimension[1], 8), runs=runs)
            if found is not None:
                v = Violation("coalition", found[0])
                if found[1]:  # as add_note does (Python 3.11+; this runs on 3.10 too)
                    v.__notes__ = [*getattr(v, "__notes__", []), found[1]]
                raise v


def _drive(prop: str, what: str, protocol: AggregationProtocol, case: Case,
           alter: _driver.Alter | None = None) -> _driver.Run:
    """The driven round; an error other than ProtocolAborted and MessageRejected (which the driver records)
    violates `prop`: a malformed or replayed message must be rejected with MessageRejected, not crash."""
    try:
        return _driver.run(protocol, list(case.inputs), seed=case.seed, alter=alter)
    except Exception as e:  # anything else is what the property forbids
        raise Violation(prop, f"{what} raised {type(e).__name__}: {e} (a message the server cannot use must be "
                               "refused with MessageRejected; a round may only end in a result or "
                               "ProtocolAborted)") from e


_BYTE_ORDERS: tuple[Literal["<", ">"], ...] = ("<", ">")


def _representations(protocol: AggregationProtocol, x: np.ndarray, n: int) -> list[tuple[str, bytes]]:
    """Byte strings that would show `x` in the clear (see ``no_clear_input``); 8 bytes or more each."""
    reps = [(f"float64 {order}", x.astype(f"{order}f8").tobytes()) for order in "<>"]
    reps += [(f"float32 {order}", x.astype(f"{order}f4").tobytes()) for order in "<>"]
    enc = getattr(protocol, "encoder", None)
    if isinstance(enc, IntegerEncoder):
        try:
            a = enc.encode(x, n=n, rng=RandomSource(b"securefed/testing/a"))
            same = np.array_equal(a, enc.encode(x, n=n, rng=RandomSource(b"securefed/testing/b")))
        except errors.SecureFedError:
            same = False
        if same:
            k = enc.modulus_bits(n)
            reps += [(f"encoded {a.dtype} {order}", a.astype(a.dtype.newbyteorder(order)).tobytes())
                     for order in _BYTE_ORDERS]
            reps.append((f"encoded, packed at {k} bits", bytes(pack(a, k))))
            reps.append((f"encoded, column-packed at {k} bits", column_pack(a, k)))
    return [(name, r) for name, r in reps if len(r) >= 8]


def _find_window(payload: bytes, rep: bytes) -> tuple[int, int, int] | None:
    """(offset in payload, offset in rep, window) of the first window of `rep` found in `payload`."""
    w = min(_WINDOW, len(rep))
    for start in range(len(rep) - w + 1):
        at = payload.find(rep[start : start + w])
        if at >= 0:
            return at, start, w
    return None


def _settings(max_examples: int | None, seed_: int | None = None) -> settings:
    # No "explain" phase: it reruns a failing case hundreds of times to annotate it.
    kw: dict[str, Any] = {"deadline": None, "database": None, "report_multiple_bugs": False,
                          "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                          "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.filter_too_much]}
    if max_examples is not None:
        kw["max_examples"] = max_examples
    if seed_ is not None:  # a derandomized profile would ignore the seed
        kw["derandomize"] = False
    return settings(**kw)


def _factory(
    protocol_factory: Callable[[], AggregationProtocol] | AggregationProtocol,
) -> Callable[[], AggregationProtocol]:
    if isinstance(protocol_factory, AggregationProtocol):
        return lambda: protocol_factory
    if not callable(protocol_factory):
        raise ConfigurationError("protocol_factory must be a callable returning an AggregationProtocol (or a "
                                 f"protocol), got {type(protocol_factory).__name__}")
    return protocol_factory


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_options(options: Mapping[str, Any]) -> list[str]:
    """ConfigurationError naming the first malformed option of check_protocol; the properties wanted."""
    for name in ("clients", "dimension"):
        r = options[name]
        if not (isinstance(r, tuple | list) and len(r) == 2 and all(_is_int(v) for v in r) and 1 <= r[0] <= r[1]):
            raise ConfigurationError(f"{name} must be a range (lo, hi) of integers with 1 <= lo <= hi, got {r!r}")
    c = options["value_range"]
    if c is not None and not (isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) and c > 0):
        raise ConfigurationError(f"value_range must be None or a finite number > 0, got {c!r}")
    for name in ("unprotected", "deterministic_view"):
        if not isinstance(options[name], bool):
            raise ConfigurationError(f"{name} must be True or False, got {options[name]!r}")
    if options["must_finish"] is not None and not callable(options["must_finish"]):
        raise ConfigurationError(f"must_finish must be None or a function (n, dropouts) -> bool, "
                                 f"got {options['must_finish']!r}")
    for name in ("max_examples", "seed"):
        v, low = options[name], 1 if name == "max_examples" else 0
        if v is not None and not (_is_int(v) and v >= low):
            raise ConfigurationError(f"{name} must be None or an integer >= {low}, got {v!r}")
    for name in ("message_phases", "properties"):
        v = options[name]
        if v is not None and (isinstance(v, str | bytes) or not isinstance(v, Collection)
                              or not all(isinstance(x, str) for x in v)):
            raise ConfigurationError(f"{name} must be None or a collection of names (str), got {v!r}")
    wanted = list(PROPERTIES if options["properties"] is None else options["properties"])
    unknown = [p for p in wanted if p not in PROPERTIES]
    if unknown:
        raise ConfigurationError(f"unknown properties {unknown}; choose from {PROPERTIES}")
    return wanted


def check_protocol(
    protocol_factory: Callable[[], AggregationProtocol] | AggregationProtocol,
    *,
    clients: tuple[int, int] = (1, 6),
    dimension: tuple[int, int] = (1, 8),
    value_range: float | None = None,
    unprotected: bool = False,
    must_finish: MustFinish | None = None,
    deterministic_view: bool = True,
    message_phases: Collection[str] | None = None,
    properties: Collection[str] | None = None,
    max_examples: int | None = None,
    seed: int | None = None,
) -> None:
    """Check the conformance properties (module docstring) of the protocol `protocol_factory` makes.

    - `protocol_factory`: a callable giving a fresh protocol (a class with defaults works), or a protocol;
    - `clients`, `dimension`: ranges (lo, hi) of round sizes and vector lengths to draw from (round
      sizes the protocol refuses with ConfigurationError are left out);
    - `value_range`: the input bound c (default: the protocol's declared one, else [-1, 1] unchecked);
    - `unprotected`: the protocol shows inputs to the server by design (Plain): skip ``no_clear_input``;
    - `must_finish(n, dropouts)`: schedules the round must survive (default: none but the empty one);
    - `deterministic_view`: whether the same seed must give byte-identical server views (False for
      backends with their own randomness, e.g. TenSEAL);
    - `message_phases`: alter only replies of these phases in the message properties (default all);
    - `properties`: a subset of :data:`PROPERTIES` (default all); `max_examples`: examples per
      property (default: the loaded hypothesis profile's);
    - `seed`: draw the examples from this hypothesis seed (not derandomized), so that a
      fixed list of seeds reproduces randomized runs (default: the profile decides).

    Raises ConformanceError (an AssertionError) for the first property that fails, with the
    smallest counterexample hypothesis found; ConfigurationError for a malformed option. Do not
    call it inside a ``@given`` test.
    """
    wanted = _check_options(dict(clients=clients, dimension=dimension, value_range=value_range,
                                 unprotected=unprotected, must_finish=must_finish,
                                 deterministic_view=deterministic_view, message_phases=message_phases,
                                 properties=properties, max_examples=max_examples, seed=seed))
    suite = _Suite(_factory(protocol_factory), clients=clients, dimension=dimension, value_range=value_range,
                   unprotected=unprotected, must_finish=must_finish or _no_dropouts,
                   deterministic_view=deterministic_view, message_phases=message_phases,
                   settings_=_settings(max_examples, seed), wanted=wanted, seed_=seed)
    if not suite.sizes:
        raise ConformanceError("configuration", f"{suite.name} refuses every round size in clients={clients}; "
                                                "widen the range")
    for group, members in _GROUPS.items():
        if any(p in wanted for p in members):
            _run_group(suite, group)


def _run_group(suite: _Suite, group: str) -> None:
    try:
        getattr(suite, group)()
    except Violation as v:
        raise report(suite.name, v) from None
    except Exception as e:  # hypothesis may wrap the failure (flaky, multiple errors)
        inner = find_violation(e)
        if inner is None:
            raise
        extra = [*getattr(e, "__notes__", []), f"({type(e).__name__}: {str(e).splitlines()[0]})"]
        raise report(suite.name, inner, extra) from None


def conformance_tests(
    protocol_factory: Callable[[], AggregationProtocol] | AggregationProtocol, **options: Any
) -> type:
    """A pytest test class with one test per conformance property (options as :func:`check_protocol`).

    ``test_correctness`` checks correctness and liveness (they share their rounds); every
    other property has its own ``test_<property>``. Assign the class in a test module:
    ``TestMine = conformance_tests(MyProtocol, clients=(2, 5))``.
    """
    import pytest

    if "properties" in options:
        raise TypeError("conformance_tests makes one test per property; select with pytest -k instead")

    def make(group: str, members: tuple[str, ...]) -> Callable[[Any], None]:
        def test(self: Any) -> None:
            check_protocol(protocol_factory, properties=members, **options)

        test.__name__ = f"test_{group}"
        test.__doc__ = f"The protocol has the conformance properties {members} (securefed.testing.conformance)."
        if group == "no_clear_input" and options.get("unprotected"):
            test = pytest.mark.skip(reason="declared unprotected: the server sees inputs by design")(test)
        return test

    return type("ConformanceTests", (), {f"test_{g}": make(g, m) for g, m in _GROUPS.items()})
