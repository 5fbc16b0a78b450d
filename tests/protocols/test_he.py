"""CKKS and BFV aggregation (securefed/protocols/he/scheme.py): each test names the lemma of proofs/he.md it checks.

TenSEAL encryption costs ~10 ms per ciphertext, so dimensions stay small except in the
explicit d = 10^5 examples the acceptance asks for; contexts made only for tests are
module-level fixtures.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import tenseal as ts
from hypothesis import example, given, settings
from hypothesis import strategies as st

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.encoding import FixedPoint, IntegerEncoder, storage_dtype
from securefed.errors import (
    AbortReason,
    ConfigurationError,
    InvalidInput,
    MessageRejected,
    ProtocolAborted,
)
from securefed.protocols import wire as header
from securefed.protocols.base import RoundSpec
from securefed.protocols.he import BFV, CKKS, params, parties, wire
from securefed.protocols.he import tenseal as backend

PHASES = ("setup", "keys", "upload", "decrypt")
UPLOAD = PHASES.index("upload")
PAYLOAD = header.HEADER_SIZE + wire.CHECK_BYTES  # where a message's payload starts


class Integers(IntegerEncoder):
    """Integer-valued inputs carried exactly at `bits` bits: BFV must return their exact sum."""

    def __init__(self, bits: int = 24) -> None:
        self.bits = bits

    def modulus_bits(self, n):
        return self.bits

    def encode(self, x, *, n, rng):
        q = x.astype(np.int64)
        assert (q == x).all()
        return (q.astype(np.uint64) & np.uint64((1 << self.bits) - 1)).astype(storage_dtype(self.bits))

    def decode(self, s, *, n, count):
        v = s.astype(np.int64)
        return np.where(v >= 1 << (self.bits - 1), v - (1 << self.bits), v).astype(np.float64)

    def error_bound(self, n):
        return 0.0


held = {}  # party -> the last secret key it held in the latest drive()


def drive(protocol, xs, *, dropouts=None, seed=0, on_reply=None, restore=False):
    """simulate_aggregation's loop, exposing the parties, every request and reply, and a reply hook.

    ``restore=True`` saves and restores every party before each message it handles (as Flower does).
    A key holder forgets its key when it decrypts: ``held[who]`` keeps the last key each party held.
    """
    dropouts = dropouts or {}
    n, d = len(xs), xs[0].size
    rng = RandomSource(seed)
    spec = RoundSpec(n=n, dim=d, session_id=rng.child("session").token_bytes(32))
    server = protocol.server(spec, rng=rng.child("server"))
    party = {i: protocol.client(spec, i, xs[i], rng=rng.child(f"client/{i}")) for i in range(n)}
    party.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    log = []
    held.clear()
    for p, phase in enumerate(protocol.phases):
        for who, request in server.requests(phase).items():
            if who in dropouts and protocol.phases.index(dropouts[who]) <= p:
                continue
            if restore:
                party[who] = protocol.load_client(party[who].dump(), rng=rng.child(f"restored/{who}/{phase}"))
            try:
                reply = party[who].handle(phase, request)
            except (MessageRejected, ProtocolAborted):
                reply = None
            if getattr(party[who], "_secret", None) is not None:
                held[who] = party[who]._secret
            if on_reply is not None:
                reply = on_reply(phase, who, reply)
            log.append((phase, who, request, reply))
            if reply is not None:
                try:
                    server.receive(phase, who, reply)
                except MessageRejected:
                    pass
        server.finish_phase(phase)
    total, included = server.result()
    return total, included, server, party, log


def reframe(protocol, spec, phase, sender, items):
    """A well-formed message (header and checksum) around a payload an attacker or a bug produced."""
    return wire.Framer(protocol, spec).message(phase, sender, items)


def signed_upload(proto, spec, client, kid, blobs):
    """An upload message `client` signed (a faulty or corrupt client): the server checks what is inside."""
    return reframe(proto, spec, "upload", client, parties.signed_upload(proto, spec, client, kid, blobs))


def upload_parts(message):
    """(key id, ciphertext blobs) of an upload message (``signature || key id || blobs``)."""
    body = memoryview(message)[PAYLOAD:]
    reader = wire.Reader(body)
    reader.take(64)
    kid = bytes(reader.take(32))
    return kid, [bytes(reader.blob()) for _ in range(reader.u32())]


def proto_fields(data):
    """Top-level fields of a protobuf message: {number: [values]} (to look inside TenSEAL contexts)."""

    def varint(i):
        v = shift = 0
        while True:
            b = data[i]
            v |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return v, i
            shift += 7

    out, i = {}, 0
    while i < len(data):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = data[i : i + size], i + size
        else:
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        out.setdefault(number, []).append(value)
    return out


def secret_key_blob(secret_context: bytes) -> bytes:
    """The SEAL-serialized secret key inside a TenSEAL context (field 3.1 of TenSEALContextProto)."""
    private = proto_fields(secret_context)[3][0]
    return proto_fields(private)[1][0]


# -- H1, H3: CKKS sums within the documented bound, with dropouts ------------------------------------


@st.composite
def rounds(draw, max_dim):
    n = draw(st.integers(2, 30))
    d = draw(st.integers(1, max_dim))
    dropped = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1))
    dropouts = {c: draw(st.sampled_from(PHASES)) for c in dropped}
    return n, d, dropouts, draw(st.integers(0, 2**32))


BIG_DROPS = {3: "setup", 7: "upload", 11: "decrypt", 29: "keys"}


# Cost is ~10-30 ms per ciphertext and client: the extremes of n and d are examples of their own.
@settings(max_examples=6)
@given(case=rounds(max_dim=2 * 4096 + 5))
@example(case=(30, 2 * 4096 + 5, BIG_DROPS, 1))
@example(case=(3, 10**5, {0: "upload"}, 2))
def test_ckks_sum_within_error_bound_under_dropouts(case):
    n, d, dropouts, seed = case
    gen = np.random.default_rng(seed)  # test data, not secret
    c = 100.0
    xs = [gen.uniform(-c, c, d) for _ in range(n)]
    xs[0][: min(d, 3)] = c  # values at the edge of the range
    proto = CKKS(value_range=c)
    res = sf.simulate_aggregation(proto, xs, dropouts=dropouts, seed=seed, record="digest")
    want = tuple(i for i in range(n) if i not in dropouts or PHASES.index(dropouts[i]) > UPLOAD)
    assert res.included == want
    exact = np.sum([xs[i] for i in want], axis=0)
    assert np.max(np.abs(res.total - exact)) <= proto.error_bound(n)
    assert set(res.dropped) == {i for i in range(n) if i not in want}


def test_ckks_error_bound_holds_at_the_range_edges():
    n, d, c = 30, 64, 100.0
    xs = [np.full(d, c * s) for s in np.resize([1.0, 1.0, -1.0], n)]
    proto = CKKS(value_range=c)
    res = sf.simulate_aggregation(proto, xs, seed=3)
    assert np.max(np.abs(res.total - np.sum(xs, axis=0))) <= proto.error_bound(n) < 1e-6


def test_all_clients_dropped_aborts_and_one_survivor_suffices():
    xs = [np.ones(3)] * 3
    with pytest.raises(ProtocolAborted) as e:
        sf.simulate_aggregation(CKKS(), xs, dropouts={0: "upload", 1: "setup", 2: "keys"}, seed=0)
    assert e.value.reason is AbortReason.NO_INPUTS
    res = sf.simulate_aggregation(CKKS(), xs, dropouts={0: "upload", 1: "setup"}, seed=0)
    assert res.included == (2,) and np.allclose(res.total, 1.0)


# -- H2: BFV sums are exact after decoding -------------------------------------------------------------


@settings(max_examples=6)
@given(case=rounds(max_dim=2 * 8192 + 5))
@example(case=(30, 2 * 8192 + 5, BIG_DROPS, 1))
@example(case=(3, 10**5, {1: "decrypt"}, 2))
def test_bfv_sum_is_exact_under_dropouts(case):
    n, d, dropouts, seed = case
    gen = np.random.default_rng(seed)
    bound = 2**23 // n  # |sum| < 2^23: the 24-bit encoding cannot wrap
    xs = [gen.integers(-bound, bound, d, endpoint=True).astype(np.float64) for _ in range(n)]
    xs[0][:1] = -bound
    proto = BFV(encoder=Integers(24))
    res = sf.simulate_aggregation(proto, xs, dropouts=dropouts, seed=seed, record="digest")
    want = tuple(i for i in range(n) if i not in dropouts or PHASES.index(dropouts[i]) > UPLOAD)
    assert res.included == want
    np.testing.assert_array_equal(res.total, np.sum([xs[i] for i in want], axis=0))


def test_bfv_gives_encoders_the_sum_modulo_2k_even_when_it_wraps():
    # Encoders (e.g. distributed DP) may let the sum wrap modulo 2^k; BFV's prime t > n 2^k keeps the
    # exact integer sum, whose residue mod 2^k is then what a masking protocol would have produced.
    xs = [np.array([100.0, -100.0, 127.0, -128.0])] * 3
    res = sf.simulate_aggregation(BFV(encoder=Integers(8)), xs, seed=0)
    np.testing.assert_array_equal(res.total, [44.0, -44.0, 125.0, -128.0])  # 300, -300, 381, -384 mod 256


def test_bfv_fixed_point_equals_the_decoded_exact_sum_of_the_encodings():
    n, d, seed = 7, 300, 5
    gen = np.random.default_rng(0)
    xs = [gen.uniform(-2, 2, d) for _ in range(n)]
    proto = BFV(value_range=2.0, value_bits=20)
    total, included, *_ = drive(proto, xs, seed=seed, dropouts={4: "upload"})
    fp = FixedPoint(value_range=2.0, value_bits=20)
    k = fp.modulus_bits(n)
    enc = [fp.encode(xs[i], n=n, rng=RandomSource(seed).child(f"client/{i}")).astype(np.uint64) for i in included]
    exact = np.sum(enc, axis=0, dtype=np.uint64) & np.uint64((1 << k) - 1)
    np.testing.assert_array_equal(total, fp.decode(exact.astype(storage_dtype(k)), n=n, count=len(included)))
    assert np.max(np.abs(total - np.sum([xs[i] for i in included], axis=0))) <= proto.error_bound(n)


# -- H5: the server cannot decrypt; no client holds the decryptor's key ----------------------------------


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0)], ids=["ckks", "bfv"])
def test_server_context_cannot_decrypt_and_carries_no_secret(proto):
    xs = [np.linspace(-1, 1, 50), np.ones(50)]
    total, included, server, party, log = drive(proto, xs)
    public = server.public_context
    fields = proto_fields(public)
    assert 3 not in fields  # TenSEALContextProto.private_context: absent
    assert {1} <= proto_fields(fields[2][0]).keys() <= {1, 2, 3}  # a public key; no relin (4) or Galois (5) keys
    secret = held[parties.DECRYPTOR]
    assert party[parties.DECRYPTOR]._secret is None  # forgotten once it decrypted
    assert secret_key_blob(secret)[1000:1256] not in public
    ctx = ts.context_from(public)
    assert not ctx.has_secret_key() and not ctx.has_galois_keys() and ctx.is_public()
    upload = next(reply for phase, who, _, reply in log if phase == "upload")
    _, blobs = upload_parts(upload)
    load = ts.ckks_vector_from if isinstance(proto, CKKS) else ts.bfv_vector_from
    with pytest.raises(ValueError, match="secret"):
        load(ctx, blobs[0]).decrypt()
    # The key holder, and only it, decrypts the same ciphertext.
    plain = np.array(load(ts.context_from(secret), blobs[0]).decrypt())
    step = 1.0 if isinstance(proto, CKKS) else proto.encoder.scale
    assert np.allclose(plain / step, xs[0], atol=1e-4)


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0)], ids=["ckks", "bfv"])
def test_in_decryptor_mode_no_client_ever_holds_the_secret_key(proto):
    xs = [np.zeros(20)] * 3
    *_, party, log = drive(proto, xs)
    needle = secret_key_blob(held[parties.DECRYPTOR])[1000:1256]
    to_clients = [req for _, who, req, _ in log if isinstance(who, int)]
    assert to_clients and all(needle not in req for req in to_clients)
    assert all(needle not in party[c].dump() for c in range(3))
    assert needle not in party[parties.DECRYPTOR].dump()  # spent: the key is gone
    dec = proto.auxiliary(RoundSpec(n=3, dim=20, session_id=bytes(32)), rng=RandomSource(0))[parties.DECRYPTOR]
    spec = RoundSpec(n=3, dim=20, session_id=bytes(32))
    keyed = dec.handle("setup", reframe(proto, spec, "setup", header.SERVER, []))
    assert keyed and secret_key_blob(dec._secret)[1000:1256] in dec.dump()  # the check would see it if it were there


# -- H6: bad input is refused and leaves the accumulator untouched ----------------------------------------


@pytest.fixture(scope="module")
def foreign_ckks():
    """A CKKS context with the default parameters but another key."""
    return backend.new_context(CKKS()._ring(3))


def _server_with(proto, xs, seed=0):
    """A server after setup, the upload requests, and each client's honest upload."""
    n, d = len(xs), xs[0].size
    spec = RoundSpec(n=n, dim=d, session_id=RandomSource(seed).token_bytes(32))
    server = proto.server(spec, rng=RandomSource(1))
    dec = proto.auxiliary(spec, rng=RandomSource(2))[parties.DECRYPTOR]
    server.receive("setup", parties.DECRYPTOR, dec.handle("setup", server.requests("setup")[parties.DECRYPTOR]))
    server.finish_phase("setup")
    server.requests("keys")
    server.finish_phase("keys")
    reqs = server.requests("upload")
    uploads = [proto.client(spec, i, xs[i], rng=RandomSource(10 + i)).handle("upload", reqs[i]) for i in range(n)]
    return spec, server, dec, uploads


