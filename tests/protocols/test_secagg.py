"""SecAgg and SecAgg+ (protocols/secagg.md): correctness under every dropout pattern, what the server
sees, strict wire format, streaming memory, client state dumps, configuration."""

import tracemalloc

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

import securefed as sf
from securefed.crypto import aead, kex, shamir
from securefed.crypto.random import RandomSource
from securefed.encoding import FixedPoint, packed_size
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
)
from securefed.protocols import wire
from securefed.protocols.base import RoundSpec
from securefed.protocols.secagg import PHASES, SecAgg, SecAggPlus
from securefed.protocols.secagg import wire as W
from securefed.protocols.secagg.graph import MaskingGraph
from securefed.protocols.secagg.packed import column_pack, column_unpack
from securefed.protocols.secagg.round import MASKED_INPUT
from securefed.protocols.wire import HEADER_SIZE
from securefed.testing.adversary import run_round


def session_of(seed):
    """The session id simulate_aggregation derives from `seed` (the Harary graph depends on it)."""
    return RandomSource(seed).child("session").token_bytes(32)


def expected_outcome(protocol, n, drop_at, seed):
    """Independent model of who ends up in the sum, or None when the round must abort.

    drop_at[c] = index of the first phase in which c is silent. Clients refuse to share
    or mask with fewer than t live holders in their closed neighbourhood; the server
    aborts before unmasking unless every needed secret keeps t holders.
    """
    p = protocol.parameters(n)
    t = p.threshold
    g = (MaskingGraph.complete_graph(n) if p.complete else MaskingGraph.harary(n, p.degree, session_of(seed)))
    nb = {u: set(g.closed_neighborhood(u).tolist()) for u in range(n)}
    alive = lambda u, phase: drop_at.get(u, 9) > phase
    u1 = {u for u in range(n) if alive(u, 0)}
    if len(u1) < t:
        return None
    u2 = {u for u in u1 if alive(u, 1) and len(nb[u] & u1) >= t}
    if len(u2) < t:
        return None
    u3 = {u for u in u2 if alive(u, 2) and len(nb[u] & u2) >= t}
    if len(u3) < t:
        return None
    active = protocol.threat_model.adversary == "active"
    if active:
        responders = {u for u in u3 if alive(u, 3) and len(nb[u] & u3) >= t}
        if len(responders) < t:
            return None
    else:
        responders = u3
    targets = u3 | {v for v in u2 - u3 if nb[v] & u3 - {v}}
    if any(len(nb[v] & responders) < t for v in targets):
        return None
    final = {u for u in responders if alive(u, 4)}
    if len(final) < t or any(len(nb[v] & final) < t for v in targets):
        return None
    return tuple(sorted(u3))


PROTOCOLS = {
    "secagg": lambda: SecAgg(),
    "secagg+": lambda: SecAggPlus(),
    "secagg-active": lambda: SecAgg(adversary="active"),
    "secagg+-active": lambda: SecAggPlus(adversary="active"),
}


def _dropouts(data, n):
    rate = data.draw(st.sampled_from([0.0, 0.05, 0.15, 0.3, 0.7]), label="dropout rate")
    drops = {}
    for c in range(n):
        if data.draw(st.floats(0, 1), label=f"u{c}") < rate:
            drops[c] = data.draw(st.sampled_from(PHASES), label=f"phase{c}")
    return drops


