"""The common header (protocols/wire.md; proofs/wire.md W1): a message is accepted only with exactly the
expected tag, version, phase, round, session, sender and body length."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.errors import MessageRejected
from securefed.protocols import wire

FIELDS = dict(tag=b"SFPL", version=1, phase=2, round_index=7, session_id=bytes(range(32)), sender=3)


@given(body=st.binary(max_size=64))
def test_a_message_with_the_expected_header_yields_its_body(body):
    msg = wire.pack_header(**FIELDS, body_len=len(body)) + body
    assert bytes(wire.unpack_message(msg, **FIELDS)) == body
    assert bytes(wire.unpack_message(bytearray(msg), **FIELDS)) == body
    assert wire.body(msg) == body


@given(body=st.binary(max_size=16), position=st.integers(0, wire.HEADER_SIZE - 1), flip=st.integers(1, 255))
def test_any_changed_header_byte_is_rejected(body, position, flip):
    msg = bytearray(wire.pack_header(**FIELDS, body_len=len(body)) + body)
    msg[position] ^= flip
    with pytest.raises(MessageRejected):
        wire.unpack_message(bytes(msg), **FIELDS)


@given(body=st.binary(min_size=1, max_size=16), cut=st.integers(1, 16))
def test_a_truncated_or_extended_message_is_rejected(body, cut):
    msg = wire.pack_header(**FIELDS, body_len=len(body)) + body
    for bad in (msg[:-min(cut, len(msg))], msg + b"\0" * cut, msg[: wire.HEADER_SIZE - 1]):
        with pytest.raises(MessageRejected):
            wire.unpack_message(bad, **FIELDS)


@pytest.mark.parametrize("data", [None, "text", 5, [1, 2]])
def test_something_that_is_not_bytes_is_rejected(data):
    with pytest.raises(MessageRejected, match="not bytes"):
        wire.unpack_message(data, **FIELDS)