def _finish(server, dec):
    server.finish_phase("upload")
    server.receive("decrypt", parties.DECRYPTOR, dec.handle("decrypt", server.requests("decrypt")[parties.DECRYPTOR]))
    server.finish_phase("decrypt")
    return server.result()


def test_rejected_uploads_leave_the_sum_untouched(foreign_ckks):
    proto = CKKS()
    d = 4096 + 10  # two ciphertexts
    xs = [np.full(d, float(i + 1)) for i in range(8)]
    spec, server, dec, up = _server_with(proto, xs)
    kid, blobs = upload_parts(up[1])
    ring = proto._ring(8)
    other_key = backend.encrypt_chunks(foreign_ckks, ring, xs[2])
    other_params = backend.encrypt_chunks(backend.new_context(CKKS(coeff_mod_bit_sizes=(60, 50, 60))._ring(8)),
                                          CKKS(coeff_mod_bit_sizes=(60, 50, 60))._ring(8), xs[3])
    other_scale = backend.encrypt_chunks(foreign_ckks, CKKS(value_range=1.0)._ring(8), xs[4])
    bad = {  # signed by their clients: the server's checks of the content reject them
        1: up[1][:-1],  # truncated
        2: signed_upload(proto, spec, 2, backend.key_id(backend.public_bytes(foreign_ckks)),
                         other_key),  # another context: its own key id
        3: signed_upload(proto, spec, 3, kid, other_params),  # another parameter set
        4: signed_upload(proto, spec, 4, kid, other_scale),  # another scale
        5: signed_upload(proto, spec, 5, kid, blobs[:1]),  # too few ciphertexts
        6: signed_upload(proto, spec, 6, kid, blobs[::-1]),  # chunks of the wrong size
        7: reframe(proto, spec, "upload", 7, [bytes(64), kid, *wire.blobs(blobs)]),  # unsigned
    }
    server.receive("upload", 0, up[0])
    for c, message in bad.items():
        with pytest.raises(MessageRejected):
            server.receive("upload", c, message)
    with pytest.raises(MessageRejected):
        server.receive("upload", 0, up[0])  # replay
    total, included = _finish(server, dec)
    assert included == (0,)
    assert np.max(np.abs(total - xs[0])) <= proto.error_bound(8)
    assert {c: r.reason.value for c, r in server.dropped.items()} == dict.fromkeys(range(1, 8), "rejected")


