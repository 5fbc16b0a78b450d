"""The conformance suite can fail: deliberately broken protocols are caught, each with the property named
and a readable counterexample (the acceptance of issue 6). Each variant breaks one rule of a shipped
protocol and nothing else.
"""

import math
import os

import numpy as np
import pytest

from securefed.errors import MessageRejected
from securefed.protocols import Plain, SecAgg, SecAggPlus
from securefed.protocols import plain as plain_module
from securefed.protocols.secagg import client as secagg_client
from securefed.protocols.secagg import params as secagg_params
from securefed.protocols.secagg.client import Client, _Completed, _Unmasking
from securefed.testing import ConformanceError, check_protocol


def caught(factory, prop, **options):
    """check_protocol fails on `prop`; the message names it and shows the counterexample."""
    options.setdefault("max_examples", 30)
    with pytest.raises(ConformanceError) as info:
        check_protocol(factory, properties=[prop], **options)
    err = info.value
    text = str(err)
    assert err.property == prop
    assert f"violates {prop!r}" in text
    assert "counterexample" in text and "case=" in text
    return text


# -- masks that do not cancel -------------------------------------------------------------------


def test_masks_that_do_not_cancel(monkeypatch):
    """Every client adds every pairwise mask (the signs of Bonawitz et al.'s masks ignored): wrong sums."""
    real = secagg_client.pairwise_signs

    def same_sign(me, peers, keys):
        add, sub = real(me, peers, keys)
        return add + sub, []

    monkeypatch.setattr(secagg_client, "pairwise_signs", same_sign)
    text = caught(SecAgg, "correctness", max_examples=20)
    assert "the total differs from the sum of the inputs of .included" in text


# -- a client that answers both secrets ------------------------------------------------------------


class _AnswersTwice(Client):
    """A SecAgg client that answers a second unmasking request as if it were the first."""

    def handle(self, phase, request):
        if self.state is _Completed and phase == "unmasking":
            self.state = _Unmasking
        return super().handle(phase, request)


class AnswersBothSecrets(SecAgg):
    def client(self, spec, client, x=None, *, rng):
        c = _AnswersTwice(self._round(spec), int(client), rng)
        if x is not None:
            c.set_input(x)
        return c


def test_a_client_that_answers_both_secrets():
    text = caught(AnswersBothSecrets, "honest_client", max_examples=60)
    assert "answered" in text and "unmasking" in text


# -- an accumulator that adds a rejected message ------------------------------------------------


class _AddsFirst(plain_module._PlainServer):
    """Adds an upload to the sum before the replay check rejects it (the rule: check, then add)."""

    def receive(self, phase, party, payload):
        if isinstance(party, int) and party in self._received:
            body = payload[-8 * self._spec.dim :]
            if len(body) == 8 * self._spec.dim:
                self._acc += np.frombuffer(body, dtype="<f8")
        super().receive(phase, party, payload)


class AddsRejected(Plain):
    def server(self, spec, *, rng):
        return _AddsFirst(spec)


def test_an_accumulator_that_adds_a_rejected_message():
    text = caught(AddsRejected, "replayed_messages", unprotected=True)
    assert "delivered twice" in text


