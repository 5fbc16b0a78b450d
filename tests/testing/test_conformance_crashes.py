"""check_protocol reports a server that crashes on a bad message as a ConformanceError naming the
property (issue 21: a receive that raised ValueError escaped check_protocol as a raw ValueError)."""

import numpy as np
import pytest

from securefed.protocols import Plain
from securefed.protocols import plain as plain_module
from securefed.testing import ConformanceError, check_protocol


class _ParsesBlindly(plain_module._PlainServer):
    """Raises ValueError (numpy's, from reshaping the body) instead of MessageRejected on a body of the wrong size."""

    def receive(self, phase, party, payload):
        body = payload[plain_module.wire.HEADER_SIZE :]
        np.frombuffer(body, dtype="<f8").reshape(self._spec.dim)  # ValueError on a truncated or extended upload
        super().receive(phase, party, payload)


class RaisesValueError(Plain):
    def server(self, spec, *, rng):
        return _ParsesBlindly(spec)


def test_a_receive_that_raises_value_error_is_a_malformed_messages_violation():
    with pytest.raises(ConformanceError) as info:
        check_protocol(RaisesValueError, unprotected=True, properties=["malformed_messages"], max_examples=60)
    err = info.value
    assert err.property == "malformed_messages"
    text = str(err)
    assert "violates 'malformed_messages'" in text and "raised ValueError" in text
    assert "MessageRejected" in text and "counterexample" in text


def test_the_honest_protocol_still_passes_the_message_properties():
    check_protocol(Plain, unprotected=True, properties=["malformed_messages", "replayed_messages"], max_examples=20)