@pytest.mark.parametrize("kind", list(PROTOCOLS))
@settings(max_examples=20)
@given(data=st.data())
def test_sum_of_included_within_bound_for_every_dropout_set_else_abort(kind, data):
    protocol = PROTOCOLS[kind]()
    active = kind.endswith("active")
    n = data.draw(st.integers(5, 24) if active else st.integers(3, 60), label="n")
    dim = data.draw(st.integers(1, 24), label="dim")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    xs = np.random.default_rng(seed).uniform(-1, 1, size=(n, dim))
    xs[: n // 3] = np.sign(xs[: n // 3])  # the range's ends, where wrap-around would show first
    drops = _dropouts(data, n)
    expected = expected_outcome(protocol, n, {c: PHASES.index(p) for c, p in drops.items()}, seed)
    if expected is None:
        with pytest.raises(ProtocolAborted) as e:
            sf.simulate_aggregation(protocol, list(xs), drops, seed=seed)
        assert e.value.reason is AbortReason.TOO_FEW_SURVIVORS
        return
    res = sf.simulate_aggregation(protocol, list(xs), drops, seed=seed)
    assert res.included == expected
    assert set(range(n)) - set(expected) <= set(res.dropped)
    assert set(res.dropped) & set(expected) == {c for c in expected if PHASES.index(drops.get(c, "unmasking")) >= 3
                                                and c in drops}
    exact = xs[list(res.included)].sum(axis=0)
    assert res.total.dtype == np.float64 and res.total.shape == (dim,)
    assert np.all(np.abs(res.total - exact) <= protocol.error_bound(n))


@pytest.mark.parametrize("protocol", [SecAgg(), SecAggPlus()], ids=["secagg", "secagg+"])
def test_each_dropout_phase_named_in_the_issue(protocol):
    n, dim = 12, 7
    xs = [np.linspace(-1, 1, dim) * (i % 3 - 1) for i in range(n)]
    t = protocol.min_survivors(n)
    cases = {
        "before keys: excluded": {0: "advertise_keys"},
        "after keys, before shares": {0: "share_keys"},
        "after shares, before masked input: masks removed": {0: "masked_input", 5: "masked_input"},
        "after masked input: included": {0: "consistency_check"},
        "during unmasking": {0: "unmasking", 1: "unmasking"},
    }
    for name, drops in cases.items():
        res = sf.simulate_aggregation(protocol, xs, drops, seed=7)
        gone = {c for c, p in drops.items() if PHASES.index(p) <= 2}
        assert res.included == tuple(c for c in range(n) if c not in gone), name
        np.testing.assert_allclose(res.total, np.sum([xs[c] for c in res.included], axis=0),
                                   atol=protocol.error_bound(n), err_msg=name)
    with pytest.raises(ProtocolAborted) as e:  # fewer than t survivors
        sf.simulate_aggregation(protocol, xs, dict.fromkeys(range(n - t + 1), "masked_input"), seed=7)
    assert e.value.reason is AbortReason.TOO_FEW_SURVIVORS


def test_abort_before_unmasking_reveals_no_share():
    protocol = SecAgg(threshold=6, dropout_fraction=0.4)
    xs = [np.ones(4) * 0.5] * 10
    run = run_round(protocol, xs, dropouts=dict.fromkeys(range(5), "masked_input"), seed=2)
    assert run.aborted is not None and run.aborted.reason is AbortReason.TOO_FEW_SURVIVORS
    assert not [d for d in run.deliveries if d.phase == "unmasking"]


def _uniform_chi2(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_server_view_of_masked_input_is_uniform_and_never_the_quantized_input():
    from scipy.stats import chi2

    n, dim = 8, 8192
    enc = FixedPoint(value_range=1.0, value_bits=16)
    q = np.arange(dim) % 64 - 32  # exactly representable: rounding is deterministic
    x = q / enc.scale
    protocol = SecAggPlus(encoder=enc)
    res = sf.simulate_aggregation(protocol, [x] * n, {3: "unmasking"}, seed=11)
    k = enc.modulus_bits(n)
    quantized = (q.astype(np.int64) % (1 << k)).astype(np.uint32)
    clear = column_pack(quantized, k)  # as a masked input would carry it unmasked
    critical = chi2.isf(1e-6, 255)
    assert _uniform_chi2(clear[:-1]) > critical  # the test can fail: the plain encoding is far from uniform
    masked = [m for c, ph, m in res.server_view.messages if ph == "masked_input"]
    assert len(masked) == n
    for m in masked:
        body = m[HEADER_SIZE:]
        assert len(body) == packed_size(dim, k)  # bit-packed at the modulus width, not int64
        assert _uniform_chi2(body[:-1]) < critical
        assert int((column_unpack(body, k, dim) == quantized).sum()) <= 3  # expected dim / 2^k ~ 0.02
    for _, _, m in res.server_view.messages:
        assert clear[1000:1032] not in m


def _advertised(run, v):
    reply = run.outcomes("advertise_keys", v)[0].reply
    return reply[HEADER_SIZE : HEADER_SIZE + 32], reply[HEADER_SIZE + 32 : HEADER_SIZE + 64]


def test_shares_in_the_server_view_are_aes_gcm_ciphertexts_of_the_clients_shares():
    protocol = SecAgg()
    run = run_round(protocol, [np.full(3, 0.25)] * 6, seed=4)
    spec = run.spec
    seen = b"".join(d.reply for d in run.deliveries if d.reply is not None and d.phase != "unmasking")
    seen += b"".join(d.request for d in run.deliveries)
    checked = 0
    for d in run.deliveries:
        if d.phase != "share_keys":
            continue
        u = d.party
        ids, sealed = W.parse_records(memoryview(d.reply)[HEADER_SIZE + W.COMMIT :], W.SEALED)
        for i, v in enumerate(ids.tolist()):
            blob = sealed[i].tobytes()
            # the key is the X25519 agreement of u's channel key with v's advertised one, bound to the
            # tag, session and round (protocols/secagg.md, derivations) ...
            ctx = b"SFSA" + spec.session_id + spec.round_index.to_bytes(4, "big")
            key = kex.agree(kex.load_private_key(run.clients[u].data.c_sk), _advertised(run, v)[0],
                            label="secagg/channel", session_id=ctx, party_a=u, party_b=v)
            ad = aead.associated_data(purpose="secagg/shares", session_id=spec.session_id,
                                      round_index=spec.round_index, sender=u, recipient=v)
            # ... and standard AES-GCM opens it to the shares v holds for u
            plain = AESGCM(key).decrypt(blob[:12], blob[12:], ad)
            assert plain == run.clients[v].data.held[u]
            assert plain[:36] not in seen and plain[36:] not in seen  # never in the clear before unmasking
            checked += 1
    assert checked == 6 * 5


@settings(max_examples=25)
@given(st.data())
def test_tampering_any_byte_of_a_share_makes_the_recipient_reject(data):
    protocol = SecAgg()
    n = 5
    spec = RoundSpec(n=n, dim=3, session_id=bytes(range(32)))
    server = protocol.server(spec, rng=RandomSource(0))
    clients = [protocol.client(spec, i, np.zeros(3), rng=RandomSource(i + 1)) for i in range(n)]
    for phase in PHASES[:2]:
        for u, req in server.requests(phase).items():
            server.receive(phase, u, clients[u].handle(phase, req))
        server.finish_phase(phase)
    reqs = server.requests("masked_input")
    target = data.draw(st.integers(0, n - 1))
    msg = bytearray(reqs[target])
    count = n - 1
    entry = data.draw(st.integers(0, count - 1))
    pos = HEADER_SIZE + 4 + entry * (4 + W.SEALED) + 4 + data.draw(st.integers(0, W.SEALED - 1))
    msg[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(MessageRejected, match="^invalid"):
        clients[target].handle("masked_input", bytes(msg))
    with pytest.raises(ProtocolAborted):  # and it reveals nothing afterwards
        clients[target].handle("masked_input", reqs[target])


def _drive(protocol, xs, seed=0, junk=None):
    """Run a round by hand; ``junk(phase, party, reply)`` may return a message to send instead."""
    n = len(xs)
    spec = RoundSpec(n=n, dim=xs[0].size, session_id=RandomSource(seed).token_bytes(32))
    server = protocol.server(spec, rng=RandomSource(0))
    clients = [protocol.client(spec, i, xs[i], rng=RandomSource(seed + i + 1)) for i in range(n)]
    for phase in PHASES:
        for u, req in server.requests(phase).items():
            reply = clients[u].handle(phase, req)
            bad = None if junk is None else junk(phase, u, reply)
            if bad is None:
                server.receive(phase, u, reply)
            else:
                with pytest.raises(MessageRejected):
                    server.receive(phase, u, bad)
                with pytest.raises(MessageRejected):  # its sender is out of the round now
                    server.receive(phase, u, reply)
        server.finish_phase(phase)
    return server.result(), server.dropped


def _variants(reply):
    other = bytearray(reply)
    other[10] ^= 1  # another round index
    padded = bytearray(reply)
    padded[-1] |= 0x80  # 50 values x 19 bits = 950 bits: the last 2 bits of the last byte are padding
    return {"truncated": reply[:-1], "extended": reply + b"\x00", "other round": bytes(other),
            "empty": b"", "header only": reply[:HEADER_SIZE], "padding": bytes(padded)}


@pytest.mark.parametrize(
    "phase,variant",
    [(phase, v) for phase in ("share_keys", "masked_input", "unmasking")
     for v in ("truncated", "extended", "other round", "empty", "header only")] + [("masked_input", "padding")],
)
def test_server_parses_strictly_and_a_rejected_message_leaves_the_sum_untouched(phase, variant):
    protocol = SecAggPlus()
    xs = [np.linspace(-1, 1, 50) * (i / 7) for i in range(7)]
    (total, included), dropped = _drive(
        protocol, xs, junk=lambda ph, u, reply: _variants(reply)[variant] if (ph, u) == (phase, 3) else None)
    assert dropped[3].reason is sf.protocols.DropReason.REJECTED and dropped[3].phase == phase
    assert included == ((0, 1, 2, 4, 5, 6) if phase != "unmasking" else tuple(range(7)))
    np.testing.assert_allclose(total, np.sum([xs[i] for i in included], axis=0), atol=protocol.error_bound(7))


def _other_ids(reply, first, size, how):
    """`reply` with its record list (ids from byte `first`, records of `size` bytes) naming other clients."""
    out = bytearray(reply)
    if how == "foreign id":
        out[first : first + 4] = (0xFFFFFFFE).to_bytes(4, "big")
    else:  # the same clients, the first two records swapped
        a, b = slice(first, first + size), slice(first + size, first + 2 * size)
        out[a], out[b] = reply[b], reply[a]
    return bytes(out)


@pytest.mark.parametrize("protocol", [SecAgg(), SecAggPlus()], ids=["complete", "harary"])
@pytest.mark.parametrize("phase", ["share_keys", "unmasking"])
@pytest.mark.parametrize("how", ["foreign id", "swapped"])
def test_a_reply_listing_other_clients_than_expected_is_rejected(protocol, phase, how):
    xs = [np.linspace(-1, 1, 40) * (i / 9) for i in range(9)]
    first, size = ((HEADER_SIZE + W.COMMIT + 4, 4 + W.SEALED) if phase == "share_keys"
                   else (HEADER_SIZE + 4, 4 + W.SHARE))
    (total, included), dropped = _drive(
        protocol, xs, junk=lambda ph, u, reply: _other_ids(reply, first, size, how) if (ph, u) == (phase, 3) else None)
    assert dropped[3].reason is sf.protocols.DropReason.REJECTED and "wrong set of clients" in dropped[3].detail
    assert included == (tuple(i for i in range(9) if i != 3) if phase == "share_keys" else tuple(range(9)))
    np.testing.assert_allclose(total, np.sum([xs[i] for i in included], axis=0), atol=protocol.error_bound(9))


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12, unique=True).map(sorted), st.data())
def test_a_record_list_is_checked_against_all_but_one_of_a_shared_list(ids, data):
    """Expected.all_but (one list of everyone for the complete graph): exactly the other ids, in order."""
    i = data.draw(st.integers(0, len(ids) - 1))
    expect = W.Expected.all_but(W.Expected(np.array(ids, dtype=np.int64)), i)
    others = ids[:i] + ids[i + 1 :]
    assert expect.ids.tolist() == others
    body = lambda listed: memoryview(W.records([(v, bytes(W.SEALED)) for v in listed]))
    W.check_list(body(others), W.SEALED, expect)
    wrong = [ids, [ids[i]]]  # the skipped id listed too, or alone
    if others:
        gone = data.draw(st.sampled_from(others))
        wrong.append([v for v in others if v != gone])  # one missing
    if len(others) > 1:
        wrong.append(others[::-1])
    for listed in wrong:
        with pytest.raises(MessageRejected):
            W.check_list(body(listed), W.SEALED, expect)


@pytest.mark.parametrize("word", [shamir.PRIME, 0xFFFFFFFF])
def test_an_unmasking_share_at_or_above_the_prime_is_rejected_on_arrival(word):
    xs = [np.linspace(-1, 1, 40) * (i / 9) for i in range(9)]

    def junk(phase, u, reply):
        if (phase, u) != ("unmasking", 3):
            return None
        bad = bytearray(reply)
        at = HEADER_SIZE + 4 + (4 + W.SHARE) + 4 + 4 * 5  # the 6th word of the second record's share
        bad[at : at + 4] = word.to_bytes(4, "little")
        return bytes(bad)

    (total, included), dropped = _drive(SecAgg(), xs, junk=junk)
    assert dropped[3].reason is sf.protocols.DropReason.REJECTED and dropped[3].detail == "invalid share"
    assert included == tuple(range(9))  # its masked input was in; its shares are simply not used
    np.testing.assert_allclose(total, np.sum(xs, axis=0), atol=SecAgg().error_bound(9))


@pytest.mark.parametrize("gone", [(), (2,), (0, 5)])
def test_complete_graph_routing_of_sealed_shares_is_the_general_routing(gone):
    """The server's compiled routing for the complete graph forwards exactly what the general
    (sorted) routing does, also when some advertisers never shared their keys."""
    protocol, n = SecAgg(), 8
    spec = RoundSpec(n=n, dim=5, session_id=bytes(range(32)))
    server = protocol.server(spec, rng=RandomSource(0))
    clients = [protocol.client(spec, i, np.zeros(5), rng=RandomSource(i + 1)) for i in range(n)]
    for phase in PHASES[:2]:
        for u, req in server.requests(phase).items():
            reply = clients[u].handle(phase, req)
            if not (phase == "share_keys" and u in gone):
                server.receive(phase, u, reply)
        server.finish_phase(phase)
    senders = sorted(server._shares)
    assert senders == [i for i in range(n) if i not in gone]
    general = [(count, b"".join(pieces)) for count, pieces in server._route(senders)]
    count = W.list_header(len(senders) - 1)
    assert general == [(len(senders) - 1, count + row.tobytes()) for row in server._route_complete(senders)]
    assert all(len(body) == 4 + (len(senders) - 1) * (4 + W.SEALED) for _, body in general)
    # and the requests carry them behind one header
    requests = server._masked_requests()
    assert sorted(requests) == senders
    for u, (_, body) in zip(senders, general):
        assert requests[u] == server.round.message(MASKED_INPUT, wire.SERVER, body)


@pytest.mark.parametrize("protocol", [SecAgg(), SecAggPlus(), SecAgg(adversary="active")],
                         ids=["complete", "harary", "active"])
def test_share_keys_request_lists_the_recipient_and_its_own_record_must_be_intact(protocol):
    """Each client gets the records of its closed neighbourhood, its own as it sent it (on the
    complete graph one message for all, the paper's broadcast); a request that drops or alters the
    recipient's own record is rejected."""
    n = 9
    spec = RoundSpec(n=n, dim=5, session_id=bytes(range(32)))
    rnd = protocol._round(spec)
    server = protocol.server(spec, rng=RandomSource(0))
    clients = [protocol.client(spec, i, np.zeros(5), rng=RandomSource(i + 1)) for i in range(n)]
    advertised = {}
    for u, req in server.requests("advertise_keys").items():
        advertised[u] = rnd.body(clients[u].handle("advertise_keys", req), 0, u).tobytes()
        server.receive("advertise_keys", u, rnd.message(0, u, advertised[u]))
    server.finish_phase("advertise_keys")
    reqs = server.requests("share_keys")
    rec = len(advertised[0])
    for u, req in reqs.items():
        ids, rows = W.parse_records(rnd.body(req, 1, wire.SERVER), rec)
        assert ids.tolist() == rnd.graph.closed_neighborhood(u).tolist()
        assert rows[ids.tolist().index(u)].tobytes() == advertised[u]
    if rnd.graph.complete:
        assert len(set(reqs.values())) == 1
    u = 4
    ids, rows = W.parse_records(rnd.body(reqs[u], 1, wire.SERVER), rec)
    entries = [(v, rows[i].tobytes()) for i, v in enumerate(ids.tolist())]
    mine = ids.tolist().index(u)
    altered = bytearray(entries[mine][1])
    altered[5] ^= 1  # another c_pk, its check recomputed as a malicious server would (active: the signature fails)
    keys = bytes(altered[: -W.CHECK])
    forged = list(entries)
    forged[mine] = (u, keys + W.key_check(u, keys))
    altered_why = "invalid signature" if rnd.active else "own advertised keys were altered"
    for bad, why in ((forged, altered_why), ([e for e in entries if e[0] != u], "own advertised keys are missing")):
        c = protocol.client(spec, u, np.zeros(5), rng=RandomSource(u + 1))
        c.handle("advertise_keys", rnd.message(0, wire.SERVER, b""))
        with pytest.raises(MessageRejected, match=why):
            c.handle("share_keys", rnd.message(1, wire.SERVER, W.records(bad)))


def test_replay_and_out_of_phase_messages_are_rejected():
    protocol = SecAgg()
    spec = RoundSpec(n=3, dim=2, session_id=bytes(32))
    server = protocol.server(spec, rng=RandomSource(0))
    c = [protocol.client(spec, i, np.zeros(2), rng=RandomSource(i)) for i in range(3)]
    reqs = server.requests("advertise_keys")
    reply = c[0].handle("advertise_keys", reqs[0])
    server.receive("advertise_keys", 0, reply)
    with pytest.raises(MessageRejected):
        server.receive("advertise_keys", 0, reply)  # replay
    with pytest.raises(MessageRejected):
        server.receive("share_keys", 1, reply)  # out of phase
    with pytest.raises(MessageRejected):
        c[1].handle("share_keys", reqs[1])  # a client out of phase
    other = SecAgg().server(RoundSpec(n=3, dim=2, session_id=b"\x01" * 32), rng=RandomSource(0))
    other.requests("advertise_keys")
    with pytest.raises(MessageRejected):
        other.receive("advertise_keys", 0, c[2].handle("advertise_keys", reqs[2]))  # another session
    with pytest.raises(MessageRejected):
        SecAggPlus().client(spec, 0, rng=RandomSource(0)).handle("advertise_keys", reqs[0])  # another protocol


def test_server_memory_is_one_accumulator_not_one_vector_per_client():
    dim = 1 << 16
    vector = 4 * dim  # one uint32 vector
    retained, peak = {}, {}
    for n in (6, 24):
        protocol = SecAggPlus(value_bits=12)
        spec = RoundSpec(n=n, dim=dim, session_id=bytes(32))
        clients = [protocol.client(spec, i, np.full(dim, 0.5), rng=RandomSource(i)) for i in range(n)]
        sf.simulate_aggregation(protocol, [np.zeros(64)] * n, seed=1)  # compile the kernels before measuring
        tracemalloc.start()
        retained[n], peak[n] = 0, 0

        def server_call(f, *args):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            out = f(*args)
            now, top = tracemalloc.get_traced_memory()
            retained[n] += now - before
            peak[n] = max(peak[n], top - before)
            return out

        server = server_call(lambda: protocol.server(spec, rng=RandomSource(0)))
        for phase in PHASES:
            for u, req in server_call(server.requests, phase).items():
                reply = clients[u].handle(phase, req)
                server_call(server.receive, phase, u, reply)
                del reply
            server_call(server.finish_phase, phase)
        tracemalloc.stop()
        total, included = server.result()
        np.testing.assert_allclose(total, 0.5 * n, atol=protocol.error_bound(n))
    # the accumulator (1 vector) and the float64 result (2) stay ...
    assert max(retained.values()) < 4 * vector
    assert max(peak.values()) < 4 * vector
    # ... and each extra client costs O(degree) small state (keys, shares), not a vector
    assert (retained[24] - retained[6]) / 18 < vector / 16


@pytest.mark.parametrize("kind", ["secagg", "secagg+-active"])
def test_client_state_dumped_and_restored_between_every_phase_gives_the_same_round(kind):
    protocol = PROTOCOLS[kind]()
    n = 9
    xs = [np.linspace(-0.5, 0.5, 6) * i / n for i in range(n)]
    spec = RoundSpec(n=n, dim=6, session_id=bytes(range(32)))

    def run(restore):
        server = protocol.server(spec, rng=RandomSource(0))
        states = {i: protocol.client(spec, i, xs[i], rng=RandomSource(i)) for i in range(n)}
        for phase in PHASES:
            for u, req in server.requests(phase).items():
                c = states[u]
                if restore:
                    blob = c.dump()
                    assert isinstance(blob, bytes)
                    c = protocol.load_client(blob, rng=RandomSource(100 + u))
                server.receive(phase, u, c.handle(phase, req))
                states[u] = c
            server.finish_phase(phase)
        return server.result()

    (t1, i1), (t2, i2) = run(False), run(True)
    assert i1 == i2 == tuple(range(n))
    np.testing.assert_allclose(t1, t2, atol=2 * protocol.error_bound(n))
    np.testing.assert_allclose(t2, np.sum(xs, axis=0), atol=protocol.error_bound(n))


def test_malformed_or_foreign_client_state_is_refused():
    protocol = SecAgg()
    spec = RoundSpec(n=4, dim=3, session_id=bytes(32))
    blob = protocol.client(spec, 1, np.zeros(3), rng=RandomSource(0)).dump()
    protocol.load_client(blob, rng=RandomSource(1))
    for bad in (blob[:-1], blob + b"\x00", b"XXXX" + blob[4:], b""):
        with pytest.raises(MessageRejected):
            protocol.load_client(bad, rng=RandomSource(1))
    with pytest.raises(MessageRejected):
        SecAggPlus().load_client(blob, rng=RandomSource(1))
    with pytest.raises(ConfigurationError):
        SecAgg(threshold=3).load_client(blob, rng=RandomSource(1))


@pytest.mark.parametrize("value_bits,uint", [(16, np.uint32), (30, np.uint32), (40, np.uint64), (58, np.uint64)])
def test_modulus_widths_up_to_64_bits(value_bits, uint):
    enc = FixedPoint(value_range=3.0, value_bits=min(value_bits, 53))
    protocol = SecAggPlus(encoder=enc)
    xs = [np.linspace(-3, 3, 11) * (1 if i % 2 else -1) for i in range(11)]
    xs[0][:] = 3.0
    res = sf.simulate_aggregation(protocol, xs, {4: "masked_input"}, seed=5)
    assert protocol._round(res.spec).dtype == (np.uint32 if enc.modulus_bits(11) <= 32 else np.uint64)
    np.testing.assert_allclose(res.total, np.sum([xs[i] for i in res.included], axis=0),
                               atol=protocol.error_bound(11))


@pytest.mark.parametrize(
    "inputs",
    [[np.array([0.5, np.nan])] * 3, [np.array([0.5, 1.5])] * 3, [np.ones(3) * 0.1, np.ones(4) * 0.1, np.ones(3)],
     [np.ones((2, 2)) * 0.1] * 3, [np.array([1, 0])] * 3],
)
def test_bad_inputs_raise_invalid_input(inputs):
    with pytest.raises(InvalidInput):
        sf.simulate_aggregation(SecAgg(), inputs)


def test_threshold_and_degree_overrides_are_checked_against_the_threat_model():
    assert SecAgg().min_survivors(30) == 4  # C = ceil(0.1 * 30) = 3 exactly, not 4
    assert SecAgg(threshold=0.5).min_survivors(30) == 15
    assert SecAgg(adversary="active").min_survivors(30) == 18  # > ceil((30 + 3) / 2) = 17
    with pytest.raises(ConfigurationError):
        SecAgg(threshold=3).min_survivors(30)  # semi-honest needs t > 3
    with pytest.raises(ConfigurationError):
        SecAgg(threshold=28).min_survivors(30)  # liveness: t <= 30 - 3
    with pytest.raises(ConfigurationError):
        SecAgg(adversary="active", threshold=17).min_survivors(30)
    with pytest.raises(ConfigurationError):
        SecAggPlus(corrupt_fraction=0.5, dropout_fraction=0.45)
    with pytest.raises(ConfigurationError):
        SecAggPlus(degree=3)
    p = SecAggPlus().parameters(1000)
    with pytest.raises(ConfigurationError):
        SecAggPlus(degree=p.degree - 2, threshold=p.threshold).parameters(1000)
    with pytest.raises(ConfigurationError):
        SecAggPlus(threshold=p.threshold - 1, degree=p.degree).parameters(1000)
    assert SecAggPlus(degree=p.degree + 10).parameters(1000).degree == p.degree + 10
    params = SecAggPlus(threshold=0.5).parameters(1000)
    assert params.threshold >= 0.5 * (params.degree + 1)
    with pytest.raises(ConfigurationError):
        SecAgg(value_bits=16, encoder=FixedPoint(value_range=1.0, value_bits=16))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigurationError):
            SecAgg(threshold=bad)
    with pytest.raises(ConfigurationError):
        SecAgg(adversary="malicious")