class _AddsWhatParses(plain_module._PlainServer):
    """Adds the whole floats a reply holds, then checks its length: a rejected truncated upload stays in part."""

    def receive(self, phase, party, payload):
        body = payload[plain_module.wire.HEADER_SIZE :]
        k = min(len(body) // 8, self._spec.dim)
        if party not in self._received and party not in self._dropped and len(body) != 8 * self._spec.dim:
            self._acc[:k] += np.frombuffer(body[: 8 * k], dtype="<f8")
        super().receive(phase, party, payload)


def test_an_accumulator_that_keeps_part_of_a_rejected_message():
    text = caught(lambda: _plain_with(_AddsWhatParses), "malformed_messages", unprotected=True, max_examples=100)
    # a truncated or an extended upload both expose it (whole floats added before the length check); a
    # randomized profile may shrink to either
    assert "the total differs" in text and ("bytes cut" in text or "kind='extend'" in text)


def _plain_with(server_cls):
    class Variant(Plain):
        def server(self, spec, *, rng):
            return server_cls(spec)

    return Variant()


# -- the other properties can fail too ----------------------------------------------------------


def test_plain_exposes_inputs_unless_declared_unprotected():
    text = caught(Plain, "no_clear_input", max_examples=5)
    assert "appears in the clear (float64 <)" in text
    check_protocol(Plain, unprotected=True, properties=["no_clear_input"], max_examples=5)


class _NeverAborts(plain_module._PlainServer):
    def finish_phase(self, phase):
        try:
            super().finish_phase(phase)
        except Exception:  # noqa: BLE001 - the defect: finish with whatever arrived
            self._done = True


class ClaimsThreeSurvivors(Plain):
    """Declares that rounds need 3 uploads but finishes with fewer."""

    def min_survivors(self, n):
        return min(n, 3)

    def server(self, spec, *, rng):
        return _NeverAborts(spec)

    def describe(self, n):
        return {**super().describe(n), "min_survivors": self.min_survivors(n)}


def test_a_round_that_finishes_with_too_few_survivors():
    text = caught(ClaimsThreeSurvivors, "abort", unprotected=True)
    assert "expected ProtocolAborted" in text


class NotDeterministic(Plain):
    """Draws a coin from the OS instead of the round's seeded source."""

    def client(self, spec, client, x=None, *, rng):
        c = plain_module._PlainClient(spec, client, x)
        if x is not None and os.urandom(1)[0] & 1:
            c._x = np.nextafter(c._x, np.inf)  # the coin moves the input by one ulp
        return c


def test_a_protocol_that_ignores_the_seed():
    with pytest.raises(ConformanceError) as info:  # hypothesis cannot replay it: no shrunk counterexample
        check_protocol(NotDeterministic, unprotected=True, properties=["determinism"], max_examples=30)
    assert info.value.property == "determinism" and "the same seed gave" in str(info.value)


class TakesNaN(Plain):
    def client(self, spec, client, x=None, *, rng):
        c = plain_module._PlainClient(spec, client, None)
        c._x = x
        return c


def test_a_protocol_that_takes_nan():
    text = caught(TakesNaN, "input_validation", unprotected=True)
    assert "expected InvalidInput" in text


class MisDescribed(SecAggPlus):
    """Records a threshold of 1 in its description (the round itself uses the right one)."""

    def describe(self, n):
        return {**super().describe(n), "threshold": 1}


def test_a_description_that_breaks_the_threat_model():
    with pytest.raises(ConformanceError) as info:
        check_protocol(MisDescribed, properties=["configuration"])
    assert info.value.property == "configuration"
    assert "check_description(describe(n)) reports" in str(info.value) and "threshold 1 < 2" in str(info.value)


class _SkipsSenderCheck(plain_module._PlainServer):
    def receive(self, phase, party, payload):
        # Reads the sender from the payload's header instead of checking it against the channel's.
        claimed = int.from_bytes(payload[42:46], "big") if len(payload) >= 50 else party
        if claimed != party and claimed not in self._received and 0 <= claimed < self._spec.n:
            party = claimed
        super().receive(phase, party, payload)


def test_a_server_that_trusts_the_claimed_sender():
    text = caught(lambda: _plain_with(_SkipsSenderCheck), "replayed_messages", unprotected=True, max_examples=150)
    assert "delivered as" in text


def test_check_protocol_reports_unexpected_exceptions_as_violations():
    class Crashes(Plain):
        def server(self, spec, *, rng):
            raise KeyError("boom")

    text = caught(Crashes, "correctness", unprotected=True, max_examples=5)
    assert "raised KeyError" in text


def test_rejected_messages_leave_no_trace_in_the_round(monkeypatch):
    """A rejected reply must not keep its sender in .included: a server that forgets to drop it is caught."""

    class Forgets(plain_module._PlainServer):
        def receive(self, phase, party, payload):
            try:
                super().receive(phase, party, payload)
            except MessageRejected:
                self._dropped.pop(party, None)
                raise

    text = caught(lambda: _plain_with(Forgets), "malformed_messages", unprotected=True, max_examples=20)
    assert "is not recorded as dropped" in text


# -- a threshold rule that counts k holders of a client's secrets, not k + 1 (issue 18) ---------------


class OldThresholdRule(SecAggPlus):
    """SecAgg+ with the active rule before issue 18, lo = (k + t1) // 2 + 1 (2t > k + t1): it forgets that a
    client holds, and reveals when listed as a survivor, its own b-share. Same degree search, same t1 and t2.

    It also drops the survivor-list quorum (``quorum(n) = 0``: clients count only the t signatures from their
    own neighbourhood, as before the isolation fix), since issue 18's acceptance asks that the old rule's split
    be found end to end; with the quorum, the two lists of a split cannot both carry one."""

    def quorum(self, n):
        return 0

    def _resolve(self, n):
        threat = self.threat_model
        lf = secagg_params._log_factorials(n)
        c, d = threat.corrupt(n), threat.dropouts(n)
        for k in range(2, n - 1, 2):
            if secagg_params._log_disconnect(n, k, c + d) >= secagg_params._LOG_SECURITY:
                continue
            t1 = secagg_params._upper_quantile(lf, n - 1, min(c, n - 1), k, secagg_params._LOG_SECURITY - math.log(n))
            t2 = secagg_params._lower_quantile(lf, n - 1, max(n - d - 1, 0), k,
                                               secagg_params._LOG_CORRECTNESS - math.log(n))
            lo, hi = max((k + t1) // 2 + 1, 2), min(t2, k + 1)
            if lo <= hi:
                return secagg_params.GraphParameters(n, k, lo, False, "2t > k + t1 (issue 18's broken rule)")
        return secagg_params.complete_graph_parameters(n, threat)


@pytest.mark.parametrize("n,degree,t", [(6, 4, 3), (10, 4, 3), (24, 10, 7)])
def test_a_threshold_rule_that_forgets_the_owners_share(n, degree, t):
    """The coalition property finds issue 18's attack end to end: the server and C = ceil(0.1 n) corrupt clients
    split the victim's honest holders over two survivor lists, reconstruct b_v and s_v, and unmask its input."""
    broken = OldThresholdRule(adversary="active")
    assert (broken.parameters(n).degree, broken.parameters(n).threshold) == (degree, t)
    with pytest.raises(ConformanceError) as info:
        check_protocol(lambda: OldThresholdRule(adversary="active"), properties=["coalition"], clients=(n, n))
    text = str(info.value)
    assert info.value.property == "coalition" and "violates 'coalition'" in text
    assert f"n={n}: the server with {-(-n // 10)} corrupt clients" in text
    assert "both secrets checked, input unmasked" in text and "Split(victim=" in text