@pytest.mark.parametrize("proto", [CKKS(value_range=1.0), BFV(value_range=1.0)], ids=["ckks", "bfv"])
def test_an_out_of_range_encryption_makes_the_key_holder_refuse_not_a_silent_wrong_sum(proto):
    xs = [np.full(6, 0.5)] * 3
    spec, server, dec, uploads = _server_with(proto, xs)
    ring = proto._ring(3)
    ctx = ts.context_from(server.public_context)
    if isinstance(proto, CKKS):
        evil = np.full(6, 8.0)  # outside value_range (the honest client's check is bypassed), inside q
    else:
        evil = np.full(6, 2 ** (proto.encoder.modulus_bits(3) + 2), dtype=np.int64)
    forged = signed_upload(proto, spec, 2, backend.key_id(server.public_context),  # a corrupt client's
                           backend.encrypt_chunks(ctx, ring, evil))
    server.receive("upload", 0, uploads[0])
    server.receive("upload", 2, forged)  # the server cannot tell
    server.finish_phase("upload")
    request = server.requests("decrypt")[parties.DECRYPTOR]
    with pytest.raises(ProtocolAborted, match="refuses"):
        dec.handle("decrypt", request)
    with pytest.raises(ProtocolAborted) as e:
        server.finish_phase("decrypt")
    assert e.value.reason is AbortReason.REQUEST_REFUSED


@settings(max_examples=20)
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_garbled_upload_is_rejected(garbling_setup, position, bit):
    proto, spec, server, upload = garbling_setup
    garbled = bytearray(upload)
    garbled[int(position * len(garbled))] ^= 1 << bit
    with pytest.raises(MessageRejected):
        server.receive("upload", 0, bytes(garbled))


@pytest.fixture(scope="module")
def garbling_setup():
    proto = BFV(value_range=1.0)
    spec, server, _, uploads = _server_with(proto, [np.zeros(10)] * 2)
    return proto, spec, server, uploads[0]


@pytest.mark.parametrize("proto", [CKKS(value_range=1.0), BFV(value_range=1.0)], ids=["ckks", "bfv"])
@pytest.mark.parametrize(
    "x", [np.array([0.5, np.nan]), np.array([0.5, np.inf]), np.array([0.5, 1.5]), np.ones(3), np.array([1, 0])]
)
def test_bad_inputs_raise_invalid_input(proto, x):
    with pytest.raises(InvalidInput):
        sf.simulate_aggregation(proto, [np.zeros(2), x], seed=0)


# -- H7: chunking, sizes, server memory -----------------------------------------------------------------


def test_vectors_fill_every_slot_and_ckks_upload_is_within_15x_fp32():
    d = 10 * 4096
    xs = [np.random.default_rng(0).uniform(-1, 1, d)] * 2
    _, _, server, _, log = drive(CKKS(), xs)
    upload = next(reply for phase, _, _, reply in log if phase == "upload")
    ctx = ts.context_from(server.public_context)
    assert [ts.ckks_vector_from(ctx, b).size() for b in upload_parts(upload)[1]] == [4096] * 10
    assert len(upload) / (4 * d) <= 15
    _, _, server, _, log = drive(BFV(value_range=1.0), [np.zeros(8192 + 1)] * 2)
    upload = next(reply for phase, _, _, reply in log if phase == "upload")
    ctx = ts.context_from(server.public_context)
    assert [ts.bfv_vector_from(ctx, b).size() for b in upload_parts(upload)[1]] == [8192, 1]


def test_server_keeps_each_upload_once_as_bytes_and_hands_them_over():
    proto = CKKS()
    xs = [np.ones(5000)] * 3
    _, server, dec, uploads = _server_with(proto, xs)
    for i, up in enumerate(uploads):
        before = sys.getrefcount(up)
        server.receive("upload", i, up)
        assert sys.getrefcount(up) == before  # nothing retained a reference to the message
        assert [c for c, _ in server._uploads] == list(range(i + 1))  # the signed payload, as bytes
        assert all(type(u) is bytes and len(u) < len(uploads[c]) for c, u in server._uploads)
    total, _ = _finish(server, dec)
    assert server._uploads is None  # the decrypt request holds the only copy
    assert np.allclose(total, 3.0)


# -- weighted FedAvg through the trainer ---------------------------------------------------------------------


def _train(protocol):
    import torch

    from securefed.demo import digits_federation, make_model

    clients, _ = digits_federation(clients=3, seed=1)
    model = make_model(seed=1)
    trainer = sf.Trainer(model, clients, protocol=protocol, local_epochs=1, lr=0.1, seed=1, progress=False)
    trainer.fit(rounds=2)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()


def test_weighted_fedavg_through_the_trainer_matches_plain():
    plain = _train(sf.protocols.Plain())
    assert np.max(np.abs(_train(CKKS()) - plain)) < 1e-6
    assert np.max(np.abs(_train(BFV(value_range=2.0, value_bits=24)) - plain)) < 1e-4


def test_weight_coordinate_gives_the_weighted_mean():
    gen = np.random.default_rng(4)
    deltas, weights = [gen.normal(0, 0.1, 30) for _ in range(5)], gen.uniform(0.1, 1, 5)
    xs = [np.append(w * d, w) for d, w in zip(deltas, weights)]
    res = sf.simulate_aggregation(CKKS(), xs, dropouts={1: "upload"}, seed=0)
    keep = [0, 2, 3, 4]
    want = np.sum([weights[i] * deltas[i] for i in keep], axis=0) / weights[keep].sum()
    assert np.allclose(res.total[:-1] / res.total[-1], want, atol=1e-10)


