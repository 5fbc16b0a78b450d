"""The active-server attacks of securefed.testing.he_attacks (issue 18, part 4; proofs/he.md H6).

Each attack runs against the real party objects twice: with the key holder as it was before the
fix (``legacy``: it decrypts whatever ciphertexts it is handed and a refused request does not spend
its key), where it must recover the secret key and decrypt a victim's upload, and as it is, where
the key holder must refuse and nothing is recovered. Small rings (N = 4096) keep them fast.
"""

import numpy as np
import pytest

from securefed.errors import MessageRejected, ProtocolAborted
from securefed.protocols.he import BFV, CKKS, auth, parties, wire
from securefed.protocols.he import tenseal as backend
from securefed.testing.he_attacks import (
    bfv_key_recovery,
    ckks_key_recovery,
    clients_mode_partition,
)

SMALL = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (50, 59)}


@pytest.fixture
def legacy(monkeypatch):
    """The key holders before the fix: no check of what they sum, and a refusal leaves the key unspent."""

    def unchecked(directory, tag, spec, client, upload, key_id):
        reader = wire.Reader(upload)
        reader.take(auth.SIG + wire.KEY_ID_BYTES)
        return reader

    def keep_key_on_refusal(handle):
        def wrapped(self, phase, request):
            saved = (self._stage, self._secret)
            try:
                return handle(self, phase, request)
            except (MessageRejected, ProtocolAborted):
                if phase == "decrypt":
                    self._stage, self._secret = saved
                raise

        return wrapped

    monkeypatch.setattr(auth, "check_upload", unchecked)
    for cls in (parties.HEDecryptor, parties.HEClient):
        monkeypatch.setattr(cls, "handle", keep_key_on_refusal(cls.handle))


def ckks_inputs(n, dim):
    gen = np.random.default_rng(n)
    return [gen.uniform(-1, 1, dim) for _ in range(n)]


CKKS_CASES = {
    "decryptor": lambda: CKKS(value_range=1.0, precision_bits=12, **SMALL),
    "clients": lambda: CKKS(value_range=1.0, precision_bits=12, key_holder="clients", **SMALL),
}


@pytest.mark.parametrize("mode", sorted(CKKS_CASES))
def test_ckks_crafted_chunks_give_the_legacy_key_holder_s_key_away(legacy, mode):
    proto = CKKS_CASES[mode]()
    xs = ckks_inputs(3, 2 * 2048 + 3)
    out = ckks_key_recovery(proto, xs, victim=2)
    assert out.key_recovered and set(out.recovered_key) <= {-1, 0, 1} and len(out.recovered_key) == 4096
    assert out.victim_error < 1e-6  # client 2's own upload, decrypted with the recovered key


def test_ckks_attack_at_the_default_parameters(legacy):
    xs = [np.random.default_rng(i).uniform(-100, 100, 2 * 4096 + 5) for i in range(2)]
    out = ckks_key_recovery(CKKS(), xs)
    assert out.key_recovered and out.victim_error < 1e-9


@pytest.mark.parametrize("mode", sorted(CKKS_CASES))
def test_ckks_key_holders_refuse_crafted_chunks(mode):
    out = ckks_key_recovery(CKKS_CASES[mode](), ckks_inputs(3, 2 * 2048 + 3), victim=2)
    assert not out.key_recovered and out.refused == "MessageRejected: invalid signature"


def bfv(value_bits, **kw):
    return BFV(value_range=1.0, value_bits=value_bits, poly_modulus_degree=4096, coeff_mod_bit_sizes=(54, 55), **kw)


def bfv_inputs(n):
    gen = np.random.default_rng(n)
    return [gen.uniform(-1, 1, 2 * 4096) for _ in range(n)]


@pytest.mark.parametrize("mode", ["decryptor", "clients"])
def test_bfv_crafted_chunks_give_the_legacy_key_holder_s_key_away(legacy, mode):
    # n = 3, 16-bit values: t = 3 * 2^18 + 1, so the range check passes every crafted slot.
    proto = bfv(16, key_holder=mode)
    xs = bfv_inputs(3)
    out = bfv_key_recovery(proto, xs, victim=2)
    assert out.key_recovered and set(out.recovered_key) <= {-1, 0, 1} and out.attempts == 1
    assert out.victim_error <= proto.error_bound(1)


def test_bfv_retries_with_fresh_multipliers_until_the_range_check_passes(legacy):
    # n = 2, 26-bit values: t is far enough above n 2^k that one try passes with probability ~0.47.
    out = bfv_key_recovery(bfv(26), bfv_inputs(2), attempts=40)
    assert out.key_recovered and out.victim_error <= bfv(26).error_bound(1)


def test_masked_bfv_key_falls_but_exposes_only_masked_inputs(legacy):
    proto = bfv(16, key_holder="masked")
    xs = bfv_inputs(3)
    out = bfv_key_recovery(proto, xs, victim=2)
    k = proto.encoder.modulus_bits(3)
    assert out.key_recovered and out.victim_error is None
    top = out.victim_decrypted.astype(np.int64) >> (k - 4)  # masked: the top 4 bits look uniform
    assert np.bincount(top, minlength=16).min() > 0.5 * top.size / 16


@pytest.mark.parametrize("mode", ["decryptor", "clients", "masked"])
def test_bfv_key_holders_refuse_and_spend_their_key(mode):
    out = bfv_key_recovery(bfv(16, key_holder=mode), bfv_inputs(4), attempts=2)
    assert not out.key_recovered and out.attempts == 2
    assert "out of order" in out.refused  # the first, refused, request spent the key: no retry


