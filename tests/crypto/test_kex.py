import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto import kex
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected

# RFC 7748, Sec. 6.1
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of the code under test."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def test_known_answer_rfc7748_and_documented_info_layout():
    key = kex.agree(kex.load_private_key(ALICE_SK), BOB_PK, label="mask", session_id=b"S" * 32,
                    party_a=7, party_b=3, length=16)
    info = b"securefed/kex/mask\x00" + b"S" * 32 + b"i" + (3).to_bytes(4, "big") + b"i" + (7).to_bytes(4, "big")
    assert key == _hkdf_sha256(SHARED, info, 16)


@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_both_ends_agree_and_every_binding_changes_the_key(seed, a, b):
    if a == b:
        b = (a + 1) % 2**32
    rng = RandomSource(seed)
    ska, skb = kex.generate_private_key(rng.child("a")), kex.generate_private_key(rng.child("b"))
    pka, pkb = kex.public_bytes(ska), kex.public_bytes(skb)
    sid = rng.token_bytes(32)
    k1 = kex.agree(ska, pkb, label="mask", session_id=sid, party_a=a, party_b=b)
    assert k1 == kex.agree(skb, pka, label="mask", session_id=sid, party_a=b, party_b=a)
    others = {
        kex.agree(ska, pkb, label="channel", session_id=sid, party_a=a, party_b=b),
        kex.agree(ska, pkb, label="mask", session_id=bytes(32), party_a=a, party_b=b),
        kex.agree(ska, pkb, label="mask", session_id=sid, party_a=a, party_b=str(b)),
    }
    assert k1 not in others and len(others) == 3


@pytest.mark.parametrize("bad", [bytes(32), (1).to_bytes(32, "little"), bytes(31)])
def test_small_order_or_malformed_public_key_is_rejected(bad):
    sk = kex.generate_private_key(RandomSource(1))
    with pytest.raises(MessageRejected, match="invalid"):
        kex.agree(sk, bad, label="mask", session_id=bytes(32), party_a=0, party_b=1)


def test_seeded_generation_is_reproducible_and_keys_roundtrip():
    a = kex.generate_private_key(RandomSource(5).child("x"))
    b = kex.generate_private_key(RandomSource(5).child("x"))
    assert kex.public_bytes(a) == kex.public_bytes(b)
    assert kex.public_bytes(kex.load_private_key(kex.private_bytes(a))) == kex.public_bytes(a)
    with pytest.raises(ValueError):
        kex.agree(a, kex.public_bytes(b), label="mask", session_id=bytes(32), party_a=1, party_b=1)