# -- H8: parameters ----------------------------------------------------------------------------------------


def test_security_table_is_seal_s():
    from tenseal import sealapi

    for degree, bits in params.MAX_COEFF_BITS.items():
        assert bits == sealapi.CoeffModulus.MaxBitCount(degree, sealapi.SEC_LEVEL_TYPE.TC128)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CKKS(coeff_mod_bit_sizes=(60, 60, 60, 60)),  # 240 bits > 218 at N=8192
        lambda: CKKS(poly_modulus_degree=6000),
        lambda: CKKS(coeff_mod_bit_sizes=(61, 40, 61)),
        lambda: CKKS(coeff_mod_bit_sizes=(60, 40, 40)),  # special prime smaller than a data prime
        lambda: CKKS(coeff_mod_bit_sizes=(60,)),
        lambda: CKKS(precision_bits=60),
        lambda: CKKS(value_range=2.0**40),  # no room left for the noise margin
        lambda: CKKS(value_range=float("nan")),
        lambda: CKKS(key_holder="masked"),
        lambda: CKKS(key_holder="server"),
        lambda: BFV(),  # no value_range
        lambda: BFV(value_range=1.0, value_bits=53).describe(256),  # the sum needs more than a 60-bit prime
        lambda: BFV(value_range=1.0, encoder=Integers()),
        lambda: BFV(value_range=1.0, coeff_mod_bit_sizes=(30, 30)).describe(2),  # noise budget too small
        lambda: BFV(encoder=object()),
        lambda: CKKS().with_encoder(Integers()),
    ],
)
def test_insecure_or_inconsistent_parameters_raise_configuration_error(make):
    with pytest.raises(ConfigurationError):
        make()


def test_too_many_clients_for_the_parameters_is_refused_before_the_round():
    proto = CKKS(value_range=100.0)
    with pytest.raises(ConfigurationError, match="lower value_range or precision_bits"):
        proto.describe(100_000)
    with pytest.raises(ConfigurationError):
        BFV(value_range=1.0, value_bits=40).describe(2**20)


@given(n=st.integers(1, 5000), bits=st.integers(2, 40))
def test_bfv_plaintext_prime_and_noise_rules(n, bits):
    t = params.next_batching_prime(n << bits, 8192)
    assert params.is_prime(t) and t % 16384 == 1 and t > n << bits
    first = -(-((n << bits) + 1 - 1) // 16384) * 16384 + 1  # the smallest m = 1 (mod 2N) above n 2^k
    first += 16384 if first <= n << bits else 0
    assert not any(params.is_prime(m) for m in range(first, t, 16384))
    try:
        r = params.bfv_round(8192, None, bits, n)
    except ConfigurationError:
        assert t.bit_length() > params.MAX_PRIME_BITS or not params.bfv_noise_ok(8192, (60, 60, 60), t, n)
        return
    assert r.plain_modulus == t
    assert params.bfv_noise_ok(8192, r.coeff_mod_bit_sizes, t, n)
    assert r.coeff_mod_bit_sizes == (60, 60) or not params.bfv_noise_ok(8192, (60, 60), t, n)


def test_miller_rabin_agrees_with_trial_division():
    small = [m for m in range(2, 5000) if all(m % p for p in range(2, int(m**0.5) + 1))]
    assert [m for m in range(5000) if params.is_prime(m)] == small
    assert params.is_prime(2**61 - 1) and not params.is_prime(2**61 + 1)
    assert not params.is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7


@given(n=st.integers(1, 3000))
def test_descriptions_pass_their_own_check_and_tampering_is_caught(n):
    for proto in (CKKS(), BFV(value_range=1.0)):
        desc = proto.describe(n)
        assert proto.check_description(desc) == []
        assert sf.protocols.REGISTRY[desc["protocol"]] is type(proto)
    ckks = CKKS().describe(n)
    assert CKKS.check_description({**ckks, "scale_bits": ckks["scale_bits"] + 20})
    assert CKKS.check_description({**ckks, "precision_bits": 70})
    assert CKKS.check_description({**ckks, "coeff_mod_bit_sizes": [60, 60, 60, 60]})
    assert CKKS.check_description({**ckks, "key_holder": "server"})
    bfv = BFV(value_range=1.0).describe(n)
    assert BFV.check_description({**bfv, "plain_modulus": bfv["plain_modulus"] + 2})
    assert BFV.check_description({**bfv, "modulus_bits": 50})
    assert BFV.check_description({**bfv, "coeff_mod_bit_sizes": [30, 30]})


def test_bfv_noise_bound_holds_for_a_coherent_worst_case_sum():
    # The same ciphertext added to itself n times: noise adds up coherently, the worst case;
    # n is the largest power of two for which the rule still allows one 60-bit data prime.
    k, n = 20, 1
    while params.bfv_round(8192, None, k, 2 * n).coeff_mod_bit_sizes == (60, 60):
        n *= 2
    r = params.bfv_round(8192, None, k, n)
    ring = backend.Ring("bfv", 8192, r.coeff_mod_bit_sizes, plain_modulus=r.plain_modulus)
    ctx = backend.new_context(ring)
    x = np.resize([-(2 ** (k - 1)), 2 ** (k - 1) - 1], 8192).astype(np.int64)
    one = ts.bfv_vector_from(ctx, backend.encrypt_chunks(ctx, ring, x)[0])
    acc = one.copy()
    for _ in range(n - 1):
        acc.add_(one)
    np.testing.assert_array_equal(acc.decrypt(), x * n)
    assert ctx.data.decryptor().invariant_noise_budget(acc.ciphertext()[0]) > 0


# -- H4: a CKKS release hides the decryption noise ---------------------------------------------------------


def test_ckks_release_is_independent_of_the_encryption_noise():
    proto = CKKS()
    spec = RoundSpec(n=10, dim=4096, session_id=bytes(32))
    ring = proto._ring(10)
    ctx = backend.new_context(ring)
    # Small values: their float64 ulps are finer than the noise, so a raw decryption shows it.
    x = np.random.default_rng(9).uniform(-1e-9, 1e-9, 4096)
    raw, released = [], []
    for _ in range(2):  # two encryptions of the same sum: only SEAL's noise differs
        vec = backend.load_chunk(ctx, ring, backend.encrypt_chunks(ctx, ring, x)[0], 4096)
        values = np.array(vec.decrypt())
        raw.append(values)
        released.append(proto._release(values, spec, 1))
    assert not np.array_equal(raw[0], raw[1])  # raw decryptions expose the noise
    assert released[0] == released[1]


def test_ckks_release_at_an_exact_grid_midpoint_depends_on_the_noise():
    # H4 as measured: float32 inputs of magnitude in [2^-18, 2^-17) are odd multiples of 2^-41, so half of them
    # sit exactly on a midpoint of the 2^-40 output grid, nobody having put them there. At the default
    # parameters (n = 10: scale 2^86) the rounding of those slots follows the noise from one encryption to the
    # next; every other slot is released as rint(x) every time.
    proto = CKKS()
    spec = RoundSpec(n=10, dim=4096, session_id=bytes(32))
    ring = proto._ring(10)
    ctx = backend.new_context(ring)
    gen = np.random.default_rng(0)
    x = (gen.uniform(2**-18, 2**-17, 4096) * gen.choice([-1, 1], 4096)).astype(np.float32).astype(np.float64)
    midpoint = np.ldexp(np.abs(x), 40) % 1 == 0.5
    assert 1800 < midpoint.sum() < 2300
    released = []
    for _ in range(4):  # four encryptions of the same input: only SEAL's noise differs
        vec = backend.load_chunk(ctx, ring, backend.encrypt_chunks(ctx, ring, x)[0], 4096)
        released.append(np.frombuffer(proto._release(np.array(vec.decrypt()), spec, 1), "<f8"))
    released = np.array(released)
    changed = (released != released[0]).any(axis=0)
    assert changed.sum() > 200 and not changed[~midpoint].any()  # measured: 861 and 921 of 4096 changed
    assert (released[:, ~midpoint] == np.ldexp(np.rint(np.ldexp(x[~midpoint], 40)), -40)).all()


# -- H9: saved states --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proto",
    [CKKS(), BFV(value_range=1.0), CKKS(key_holder="clients"), BFV(value_range=1.0, key_holder="clients"),
     BFV(value_range=1.0, key_holder="masked")],
    ids=["ckks", "bfv", "ckks-clients", "bfv-clients", "bfv-masked"],
)
def test_parties_saved_and_restored_between_phases_give_the_same_sum(proto):
    xs = [np.linspace(-1, 1, 40) * (i + 1) / 4 for i in range(4)]
    total, included, *_ = drive(proto, xs, restore=True, dropouts={2: "upload"})
    assert included == (0, 1, 3)
    assert np.max(np.abs(total - (xs[0] + xs[1] + xs[3]))) <= proto.error_bound(4)