# -- "clients" mode: one dealer per group (proofs/he.md H15) -------------------------------------------------


@pytest.fixture
def lowest_advertiser_deals(monkeypatch):
    """The "clients" mode dealer before the fix (the code of commit 9bdfcf0): a client deals whenever it is the
    lowest of the key list the server sends it, and takes the key of whichever signed dealer its upload
    request names."""
    from securefed.crypto import aead, kex

    def deal(self, reader):
        assert self._kex_key is not None
        s, ids = self._spec, self._p.directory(self._spec.n)
        count = reader.u32()
        peers = {}
        for _ in range(count):
            j = reader.u32()
            pk = bytes(reader.take(kex.KEY_BYTES))
            sig = reader.take(auth.SIG)
            if j >= s.n or j in peers:
                raise MessageRejected("invalid message: client list out of range or repeated")
            auth.verify(ids, self._p._TAG, s, j, pk, sig, purpose=auth.KEX)
            peers[j] = pk
        reader.end()
        if peers.get(self._id) != kex.public_bytes(self._kex_key) or min(peers) != self._id:  # the broken rule
            raise MessageRejected("invalid message: this client is not the dealer of this key list")
        ctx = backend.new_context(self._ring)
        public = backend.public_bytes(ctx)
        self._secret, self._key_id = backend.secret_bytes(ctx), backend.key_id(public)
        items = [wire.u32(len(public)), public, wire.u32(len(peers) - 1)]
        for j, pk in sorted(peers.items()):
            if j == self._id:
                continue
            key = kex.agree(self._kex_key, pk, label=parties._KEY_PURPOSE, session_id=s.session_id,
                            party_a=self._id, party_b=j)
            sealed = aead.seal(key, self._key_id + self._secret, purpose=parties._KEY_PURPOSE,
                               session_id=s.session_id, round_index=s.round_index, sender=self._id, recipient=j,
                               rng=self._rng)
            items += [wire.u32(j), wire.u32(len(sealed)), sealed]
        self._stage, self._dealer = parties.DEALT, True
        return self._frame.message("keys", self._id, items)

    def public_context(self, reader):
        if self._p.key_holder != "clients":
            return parties.verified_public(self._p, self._spec, self._ring, reader)
        public = bytes(reader.blob())
        dealer = reader.u32()
        dealer_pk = bytes(reader.take(kex.KEY_BYTES))
        dealer_sig = reader.take(auth.SIG)
        sealed = reader.rest()
        if self._stage == parties.DEALT:
            if dealer != self._id or len(sealed):
                raise MessageRejected("invalid message: the dealer gets no sealed key")
        elif dealer == self._id or not len(sealed) or dealer >= self._spec.n:  # any other dealer is taken
            raise MessageRejected("invalid message: no sealed key for this client")
        else:
            auth.verify(self._p.directory(self._spec.n), self._p._TAG, self._spec, dealer, dealer_pk, dealer_sig,
                        purpose=auth.KEX)
            self._receive_key(dealer, dealer_pk, sealed)
        if backend.key_id(public) != self._key_id:
            raise MessageRejected("invalid message: the public context is not the dealer's")
        return public, backend.load_context(public, self._ring, secret=False)

    monkeypatch.setattr(parties.HEClient, "_deal", deal)
    monkeypatch.setattr(parties.HEClient, "_public_context", public_context)


PARTITION_CASES = {
    "ckks": lambda **kw: CKKS(value_range=1.0, precision_bits=12, key_holder="clients", **kw, **SMALL),
    "bfv": lambda **kw: bfv(16, key_holder="clients", **kw),
}


@pytest.mark.parametrize("scheme", sorted(PARTITION_CASES))
def test_a_dealer_per_key_list_releases_every_input_in_one_round(lowest_advertiser_deals, scheme):
    proto = PARTITION_CASES[scheme]()
    xs = ckks_inputs(4, 6)
    out = clients_mode_partition(proto, xs)
    assert out.groups == ((0,), (1,), (2,), (3,)) and not out.refused
    assert out.decryptions == 4 and out.exposed == (0, 1, 2, 3)  # every input, alone, in one round
    assert max(out.errors.values()) <= proto.error_bound(4)
    # min_clients = 2 only halves it: two disjoint sums, each released by its own dealer.
    out = clients_mode_partition(PARTITION_CASES[scheme](min_clients=2), xs)
    assert sorted(out.released) == [(0, 1), (2, 3)] and not out.refused


@pytest.mark.parametrize("scheme", sorted(PARTITION_CASES))
def test_only_client_0_deals_so_the_partition_gets_one_release(scheme):
    proto = PARTITION_CASES[scheme]()
    xs = ckks_inputs(4, 6)
    out = clients_mode_partition(proto, xs)
    # Client 0 deals its list {0} and releases its own input (min_clients = 1: one chosen input per round, as
    # a dropout pattern gives); clients 1, 2 and 3 refuse to deal, so nothing else is decrypted.
    assert out.decryptions == 1 and list(out.released) == [(0,)]
    assert out.refused == tuple(f"client {c}, keys: MessageRejected: invalid message: only client 0 deals the key "
                                f"of a round" for c in (1, 2, 3))
    out = clients_mode_partition(PARTITION_CASES[scheme](min_clients=2), xs)
    assert list(out.released) == [(0, 1)] and len(out.refused) == 1  # client 2 refused to deal {2, 3}
