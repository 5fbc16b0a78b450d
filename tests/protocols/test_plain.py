import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import securefed as sf
from securefed.errors import InvalidInput, MessageRejected, ProtocolAborted


def sequential_sum(xs):
    acc = np.zeros(xs[0].size)
    for x in xs:
        acc += x
    return acc


@given(
    st.integers(1, 8).flatmap(
        lambda n: st.integers(1, 40).flatmap(
            lambda d: st.lists(
                arrays(np.float64, d, elements=st.floats(-1e6, 1e6, allow_nan=False)), min_size=n, max_size=n
            )
        )
    ),
    st.data(),
)
def test_plain_total_is_exact_float64_sum_of_included(xs, data):
    n = len(xs)
    dropped = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    res = sf.simulate_aggregation(sf.protocols.Plain(), xs, dropouts=dict.fromkeys(dropped, "upload"), seed=1)
    assert res.included == tuple(c for c in range(n) if c not in dropped)
    assert res.total.dtype == np.float64
    np.testing.assert_array_equal(res.total, sequential_sum([xs[c] for c in res.included]))
    assert set(res.dropped) == dropped


def test_plain_all_dropped_aborts():
    with pytest.raises(ProtocolAborted) as e:
        sf.simulate_aggregation(sf.protocols.Plain(), [np.ones(3)] * 2, dropouts={0: "upload", 1: "upload"})
    assert e.value.reason is sf.errors.AbortReason.NO_INPUTS


@pytest.mark.parametrize(
    "inputs",
    [
        [np.array([1.0, np.nan])],
        [np.array([1.0, np.inf])],
        [np.ones(3), np.ones(4)],
        [np.ones((2, 2))],
        [np.array([1, 2])],
        [],
    ],
)
def test_plain_bad_inputs_raise_invalid_input(inputs):
    with pytest.raises(InvalidInput):
        sf.simulate_aggregation(sf.protocols.Plain(), inputs)


def test_plain_server_rejects_replay_and_tampering_without_touching_the_sum():
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec

    p = sf.protocols.Plain()
    spec = RoundSpec(n=2, dim=3, session_id=bytes(32))
    server = p.server(spec, rng=RandomSource(0))
    reqs = server.requests("upload")
    c0 = p.client(spec, 0, np.array([1.0, 2.0, 3.0]), rng=RandomSource(1))
    c1 = p.client(spec, 1, np.array([4.0, 5.0, 6.0]), rng=RandomSource(2))
    m0, m1 = c0.handle("upload", reqs[0]), c1.handle("upload", reqs[1])
    server.receive("upload", 0, m0)
    with pytest.raises(MessageRejected):
        server.receive("upload", 0, m0)  # replay
    with pytest.raises(MessageRejected):
        server.receive("upload", 1, m1[:-1])  # truncated: client 1 becomes a dropout
    other = RoundSpec(n=2, dim=3, session_id=bytes(31) + b"\x01")
    with pytest.raises(MessageRejected):
        p.server(other, rng=RandomSource(0)).receive("upload", 0, m0)  # another session
    server.finish_phase("upload")
    total, included = server.result()
    assert included == (0,)
    np.testing.assert_array_equal(total, [1.0, 2.0, 3.0])


def test_plain_client_uploads_once_and_server_rejects_non_finite_bodies():
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec
    from securefed.protocols.wire import HEADER_SIZE

    p = sf.protocols.Plain()
    spec = RoundSpec(n=1, dim=3, session_id=bytes(32))
    server = p.server(spec, rng=RandomSource(0))
    req = server.requests("upload")[0]
    client = p.client(spec, 0, np.array([1.0, 2.0, 3.0]), rng=RandomSource(1))
    msg = client.handle("upload", req)
    with pytest.raises(ProtocolAborted) as e:
        client.handle("upload", req)  # the message was the input's only copy
    assert e.value.reason is sf.errors.AbortReason.REQUEST_REFUSED
    bad = msg[:HEADER_SIZE] + np.array([1.0, np.nan, 3.0], dtype="<f8").tobytes()
    with pytest.raises(MessageRejected, match="non-finite"):
        server.receive("upload", 0, bad)
    assert set(server.dropped) == {0}


@given(st.integers(1, 6), st.integers(1, 20), st.booleans(), st.data())
def test_plain_client_state_survives_dump_and_load(n, dim, with_input, data):
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec

    p = sf.protocols.Plain()
    spec = RoundSpec(n=n, dim=dim, session_id=data.draw(st.binary(min_size=32, max_size=32)), round_index=7)
    i = data.draw(st.integers(0, n - 1))
    x = data.draw(arrays(np.float64, dim, elements=st.floats(-1e6, 1e6, allow_nan=False)))
    client = p.client(spec, i, x if with_input else None, rng=RandomSource(1))
    restored = p.load_client(client.dump(), rng=RandomSource(2))
    if not with_input:
        restored.set_input(x)
    request = p.server(spec, rng=RandomSource(0)).requests("upload")[i]
    assert restored.handle("upload", request) == p.client(spec, i, x, rng=RandomSource(3)).handle("upload", request)


def test_plain_load_client_rejects_corrupt_state():
    from securefed.crypto.random import RandomSource
    from securefed.protocols.base import RoundSpec

    p = sf.protocols.Plain()
    state = p.client(RoundSpec(n=2, dim=3, session_id=bytes(32)), 1, np.ones(3), rng=RandomSource(1)).dump()
    for bad in (state[:-1], state + b"\x00", b"XXXX" + state[4:], state[:4] + b"\x09" + state[5:], b""):
        with pytest.raises(InvalidInput):
            p.load_client(bad, rng=RandomSource(2))
