"""``with_identities``: the active variants take the round's identity directory from the caller."""

import numpy as np
import pytest

from securefed import simulate_aggregation
from securefed.crypto.random import RandomSource
from securefed.crypto.signing import KeyDirectory
from securefed.errors import ConfigurationError, MessageRejected
from securefed.protocols import SecAgg, SecAggPlus
from securefed.protocols.base import RoundSpec


@pytest.mark.parametrize("cls", [SecAgg, SecAggPlus])
def test_a_protocol_with_identities_signs_with_them_and_leaves_the_original_alone(cls):
    n = 6
    keys = KeyDirectory.generate(n, RandomSource(1))
    base = cls(adversary="active")
    bound = base.with_identities(keys)
    xs = [np.full(4, (i + 1) / 8) for i in range(n)]
    res = simulate_aggregation(bound, xs, seed=2)
    np.testing.assert_allclose(res.total, sum(xs), atol=bound.error_bound(n))
    assert bound._directory(n) is keys and base._directory(n) is not keys
    # A client's advertised keys are signed with its key in the directory: the server checks them there.
    spec = RoundSpec(n=n, dim=4, session_id=bytes(32))
    server = bound.server(spec, rng=RandomSource(3))
    others = KeyDirectory.generate(n, RandomSource(4))
    client = bound.with_identities(others).client(spec, 0, xs[0], rng=RandomSource(5))
    advert = client.handle("advertise_keys", server.requests("advertise_keys")[0])
    with pytest.raises(MessageRejected):
        server.receive("advertise_keys", 0, advert)


def test_identities_must_be_a_key_directory():
    with pytest.raises(ConfigurationError):
        SecAggPlus(adversary="active").with_identities({0: b"x" * 32})