def test_bad_states_are_refused():
    proto = CKKS()
    spec = RoundSpec(n=2, dim=3, session_id=bytes(32))
    state = proto.client(spec, 0, np.ones(3), rng=RandomSource(0)).dump()
    assert proto.load_client(state, rng=RandomSource(1)).dump() == state
    for bad in (b"", state[:-1], state + b"\x00", b"SFBF" + state[4:], state[:5] + b"\x02" + state[6:]):
        with pytest.raises(InvalidInput):
            proto.load_client(bad, rng=RandomSource(1))
    with pytest.raises(InvalidInput):
        CKKS(key_holder="clients").load_client(state, rng=RandomSource(1))


def test_parties_refuse_out_of_order_and_second_decryptions():
    proto = CKKS()
    spec, server, dec, uploads = _server_with(proto, [np.ones(4)] * 2)
    for i, up in enumerate(uploads):
        server.receive("upload", i, up)
    server.finish_phase("upload")
    request = server.requests("decrypt")[parties.DECRYPTOR]
    dec.handle("decrypt", request)
    with pytest.raises(MessageRejected):
        dec.handle("decrypt", request)  # one decryption per round
    client = proto.client(spec, 0, np.ones(4), rng=RandomSource(0))
    with pytest.raises(MessageRejected):
        client.handle("decrypt", request)  # clients hold no key in decryptor mode
    with pytest.raises(ProtocolAborted):
        server.requests("upload")  # phases only in order


# -- H10: the "clients" key holders -------------------------------------------------------------------------


def test_clients_mode_server_relays_only_sealed_keys():
    proto = CKKS(key_holder="clients")
    xs = [np.full(10, float(i)) for i in range(4)]
    total, included, server, party, log = drive(proto, xs)
    assert included == (0, 1, 2, 3) and np.allclose(total, 6.0)
    needle = secret_key_blob(held[0])[1000:1256]  # client 0 dealt the key
    assert all(needle not in req for *_, req, _ in log)
    assert all(needle not in reply for *_, reply in log if reply is not None)
    assert all(held[c] == held[0] for c in range(4))  # every client received the key
    assert party[0]._secret is None and all(party[c]._secret == held[0] for c in (1, 2, 3))  # the dealer spent it


def test_clients_mode_tampered_sealed_key_is_refused():
    def tamper(phase, who, reply):
        if phase == "keys":  # flip a bit inside the first sealed key, keeping the message well-formed
            body = bytearray(reply[PAYLOAD:])
            body[-40] ^= 1
            return reframe(proto, spec, "keys", who, [bytes(body)])
        return reply

    proto = BFV(value_range=1.0, key_holder="clients")
    xs = [np.full(6, 0.25)] * 3
    spec = RoundSpec(n=3, dim=6, session_id=RandomSource(0).child("session").token_bytes(32))
    total, included, server, *_ = drive(proto, xs, on_reply=tamper)
    assert included == (0, 1)  # client 2's sealed key (the last) did not open: it sent nothing
    assert server.dropped[2].phase == "upload"
    assert np.allclose(total, 0.5, atol=proto.error_bound(3))


def test_clients_mode_dealer_dropout_aborts_and_late_dropouts_are_fine():
    proto = CKKS(key_holder="clients")
    xs = [np.ones(5)] * 4
    # The dealer is client 0, always, and alone decrypts: it must stay to the end; nobody stands in for it.
    for phase, says in (("setup", "did not advertise"), ("keys", "before delivering the key"),
                        ("upload", "before decrypting"), ("decrypt", "did not decrypt")):
        with pytest.raises(ProtocolAborted, match=says) as e:
            sf.simulate_aggregation(proto, xs, dropouts={0: phase}, seed=0)
        assert e.value.reason is AbortReason.REQUEST_REFUSED and e.value.phase == phase
    res = sf.simulate_aggregation(proto, xs, dropouts={1: "setup", 3: "decrypt", 2: "upload"}, seed=0)
    assert res.included == (0, 3) and np.allclose(res.total, 2.0)  # 3 left after uploading
    assert res.dropped[1].phase == "setup" and res.dropped[2].phase == "upload"
    assert 3 not in res.dropped  # nothing was asked of 3 after its upload


@pytest.mark.parametrize("proto", [CKKS(key_holder="clients"), BFV(value_range=1.0, key_holder="clients")],
                         ids=["ckks", "bfv"])
def test_clients_mode_only_client_0_deals_and_every_client_refuses_another_dealer(proto):
    # Once the lowest advertiser of the list the server sent dealt: an active server made every client the dealer
    # of its own list, with one key and one decryption each (tests/testing/test_he_attacks.py, the partition).
    spec = RoundSpec(n=3, dim=4, session_id=bytes(range(32)))
    server = proto.server(spec, rng=RandomSource(1))
    party = {i: proto.client(spec, i, np.full(4, 0.25), rng=RandomSource(10 + i)) for i in range(3)}
    for who, request in server.requests("setup").items():
        server.receive("setup", who, party[who].handle("setup", request))
    server.finish_phase("setup")

    def keys_request(listed):
        items = [wire.u32(len(listed))]
        for c in listed:
            items += [wire.u32(c), server._kex_keys[c]]
        return reframe(proto, spec, "keys", header.SERVER, items)

    for c, listed in ((1, (1,)), (1, (1, 2)), (2, (0, 1, 2))):  # lowest of its list, or not: client 1 or 2 never deals
        with pytest.raises(MessageRejected, match="only client 0 deals"):
            party[c].handle("keys", keys_request(listed))
    # Client 1's upload request naming client 1 (or 2) as the dealer, with its genuine signed key, is refused.
    server.receive("keys", 0, party[0].handle("keys", server.requests("keys")[0]))
    server.finish_phase("keys")
    honest = server.requests("upload")
    for dealer in (1, 2):
        items = server._public_items() + [wire.u32(dealer), server._kex_keys[dealer], server._sealed[1]]
        with pytest.raises(MessageRejected, match="client 0's, not client"):
            party[1].handle("upload", reframe(proto, spec, "upload", header.SERVER, items))
    server.receive("upload", 1, party[1].handle("upload", honest[1]))  # refused requests took nothing
    assert party[0]._dealer and not party[1]._dealer and not party[2]._dealer
    # A saved state claiming the dealer's flag for another client is refused.
    flag = bytes([7]) + bytes(8)  # field 7 (empty, the last key): "this client dealt the key"
    dealt = party[0].dump()
    assert dealt.endswith(flag) and proto.load_client(dealt, rng=RandomSource(2))._dealer
    with pytest.raises(InvalidInput):
        proto.load_client(party[1].dump() + flag, rng=RandomSource(2))