@pytest.mark.parametrize("protocol", [SecAgg(), SecAggPlus(), SecAggPlus(adversary="active")],
                         ids=["secagg", "secagg+", "secagg+-active"])
def test_describe_records_the_parameters_and_check_description_audits_them(protocol):
    for n in (10, 100, 1000):
        desc = protocol.describe(n)
        assert desc["protocol"] == protocol.name and desc["threshold"] == protocol.parameters(n).threshold
        assert desc["min_survivors"] == protocol.min_survivors(n) == max(desc["threshold"], desc["survivor_quorum"])
        assert type(protocol).check_description(dict(desc, survivor_quorum=0)) or not desc["survivor_quorum"]
        assert desc["modulus_bits"] == 16 + int(np.ceil(np.log2(n)))
        assert desc["threshold_justification"] and desc["adversary"] == protocol.threat_model.adversary
        assert type(protocol).check_description(desc) == []
        weak = dict(desc, threshold=1)
        assert type(protocol).check_description(weak)
        assert type(protocol).check_description(dict(desc, modulus_bits=16))
        assert type(protocol).check_description(dict(desc, corrupt_fraction=0.6))
        assert type(protocol).check_description({"n": n})
    assert sf.protocols.REGISTRY[protocol.name] is type(protocol)


def test_with_encoder_carries_another_encoder_and_keeps_parameters():
    base = SecAggPlus()
    enc = FixedPoint(value_range=8.0, value_bits=20)
    other = base.with_encoder(enc)
    assert other is not base and other.encoder is enc and base.encoder is not enc
    assert other.parameters(50) == base.parameters(50)
    xs = [np.full(4, 7.5)] * 5
    res = sf.simulate_aggregation(other, xs, seed=1)
    np.testing.assert_allclose(res.total, 37.5, atol=other.error_bound(5))
    with pytest.raises(ConfigurationError):
        base.with_encoder(object())
    with pytest.raises(InvalidInput):
        sf.simulate_aggregation(base, xs, seed=1)  # 7.5 is outside the default range [-1, 1]


