import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto import signing
from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError, MessageRejected


@given(st.binary(max_size=64), st.data())
def test_signatures_verify_only_for_their_message_and_purpose(msg, data):
    sk = signing.generate_signing_key(RandomSource(1))
    pk = signing.verify_key_bytes(sk)
    sig = signing.sign(sk, msg, purpose="survivors")
    signing.verify(pk, sig, msg, purpose="survivors")
    with pytest.raises(MessageRejected, match="^invalid"):
        signing.verify(pk, sig, msg, purpose="keys")
    with pytest.raises(MessageRejected):
        signing.verify(pk, sig, msg + b"\x00", purpose="survivors")
    bad = bytearray(sig)
    bad[data.draw(st.integers(0, 63))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(MessageRejected):
        signing.verify(pk, bytes(bad), msg, purpose="survivors")


def test_directory_gives_each_node_only_its_own_signing_key():
    d = signing.KeyDirectory.generate(4, RandomSource(2))
    assert d.covers(4) and not d.covers(5) and len(d) == 4
    node = d.restricted_to(2)
    assert node.verify_key(3) == d.verify_key(3)
    signing.verify(node.verify_key(2), signing.sign(node.signing_key(2), b"m", purpose="p"), b"m", purpose="p")
    with pytest.raises(ConfigurationError):
        node.signing_key(1)
    with pytest.raises(ConfigurationError):
        d.public_only().signing_key(0)
    with pytest.raises(ConfigurationError):
        d.verify_key(9)
    with pytest.raises(ConfigurationError):
        signing.KeyDirectory({0: d.verify_key(1)}, {0: d.signing_key(0)})