def test_clients_mode_only_the_dealer_decrypts_once():
    # Two key holders decrypting different subsets would hand the server their difference.
    proto = CKKS(key_holder="clients")
    total, included, _, party, log = drive(proto, [np.ones(5)] * 3)
    asked = [who for phase, who, _, _ in log if phase == "decrypt"]
    assert asked == [0] and included == (0, 1, 2) and np.allclose(total, 3.0)
    request = next(req for phase, _, req, _ in log if phase == "decrypt")
    for c in (0, 1, 2):  # the dealer has spent its key; the others never decrypt
        with pytest.raises(MessageRejected, match="out of order"):
            party[c].handle("decrypt", request)


# -- packaging -------------------------------------------------------------------------------------------------


def test_import_securefed_does_not_load_tenseal():
    code = "import sys, securefed; sf = securefed.protocols.CKKS(); assert 'tenseal' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bfv_carries_other_integer_encoders():
    enc = Integers(30)
    proto = BFV(value_range=1.0).with_encoder(enc)
    assert proto.encoder is enc and proto.describe(4)["modulus_bits"] == 30
    with pytest.raises(ConfigurationError):
        BFV(value_range=1.0).with_encoder(Integers(60)).describe(2)  # needs a prime above 60 bits
    res = sf.simulate_aggregation(proto, [np.arange(3.0)] * 2, seed=0)
    np.testing.assert_array_equal(res.total, 2 * np.arange(3.0))
    assert proto.error_bound(2) == 0.0


# -- H14: masked mode (BFV with SecAgg+ masks inside the plaintext) ------------------------------------------


@settings(max_examples=5)
@given(n=st.integers(3, 12), d=st.integers(1, 300), data=st.data())
def test_masked_bfv_sums_within_bound_with_secagg_dropout_recovery(n, d, data):
    # Within SecAgg+'s threat model: at most ceil(dropout_fraction n) = ceil(0.1 n) clients drop.
    proto = BFV(value_range=1.0, key_holder="masked")
    dropped = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=math.ceil(0.1 * n)))
    dropouts = {c: data.draw(st.sampled_from(["setup", "keys", "upload", "decrypt", "unmasking"])) for c in dropped}
    gen = np.random.default_rng(d)
    xs = [gen.uniform(-1, 1, d) for _ in range(n)]
    res = sf.simulate_aggregation(proto, xs, dropouts=dropouts, seed=n)
    early = {c for c, phase in dropouts.items() if proto.phases.index(phase) <= UPLOAD}
    assert res.included == tuple(c for c in range(n) if c not in early)
    assert np.max(np.abs(res.total - np.sum([xs[c] for c in res.included], axis=0))) <= proto.error_bound(n)


def test_masked_bfv_with_an_active_adversary_runs_the_consistency_check():
    from securefed.protocols import SecAggPlus

    proto = BFV(value_range=1.0, key_holder="masked", masking=SecAggPlus(adversary="active"))
    xs = [np.full(7, 0.25)] * 5
    total, included, *_, log = drive(proto, xs)
    assert {who for phase, who, _, reply in log if phase == "consistency_check" and reply} == set(range(5))
    assert included == (0, 1, 2, 3, 4) and np.allclose(total, 1.25, atol=proto.error_bound(5))


def _chi2_pvalue(values, k, bins=64):
    from scipy.stats import chisquare

    top = (values.astype(np.uint64) >> np.uint64(k - 6)).astype(np.int64)  # the top 6 of k bits
    return chisquare(np.bincount(top, minlength=bins)).pvalue


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_in_masked_mode_a_decrypted_single_upload_is_uniform(masked):
    # The decryptor colluding with the server decrypts client 0's upload: masked, it is uniform mod 2^k
    # whatever the input; the same check on an unmasked upload fails, so the check has power.
    n, d = 4, 8192
    proto = BFV(value_range=1.0, key_holder="masked" if masked else "decryptor")
    xs = [np.zeros(d)] + [np.full(d, 0.5)] * (n - 1)
    _, _, server, party, log = drive(proto, xs)
    upload = next(reply for phase, who, _, reply in log if phase == "upload" and who == 0)
    secret = ts.context_from(held[parties.DECRYPTOR])
    k = proto.encoder.modulus_bits(n)
    values = np.array(ts.bfv_vector_from(secret, upload_parts(upload)[1][0]).decrypt()) & ((1 << k) - 1)
    p = _chi2_pvalue(values, k)
    assert (p > 1e-6) if masked else (p < 1e-100)


def test_masked_mode_aborts_before_decryption_with_too_few_uploads():
    proto = BFV(value_range=1.0, key_holder="masked")
    n = 6
    t = proto.min_survivors(n)
    dropouts = dict.fromkeys(range(n - t + 1), "upload")
    asked = []

    def spy(phase, who, reply):
        asked.append((phase, who))
        return reply

    with pytest.raises(ProtocolAborted) as e:
        drive(proto, [np.zeros(4)] * n, dropouts=dropouts, on_reply=spy)
    assert e.value.reason is AbortReason.TOO_FEW_SURVIVORS
    assert ("decrypt", parties.DECRYPTOR) not in asked


def test_masked_mode_parameters_and_description():
    from securefed.protocols import SecAgg

    with pytest.raises(ConfigurationError):
        BFV(value_range=1.0, masking=SecAgg())  # masking without masked mode
    with pytest.raises(ConfigurationError):
        BFV(value_range=1.0, key_holder="masked", masking=sf.protocols.Plain())
    proto = BFV(value_range=1.0, key_holder="masked", masking=SecAgg(threshold=3))
    desc = proto.describe(5)
    assert desc["min_survivors"] == 3 == desc["masking"]["threshold"] and BFV.check_description(desc) == []
    assert BFV.check_description({**desc, "masking": {**desc["masking"], "threshold": 1, "min_survivors": 1}})
    assert BFV.check_description({k: v for k, v in desc.items() if k != "masking"})
    other = proto.with_encoder(Integers(20))
    assert other.masking.encoder is other.encoder and other.masking.min_survivors(5) == 3
    res = sf.simulate_aggregation(other, [np.full(3, 7.0)] * 5, dropouts={4: "upload"}, seed=0)
    np.testing.assert_array_equal(res.total, np.full(3, 28.0))


