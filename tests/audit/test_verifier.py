"""The verifier: every kind of edit fails and names its entry; the round rules; parameter checks; pins."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import securefed as sf
from securefed.audit import verify
from securefed.audit.keys import key_paths
from securefed.audit.verifier import verify_data
from securefed.errors import ConfigurationError, InvalidInput
from tests.audit.helpers import ThresholdPlain, join, lines_of, resign, write_log


def first_entry(res):
    assert not res.ok
    return min(f.entry for f in res.failures)


def test_a_written_log_verifies_and_reports_its_facts(plain_log):
    res = verify(plain_log, key_paths(plain_log)[1])
    assert res.ok, res.summary()
    assert (res.entries, res.rounds, res.aborted, res.last_round, res.complete) == (5, 3, 0, 3, True)
    assert res.epsilon is None and res.ledger == ()
    assert res.head == sf.audit.log.entry_hash(plain_log.read_bytes().splitlines()[-1])
    assert "OK: 5 entries, 3 rounds" in res.summary()


# -- random edits (the demo log with DP is covered in test_trainer_audit.py) ---------------------------

def edit(data: bytes, draw) -> tuple[bytes, int]:
    """A random edit of the log and the entry (line number) where it first differs.

    Flip a byte, delete, swap or duplicate an entry, or (in a log with DP) change a claimed epsilon.
    """
    lines = data.splitlines(keepends=True)
    entries = lines_of(data)
    claims = [i for i, e in enumerate(entries) if e["type"] == "round" and e["body"]["dp"]]
    kind = draw(st.sampled_from(["flip", "delete", "swap", "duplicate"] + (["epsilon"] if claims else [])))
    if kind == "epsilon":  # without the key: the operator's own edits are tested below
        i = draw(st.sampled_from(claims))
        claim = entries[i]["body"]["dp"]["epsilon"]
        entries[i]["body"]["dp"]["epsilon"] = draw(
            st.floats(0, 100, allow_nan=False).filter(lambda x: abs(x - claim) > 1e-6 * claim))
        return join(entries), i + 1
    if kind == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        mask = draw(st.integers(1, 255))
        out = bytearray(data)
        out[pos] ^= mask
        return bytes(out), data[:pos].count(b"\n") + 1
    i = draw(st.integers(0, len(lines) - 1))
    new = list(lines)
    if kind == "delete":
        del new[i]
    elif kind == "swap":
        j = draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i))
        new[i], new[j] = new[j], new[i]
    else:
        new.insert(draw(st.integers(0, len(lines))), lines[i])
    first = next(k for k in range(len(new) + 1) if k >= len(new) or k >= len(lines) or new[k] != lines[k])
    return b"".join(new), first + 1


@given(st.data())
def test_any_single_edit_fails_naming_the_edited_entry(plain_log, data):
    original = plain_log.read_bytes()
    changed, entry = edit(original, data.draw)
    for pin in (None, key_paths(plain_log)[1]):
        res = verify_data(changed, pin)
        assert first_entry(res) == entry, res.summary()


def test_failures_say_entry_field_expected_and_found(plain_log):
    entries = lines_of(plain_log.read_bytes())
    entries[2]["body"]["included"] = [7, 9, 4, 3]  # claim the dropped participant 3 is in the sum
    res = verify_data(join(entries))
    sig = [f for f in res.failures if f.field == "sig"]
    assert sig and sig[0].entry == 3 and sig[0].found == "invalid"
    assert str(sig[0]).startswith("entry 3: sig: expected a valid Ed25519 signature")
    assert any(f.entry == 4 and f.field == "prev" for f in res.failures)  # the chain breaks after it


def test_non_canonical_bytes_of_the_same_entry_fail(plain_log):
    lines = plain_log.read_bytes().splitlines(keepends=True)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None).encode() + b"\n"  # spaces after separators
    res = verify_data(b"".join(lines))
    assert any(f.entry == 2 and f.field == "(encoding)" for f in res.failures)


# -- completeness, torn writes, pins --------------------------------------------------------------------

def test_a_cut_log_fails_unless_a_prefix_is_allowed(plain_log):
    lines = plain_log.read_bytes().splitlines(keepends=True)
    prefix = b"".join(lines[:3])
    res = verify_data(prefix)
    assert [(f.entry, f.field) for f in res.failures] == [(4, "type")]
    assert verify_data(prefix, allow_incomplete=True).ok
    assert not verify_data(prefix, allow_incomplete=True).complete


def test_a_torn_last_line_fails_naming_it(plain_log):
    data = plain_log.read_bytes()
    torn = data + data.splitlines(keepends=True)[1][:40]
    res = verify_data(torn, allow_incomplete=True)
    assert [(f.entry, f.field) for f in res.failures] == [(6, "(line)")]


def test_empty_and_unreadable_logs(tmp_path):
    assert [(f.entry, f.field) for f in verify_data(b"").failures] == [(1, "type")]
    with pytest.raises(InvalidInput):
        verify(tmp_path / "missing.jsonl")


def test_pinned_key_must_match_entry_one(plain_log, tmp_path):
    other = tmp_path / "other.jsonl"
    write_log(other, rounds=1)
    res = verify(plain_log, key_paths(other)[1])
    assert any(f.entry == 1 and f.field == "body.public_key" for f in res.failures)
    assert all(f.found == "invalid" for f in res.failures if f.field == "sig")
    # a whole log forged with another key verifies only without a pin
    forged = resign(lines_of(plain_log.read_bytes()), other)
    forged_entries = lines_of(forged)
    assert not verify_data(forged, key_paths(plain_log)[1]).ok
    assert forged_entries  # sanity: the forgery has entries
    with pytest.raises(ConfigurationError):
        verify(plain_log, "not a key")


def test_head_pin_detects_a_log_cut_after_a_complete_session(tmp_path):
    path = tmp_path / "two.jsonl"
    write_log(path, rounds=2)
    w = sf.audit.AuditWriter(path)
    w.start(config={})
    w.end()
    w.close()
    full = verify(path)
    cut = b"".join(path.read_bytes().splitlines(keepends=True)[:4])  # ends with the first run_end
    assert verify_data(cut).ok  # a complete session: only the head pin tells
    res = verify_data(cut, head=full.head)
    assert [(f.entry, f.field) for f in res.failures] == [(4, "(head)")]


# -- what an operator holding the key could still claim -------------------------------------------------

def resigned_failures(path, mutate):
    entries = lines_of(path.read_bytes())
    mutate(entries)
    res = verify_data(resign(entries, path), key_paths(path)[1])
    return [(f.entry, f.field) for f in res.failures], res


def test_threshold_violating_the_threat_model_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(sf.protocols.REGISTRY, ThresholdPlain.name, ThresholdPlain)
    path = tmp_path / "t.jsonl"
    write_log(path, rounds=2, n=10, protocol=ThresholdPlain(threshold=3, corrupt_fraction=0.2))
    assert verify(path).ok

    def lower(entries):
        entries[2]["body"]["protocol"]["threshold"] = 2  # 2 <= ceil(0.2 * 10)

    found, res = resigned_failures(path, lower)
    assert found == [(3, "body.protocol")]
    assert "threshold 2 <= ceil(gamma n) = 2" in res.failures[0].found


def test_unknown_protocol_and_wrong_phases_fail(plain_log):
    def rename(entries):
        entries[1]["body"]["protocol"]["protocol"] = "rot13"
        entries[2]["body"]["phases"] = ["upload", "extra"]

    found, _ = resigned_failures(plain_log, rename)
    assert (2, "body.protocol.protocol") in found and (3, "body.phases") in found


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # participant 3 dropped in upload (round 2, entry 3) yet claimed in the sum
        (lambda e: e[2]["body"]["included"].append(3), (3, "body.included")),
        # an included participant with no upload on record
        (lambda e: e[1]["body"]["received"].pop(0), (2, "body.received")),
        # a participant neither included nor dropped
        (lambda e: e[2]["body"]["dropped"].clear(), (3, "body.dropped")),
        # a message from someone outside the round
        (lambda e: e[1]["body"]["received"][0].update(party=99), (2, "body.received")),
        # n in the description disagrees with the participants
        (lambda e: e[1]["body"]["protocol"].update(n=5), (2, "body.protocol.n")),
        # fewer survivors than the description's min_survivors
        (lambda e: e[2]["body"]["protocol"].update(min_survivors=4), (3, "body.dropped")),
        # rounds must increase
        (lambda e: e[3]["body"].update(round=2), (4, "body.round")),
        # run_end must match the log
        (lambda e: e[4]["body"].update(rounds=2), (5, "body.rounds")),
        (lambda e: e[4]["body"].update(last_round=4), (5, "body.last_round")),
        (lambda e: e[4]["body"].update(epsilon=0.5), (5, "body.epsilon")),
        # a round outside a session; a second run_start
        (lambda e: e.insert(4, dict(e[4])), (6, "type")),
        (lambda e: e.insert(2, dict(e[0])), (3, "type")),
        # DP events in a log that declares no privacy
        (lambda e: e[1]["body"].update(dp={"events": [], "epsilon": 0.0}), (2, "body.dp")),
        # schema: a drop reason that is not one of the enum
        (lambda e: e[2]["body"]["dropped"][0].update(reason="bored"), (3, "body.dropped.0.reason")),
    ],
)
def test_round_rules_hold_even_against_the_key_holder(plain_log, mutate, expected):
    found, res = resigned_failures(plain_log, mutate)
    assert expected in found, res.summary()


def test_late_drops_after_the_input_phase_are_allowed(tmp_path, monkeypatch):
    class TwoPhase(sf.protocols.Plain):
        """Plain with a no-op confirmation phase after the upload (input_phase is upload)."""

        name = "test-two-phase"
        phases = ("upload", "confirm")
        input_phase = "upload"

    monkeypatch.setitem(sf.protocols.REGISTRY, TwoPhase.name, TwoPhase)
    path = tmp_path / "late.jsonl"
    write_log(path, rounds=1, protocol=sf.protocols.Plain())
    entries = lines_of(path.read_bytes())
    body = entries[1]["body"]
    body["protocol"]["protocol"], body["phases"] = TwoPhase.name, list(TwoPhase.phases)
    body["received"] += [{"party": p, "phase": "confirm", "sha256": "0" * 64, "size": 1} for p in (0, 1, 2)]
    body["dropped"] = [{"participant": 3, "phase": "confirm", "reason": "no_reply", "detail": ""}]
    assert verify_data(resign(entries, path)).ok
    body["dropped"][0]["phase"] = "upload"  # now 3 dropped before its input arrived
    res = verify_data(resign(entries, path))
    assert [(f.entry, f.field) for f in res.failures] == [(2, "body.included")]


@pytest.mark.parametrize("reference", [True, False], ids=["jsonschema", "compiled"])
@pytest.mark.parametrize("reason", ["timeout", "REJECTED", "", None])
def test_a_drop_reason_outside_the_enum_fails(tmp_path, monkeypatch, reason, reference):
    """The reason of a drop is a DropReason value: another string (or its member's name) is refused, even
    signed by the operator's key, with or without jsonschema installed (protocols/audit.md, round entry)."""
    import securefed.audit.log
    from securefed.protocols import DropReason

    if not reference:
        def missing():
            raise ImportError("jsonschema")

        monkeypatch.setattr(securefed.audit.log, "validator", missing)

    path = tmp_path / "reason.jsonl"
    write_log(path, rounds=1, dropouts={1: {3: "upload"}})
    entries = lines_of(path.read_bytes())
    drop = entries[1]["body"]["dropped"][0]
    assert drop["reason"] == DropReason.NO_REPLY.value
    for known in DropReason:  # every value verifies
        drop["reason"] = known.value
        assert verify_data(resign(entries, path)).ok
    drop["reason"] = reason
    res = verify_data(resign(entries, path))
    assert first_entry(res) == 2
    bad = [f for f in res.failures if f.entry == 2]
    assert [f.field for f in bad] == ["body.dropped.0.reason"] and bad[0].found == str(reason).replace("None", "null")
    assert all(r.value in str(bad[0].expected) for r in DropReason)


# -- the privacy spend ---------------------------------------------------------------------------------

def test_epsilon_is_recomputed_from_the_events(dp_log):
    from securefed.privacy.accountant import Accountant

    res = verify(dp_log, key_paths(dp_log)[1])
    assert res.ok, res.summary()
    assert len(res.ledger) == 6 and res.privacy == {"accountant": "rdp", "delta": 1e-5}
    assert res.epsilon == Accountant.from_ledger(res.ledger, accountant="rdp").epsilon(1e-5) > 0


@pytest.mark.parametrize("entry", [2, 4, 7])
@pytest.mark.parametrize("resigned", [False, True])
def test_an_edited_claimed_epsilon_fails_naming_the_entry(dp_log, entry, resigned):
    entries = lines_of(dp_log.read_bytes())
    entries[entry - 1]["body"]["dp"]["epsilon"] *= 0.9
    data = resign(entries, dp_log) if resigned else join(entries)
    res = verify_data(data, key_paths(dp_log)[1])
    eps = [f for f in res.failures if f.field == "body.dp.epsilon"]
    assert [f.entry for f in eps] == [entry]
    assert float(eps[0].found) == entries[entry - 1]["body"]["dp"]["epsilon"]
    assert first_entry(res) == entry
    if resigned:  # the operator holds the key: only the recomputation catches it
        assert [f.field for f in res.failures] == ["body.dp.epsilon"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # weaker noise on record than the claims were computed with
        (lambda e: e[3]["body"]["dp"]["events"][0].update(noise_multiplier=0.9), (4, "body.dp.epsilon")),
        # an event deleted: the claims no longer add up
        (lambda e: e[2]["body"]["dp"]["events"].clear(), (3, "body.dp.epsilon")),
        # an event the accountant cannot compose
        (lambda e: e[2]["body"]["dp"]["events"][0].update(mechanism="laplace"), (3, "body.dp.events")),
        # a round without its DP record in a log that declares privacy
        (lambda e: e[2]["body"].update(dp=None), (3, "body.dp")),
        # a different delta on resume
        (lambda e: e.insert(7, {**e[0], "type": "resume", "body": {
            **{k: v for k, v in e[0]["body"].items() if k != "run_id"},
            "privacy": {"accountant": "rdp", "delta": 1e-3}, "discarded_bytes": 0, "discarded_sha256": None}}),
         (8, "body.privacy")),
        # the final claim
        (lambda e: e[7]["body"].update(epsilon=e[7]["body"]["epsilon"] / 2), (8, "body.epsilon")),
    ],
)
def test_privacy_claims_hold_even_against_the_key_holder(dp_log, mutate, expected):
    found, res = resigned_failures(dp_log, mutate)
    assert expected in found, res.summary()