def test_unmasking_reply_has_one_share_per_peer_b_for_survivors_key_for_dropouts():
    run = run_round(SecAgg(), [np.zeros(2)] * 6, dropouts={2: "masked_input"}, seed=3)
    assert run.result is not None and run.result[1] == (0, 1, 3, 4, 5)
    reply = run.outcomes("unmasking", 0)[0].reply
    ids, shares = W.parse_records(memoryview(reply)[HEADER_SIZE:], W.SHARE)
    assert ids.tolist() == [0, 1, 2, 3, 4, 5]
    held = run.clients[0].data.held
    for i, v in enumerate(ids.tolist()):
        share = shares[i].tobytes()
        assert share == (held[v][W.SHARE :] if v == 2 else held[v][: W.SHARE])


@given(n=st.integers(1, 40), data=st.data())
@settings(max_examples=50, deadline=None)
def test_the_public_readers_give_back_what_the_writers_wrote(n, data):
    # wire.body and W.split_bitmap are what the testing kit's adversaries parse with.
    members = sorted(data.draw(st.sets(st.integers(0, n - 1))))
    rest = data.draw(st.binary(max_size=20))
    got, after = W.split_bitmap(W.bitmap(members, n) + rest, n)
    assert got.tolist() == members and bytes(after) == rest
    with pytest.raises(MessageRejected, match="truncated"):
        W.split_bitmap(W.bitmap(members, n)[:-1], n)
    message = wire.pack_header(b"SFSA", 5, 0, 0, bytes(32), 1, len(rest)) + rest
    assert wire.body(message) == rest
