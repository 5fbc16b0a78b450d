"""The active-server attacks of securefed.testing.he_attacks (issue 18, part 4; proofs/he.md H6).

Each attack runs against the real party objects twice: with the key holder as it was before the
fix (``legacy``: it decrypts whatever ciphertexts it is handed and a refused request does not spend
its key), where it must recover the secret key and decrypt a victim's upload, and as it is, where
the key holder must refuse and nothing is recovered. Small rings (N = 4096) keep them fast.
"""

import numpy as np
import pytest

from securefed.errors import MessageRejected, ProtocolAborted
from securefed.protocols import _he_auth as auth
from securefed.protocols import _he_parties as parties
from securefed.protocols import _he_wire as wire
from securefed.protocols.he import BFV, CKKS
from securefed.testing.he_attacks import bfv_key_recovery, ckks_key_recovery

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