def test_the_declared_accountant_is_the_one_that_recomputes(tmp_path):
    from securefed.privacy.accountant import Accountant
    from securefed.privacy.events import GaussianEvent

    pld = Accountant("pld")

    def dp(r):  # PLD composition is slow (seconds per event): one unsampled event
        event = GaussianEvent(noise_multiplier=2.0, round=r)
        pld.record(event)
        return [event.to_dict()], pld.epsilon(1e-5)

    path = tmp_path / "pld.jsonl"
    write_log(path, rounds=1, privacy={"accountant": "pld", "delta": 1e-5}, dp=dp)
    res = verify(path)
    assert res.ok and res.accountant == "pld", res.summary()
    assert res.epsilon != Accountant.from_ledger(res.ledger, accountant="rdp").epsilon(1e-5)

    def as_rdp(entries):
        entries[0]["body"]["privacy"]["accountant"] = "rdp"  # the claims were computed with PLD

    found, _ = resigned_failures(path, as_rdp)
    assert found == [(2, "body.dp.epsilon"), (3, "body.epsilon")]


def test_an_empty_sample_round_has_no_parameters_to_check(tmp_path, monkeypatch):
    class AtMostN(ThresholdPlain):
        name = "test-at-most-n"

        @classmethod
        def check_description(cls, desc):
            return [f"threshold {desc['threshold']} > n = {desc['n']}"] if desc["threshold"] > desc["n"] else []

    monkeypatch.setitem(sf.protocols.REGISTRY, AtMostN.name, AtMostN)
    path = tmp_path / "empty.jsonl"
    proto = AtMostN(threshold=3)
    with sf.audit.AuditWriter(path) as w, w.session(config={}):
        w.round_aborted(1, protocol=proto, participants=[],
                        error=sf.errors.ProtocolAborted(sf.errors.AbortReason.NO_INPUTS, "no participant was sampled"))
        w.round_aborted(2, protocol=proto, participants=[0, 1],
                        error=sf.errors.ProtocolAborted(sf.errors.AbortReason.TOO_FEW_SURVIVORS, "one left"))
    res = verify(path)
    assert [(f.entry, f.field, f.found) for f in res.failures] == [(3, "body.protocol", "threshold 3 > n = 2")]