@pytest.mark.parametrize("mode", ["decryptor", "masked"])
def test_bfv_carries_the_distributed_dp_encoders(mode):
    from securefed.privacy.distributed import (
        DistributedDiscreteGaussian,
        DistributedSkellam,
    )

    n, d = 5, 256
    xs = [np.random.default_rng(i).normal(0, 0.05, d) for i in range(n)]
    for cls in (DistributedDiscreteGaussian, DistributedSkellam):
        enc = cls(l2_clip=1.0, noise_multiplier=1.0, dimension=d, min_survivors=n)
        proto = BFV(value_range=1.0, key_holder=mode).with_encoder(enc)
        assert proto.describe(n)["modulus_bits"] == enc.modulus_bits(n)
        assert proto.check_description(proto.describe(n)) == []
        res = sf.simulate_aggregation(proto, xs, seed=3)
        noise = res.total - np.sum(xs, axis=0)
        assert 0.8 < np.std(noise) < 1.2  # the sum of the n shares has std z c = 1 (rotation and rounding aside)


# -- H15: an active server can neither hand out its own key nor have anything but a signed sum decrypted ----


def until_decrypt(protocol, xs, seed=0):
    """An honest round up to the decrypt phase: the spec, server, parties and the request to the key holder."""
    rng = RandomSource(seed)
    spec = RoundSpec(n=len(xs), dim=xs[0].size, session_id=rng.child("session").token_bytes(32))
    server = protocol.server(spec, rng=rng.child("server"))
    party = {i: protocol.client(spec, i, xs[i], rng=rng.child(f"client/{i}")) for i in range(len(xs))}
    party.update(protocol.auxiliary(spec, rng=rng.child("auxiliary")))
    for phase in protocol.phases[: protocol.phases.index("decrypt")]:
        for who, request in server.requests(phase).items():
            server.receive(phase, who, party[who].handle(phase, request))
        server.finish_phase(phase)
    [(holder, request)] = server.requests("decrypt").items()
    return spec, server, party, holder, request


def decrypt_entries(request):
    """[(client, upload)] of a decrypt request."""
    reader = wire.Reader(memoryview(request)[PAYLOAD:])
    return [(reader.u32(), bytes(reader.blob())) for _ in range(reader.u32())]


def decrypt_request(protocol, spec, entries):
    items = [wire.u32(len(entries))]
    for c, up in entries:
        items += [wire.u32(c), wire.u32(len(up)), up]
    return reframe(protocol, spec, "decrypt", header.SERVER, items)


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0, key_holder="masked")], ids=["ckks", "bfv-masked"])
def test_clients_refuse_a_public_context_the_decryptor_did_not_sign(proto):
    xs = [np.ones(4)] * 3
    spec, server, party, _, _ = until_decrypt(proto, xs)
    own = backend.public_bytes(backend.new_context(proto._ring(3)))  # the server's context: it holds the key
    client = proto.client(spec, 0, xs[0], rng=RandomSource(5))
    for sig in (bytes(64), server._public_sig):  # no signature; the decryptor's, for its own context
        request = reframe(proto, spec, "upload", header.SERVER, [wire.u32(len(own)), own, sig])
        with pytest.raises(MessageRejected, match="signature"):
            client.handle("upload", request)
    # The decryptor's signed context of another session is refused too (the signature binds the session).
    other = RoundSpec(n=3, dim=4, session_id=bytes(32))
    request = reframe(proto, other, "upload", header.SERVER, server._public_items())
    with pytest.raises(MessageRejected, match="signature"):
        proto.client(other, 0, xs[0], rng=RandomSource(6)).handle("upload", request)


def test_clients_mode_refuses_substituted_exchange_keys():
    from securefed.crypto import kex

    proto = CKKS(key_holder="clients")
    spec = RoundSpec(n=3, dim=4, session_id=bytes(range(32)))
    server = proto.server(spec, rng=RandomSource(1))
    party = {i: proto.client(spec, i, np.ones(4), rng=RandomSource(10 + i)) for i in range(3)}
    for who, request in server.requests("setup").items():
        server.receive("setup", who, party[who].handle("setup", request))
    server.finish_phase("setup")
    mine = kex.public_bytes(kex.generate_private_key(RandomSource(99)))
    honest = server.requests("keys")[0]
    request = bytearray(honest)
    at = request.index(server._kex_keys[2][:32])
    request[at : at + 32] = mine  # client 2's key replaced: the secret key would be sealed to the server
    with pytest.raises(MessageRejected, match="signature"):
        party[0].handle("keys", reframe(proto, spec, "keys", header.SERVER, [bytes(request[PAYLOAD:])]))
    server.receive("keys", 0, party[0].handle("keys", honest))  # nothing was dealt: the honest request still works
    server.finish_phase("keys")
    # The dealer's key replaced in a client's upload request: the server would deal its own key.
    upload = bytearray(server.requests("upload")[1])
    at = upload.index(server._kex_keys[0][:32])
    upload[at : at + 32] = mine
    with pytest.raises(MessageRejected, match="signature"):
        party[1].handle("upload", reframe(proto, spec, "upload", header.SERVER, [bytes(upload[PAYLOAD:])]))


def test_an_upload_is_bound_to_its_client_and_round():
    proto = CKKS()
    spec, server, dec, uploads = _server_with(proto, [np.ones(4)] * 3)
    as_other = reframe(proto, spec, "upload", 1, [bytes(memoryview(uploads[0])[PAYLOAD:])])
    with pytest.raises(MessageRejected, match="signature"):
        server.receive("upload", 1, as_other)  # client 0's upload passed off as client 1's
    other_round = RoundSpec(n=3, dim=4, session_id=spec.session_id, round_index=1)
    _, later, _, _ = _server_with(proto, [np.ones(4)] * 3)
    replay = reframe(proto, other_round, "upload", 0, [bytes(memoryview(uploads[0])[PAYLOAD:])])
    with pytest.raises(MessageRejected):
        later.receive("upload", 0, replay)


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0, key_holder="clients")], ids=["ckks", "bfv-clients"])
def test_the_key_holder_sums_only_signed_uploads_and_a_refusal_spends_its_key(proto):
    spec, server, party, holder, request = until_decrypt(proto, [np.full(4, 0.5)] * 3)
    entries = decrypt_entries(request)
    relabelled = decrypt_request(proto, spec, [(c + 1, up) for c, up in entries[:2]])  # 0's upload as 1's, ...
    with pytest.raises(MessageRejected, match="signature"):
        party[holder].handle("decrypt", relabelled)
    with pytest.raises(MessageRejected, match="out of order"):
        party[holder].handle("decrypt", request)  # the honest request comes too late: the key is spent
    assert party[holder]._secret is None


def test_the_key_holder_enforces_the_minimum_count():
    proto = BFV(value_range=1.0, key_holder="masked")
    spec, server, party, holder, request = until_decrypt(proto, [np.full(4, 0.5)] * 5)
    t = proto.min_survivors(5)
    short = decrypt_request(proto, spec, decrypt_entries(request)[: t - 1])
    with pytest.raises(ProtocolAborted, match=f"fewer than the {t}") as e:
        party[holder].handle("decrypt", short)
    assert e.value.reason is AbortReason.REQUEST_REFUSED


