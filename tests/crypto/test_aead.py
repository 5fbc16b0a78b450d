import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto import aead
from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected

KEY = bytes(range(32))
CTX = dict(purpose="shares", session_id=b"s" * 32, round_index=3, sender=1, recipient=2)


def test_sealed_message_is_standard_aes_gcm_with_the_documented_associated_data():
    sealed = aead.seal(KEY, b"secret share", rng=RandomSource(1), **CTX)
    assert len(sealed) == aead.sealed_size(12)
    ad = b"securefed/aead/shares\x00" + b"s" * 32 + (3).to_bytes(4, "big") + b"i\x00\x00\x00\x01" + b"i\x00\x00\x00\x02"
    assert AESGCM(KEY).decrypt(sealed[:12], sealed[12:], ad) == b"secret share"
    assert aead.open_sealed(KEY, sealed, **CTX) == b"secret share"


@given(st.binary(max_size=100), st.data())
def test_tampering_any_byte_is_rejected_as_invalid(plaintext, data):
    sealed = bytearray(aead.seal(KEY, plaintext, rng=RandomSource(2), **CTX))
    i = data.draw(st.integers(0, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(MessageRejected, match="^invalid"):
        aead.open_sealed(KEY, bytes(sealed), **CTX)


@pytest.mark.parametrize(
    "change",
    [dict(purpose="other"), dict(session_id=b"t" * 32), dict(round_index=4), dict(sender=2, recipient=1),
     dict(recipient=3), dict(sender="1")],
)
def test_replayed_or_redirected_message_does_not_open(change):
    sealed = aead.seal(KEY, b"x" * 72, rng=RandomSource(3), **CTX)
    with pytest.raises(MessageRejected):
        aead.open_sealed(KEY, sealed, **{**CTX, **change})


def test_truncated_and_wrong_key_are_rejected():
    sealed = aead.seal(KEY, b"abc", rng=RandomSource(4), **CTX)
    for bad in (sealed[:10], sealed[:-1], b""):
        with pytest.raises(MessageRejected):
            aead.open_sealed(KEY, bad, **CTX)
    with pytest.raises(MessageRejected):
        aead.open_sealed(bytes(32), sealed, **CTX)