@given(st.data())
def test_any_edit_of_a_dp_log_fails_naming_the_edited_entry(dp_log, data):
    changed, entry = edit(dp_log.read_bytes(), data.draw)
    assert first_entry(verify_data(changed, key_paths(dp_log)[1])) == entry


def test_a_number_beyond_float_range_is_a_failure_not_a_crash(plain_log):
    lines = plain_log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"round":1', b'"round":1e999')
    res = verify_data(b"".join(lines))
    assert (2, "(encoding)") in [(f.entry, f.field) for f in res.failures]


# -- SecAgg and SecAgg+: the real threshold and graph rules --------------------------------------------

@pytest.fixture(scope="module")
def secaggplus_log(tmp_path_factory):
    """Two SecAgg+ rounds of 20 clients (a Harary graph), with drops before and after the masked input."""
    path = tmp_path_factory.mktemp("audit") / "secagg+.jsonl"
    write_log(path, rounds=2, n=20, protocol=sf.protocols.SecAggPlus(corrupt_fraction=0.1, dropout_fraction=0.1),
              dropouts={1: {1: "share_keys"}, 2: {3: "unmasking", 4: "masked_input"}})
    return path


def test_a_secaggplus_log_with_late_dropouts_verifies(secaggplus_log):
    res = verify(secaggplus_log, key_paths(secaggplus_log)[1])
    assert res.ok, res.summary()
    body = lines_of(secaggplus_log.read_bytes())[2]["body"]
    assert body["protocol"]["graph"] == "harary" and 3 in body["included"] and 4 not in body["included"]
    assert {d["participant"]: d["phase"] for d in body["dropped"]} == {3: "unmasking", 4: "masked_input"}