def test_identities_need_the_decryptor_s_key_and_flower_s_per_round_binding_keeps_it():
    from securefed.crypto.signing import (
        KeyDirectory,
        generate_signing_key,
        verify_key_bytes,
    )

    clients = KeyDirectory.generate(3, RandomSource(1))
    with pytest.raises(ConfigurationError, match="decryptor"):
        sf.simulate_aggregation(CKKS(identities=clients), [np.ones(2)] * 3, seed=0)
    assert sf.simulate_aggregation(CKKS(key_holder="clients", identities=clients), [np.ones(2)] * 3,
                                   seed=0).included == (0, 1, 2)  # clients mode: no decryptor
    sk = generate_signing_key(RandomSource(2))
    own = KeyDirectory({wire.DECRYPTOR_ID: verify_key_bytes(sk)}, {wire.DECRYPTOR_ID: sk})
    bound = BFV(value_range=1.0, key_holder="masked", identities=own).with_identities(clients)
    assert bound.directory(3).verify_key(wire.DECRYPTOR_ID) == verify_key_bytes(sk)
    assert sf.simulate_aggregation(bound, [np.ones(2)] * 3, seed=0).included == (0, 1, 2)
    with pytest.raises(ConfigurationError):
        CKKS(identities="keys")


def test_min_clients_bounds_the_smallest_sum_an_active_server_can_have_decrypted():
    proto = CKKS(min_clients=3)
    res = sf.simulate_aggregation(proto, [np.ones(3)] * 4, dropouts={1: "upload"}, seed=0)
    assert res.included == (0, 2, 3) and np.allclose(res.total, 3.0)
    with pytest.raises(ProtocolAborted) as e:  # the server asks the decryptor nothing
        sf.simulate_aggregation(proto, [np.ones(3)] * 4, dropouts={1: "upload", 2: "upload"}, seed=0)
    assert e.value.reason is AbortReason.TOO_FEW_SURVIVORS
    spec, server, party, holder, request = until_decrypt(BFV(value_range=1.0, min_clients=3), [np.ones(3)] * 4)
    short = decrypt_request(BFV(value_range=1.0, min_clients=3), spec, decrypt_entries(request)[:2])
    with pytest.raises(ProtocolAborted, match="fewer than the 3"):  # the key holder's own check
        party[holder].handle("decrypt", short)
    desc = proto.describe(4)
    assert desc["min_survivors"] == 3 == desc["min_clients"] and CKKS.check_description(desc) == []
    assert CKKS.check_description({**desc, "min_survivors": 1})
    assert BFV(value_range=1.0, min_clients=2).with_encoder(Integers(20)).min_survivors(4) == 2
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ConfigurationError):
            CKKS(min_clients=bad)
    with pytest.raises(ConfigurationError):
        BFV(value_range=1.0, key_holder="masked", min_clients=2)
    with pytest.raises(ConfigurationError):
        sf.simulate_aggregation(CKKS(min_clients=5), [np.ones(3)] * 4, seed=0)


@pytest.mark.parametrize("kwargs, words", [
    # were AssertionError, OverflowError and an accepted bool (issue 21, the public-API fuzz)
    ({"coeff_mod_bit_sizes": None}, "CKKS needs coeff_mod_bit_sizes"),
    ({"coeff_mod_bit_sizes": [60, float("inf"), 60]}, "coeff_mod_bit_sizes must be a sequence of ints"),
    ({"precision_bits": True}, r"precision_bits must be an integer in \[1, 52\], got True"),
    ({"key_holder": np.array(["clients", "decryptor"])}, "key_holder must be one of"),
])
def test_ckks_refuses_what_the_fuzz_found(kwargs, words):
    with pytest.raises(ConfigurationError, match=words):
        CKKS(**kwargs)


def test_bfv_refuses_an_array_as_key_holder_and_infinite_prime_sizes():
    with pytest.raises(ConfigurationError, match="key_holder must be one of"):
        BFV(value_range=1.0, key_holder=np.array([1.0, 2.0]))
    with pytest.raises(ConfigurationError, match="coeff_mod_bit_sizes must be a sequence of ints"):
        BFV(value_range=1.0, coeff_mod_bit_sizes=[60, float("-inf")])


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0), BFV(value_range=1.0, key_holder="masked")],
                         ids=["ckks", "bfv", "bfv-masked"])
def test_server_walks_its_states_in_phase_order_and_stays_aborted(proto):
    """protocols/he.md, "States": every phase of the protocol opens in order (BFV's masking phases too, asking
    nobody outside masked mode), nothing opens out of order or twice, and after an abort every call raises
    that abort again instead of going on to the next phase."""
    xs = [np.full(4, 0.25)] * 3
    spec, server, party, holder, request = until_decrypt(proto, xs)
    with pytest.raises(ProtocolAborted, match="out of order") as e:
        server.requests("upload")  # the decrypt phase is open
    assert e.value.reason is AbortReason.INVALID_STATE
    server.receive("decrypt", holder, party[holder].handle("decrypt", request))
    server.finish_phase("decrypt")
    for phase in proto.phases[proto.phases.index("decrypt") + 1 :]:
        requests = server.requests(phase)
        masked = proto.key_holder == "masked"
        assert bool(requests) == (masked and phase == "unmasking")  # consistency_check: active masking only
        for who, req in requests.items():
            server.receive(phase, who, party[who].handle(phase, req))
        server.finish_phase(phase)
    total, included = server.result()
    assert included == (0, 1, 2) and np.allclose(total, 0.75, atol=1e-3)
    with pytest.raises(ProtocolAborted, match="out of order"):
        server.requests(proto.phases[0])

    # The decryptor (or every client) silent at setup: the round aborts, and stays aborted.
    server = proto.server(spec, rng=RandomSource(3))
    server.requests("setup")
    with pytest.raises(ProtocolAborted) as first:
        server.finish_phase("setup")
    for call in (lambda: server.requests("keys"), lambda: server.receive("keys", 0, b""),
                 lambda: server.finish_phase("keys"), server.result):
        with pytest.raises(ProtocolAborted) as again:
            call()
        assert again.value is first.value


@pytest.mark.parametrize("proto", [CKKS(), BFV(value_range=1.0), BFV(value_range=1.0, key_holder="masked")],
                         ids=["ckks", "bfv", "bfv-masked"])
def test_a_client_dropped_for_a_rejected_reply_cannot_come_back_with_a_valid_one(proto):
    """protocols/he.md, "States": a rejected reply drops its sender for the round; its valid reply after that
    is refused too, so no client is both dropped and included."""
    xs = [np.full(4, 0.25)] * 4
    rng = RandomSource(5)
    spec = RoundSpec(n=len(xs), dim=4, session_id=rng.child("session").token_bytes(32))
    server = proto.server(spec, rng=rng.child("server"))
    party = {i: proto.client(spec, i, xs[i], rng=rng.child(f"client/{i}")) for i in range(len(xs))}
    party.update(proto.auxiliary(spec, rng=rng.child("auxiliary")))
    for phase in proto.phases:
        for who, request in server.requests(phase).items():
            reply = party[who].handle(phase, request)
            if phase == "upload" and who == 0:
                with pytest.raises(MessageRejected):
                    server.receive(phase, who, b"\x00" * 8)
                with pytest.raises(MessageRejected, match="dropped"):
                    server.receive(phase, who, reply)
                continue
            if reply is not None:
                server.receive(phase, who, reply)
        server.finish_phase(phase)
    total, included = server.result()
    assert 0 not in included and set(server.dropped) == {0}
    assert np.allclose(total, 0.25 * len(included), atol=1e-3)