def test_secaggplus_threshold_below_the_threat_model_fails(secaggplus_log):
    entries = lines_of(secaggplus_log.read_bytes())
    desc = entries[1]["body"]["protocol"]
    assert sf.protocols.SecAggPlus.check_description(desc) == []

    def lower(entries):  # the operator claims a smaller threshold, consistently everywhere
        d = entries[1]["body"]["protocol"]
        d["threshold"] = d["min_survivors"] = 1

    found, res = resigned_failures(secaggplus_log, lower)
    assert found and set(found) == {(2, "body.protocol")}, res.summary()
    assert all(f.expected == "parameters meeting the conditions of secagg+" for f in res.failures)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(degree=2),  # too few neighbours for the corrupt and dropout fractions
        lambda d: d.update(corrupt_fraction=0.5, dropout_fraction=0.5),  # infeasible for SecAgg+
        lambda d: d.update(modulus_bits=4),  # the sum can wrap
    ],
)
def test_secaggplus_graph_and_modulus_rules_are_checked(secaggplus_log, mutate):
    found, res = resigned_failures(secaggplus_log, lambda e: mutate(e[1]["body"]["protocol"]))
    assert (2, "body.protocol") in found, res.summary()


def test_a_secagg_client_missing_from_a_phase_before_its_input_fails(secaggplus_log):
    def forget(entries):  # participant 0 is in the sum, but its share_keys message is not on record
        body = entries[1]["body"]
        body["received"] = [m for m in body["received"] if not (m["party"] == 0 and m["phase"] == "share_keys")]

    found, res = resigned_failures(secaggplus_log, forget)
    assert found == [(2, "body.received")], res.summary()
    assert "included participant 0 in share_keys" in res.failures[0].expected
