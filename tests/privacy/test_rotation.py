import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securefed.privacy import HadamardRotation

dims = st.integers(1, 3000)


@given(dims.flatmap(lambda d: arrays(np.float64, d, elements=st.floats(-1e6, 1e6))),
       st.binary(min_size=32, max_size=32))
def test_rotation_is_orthogonal_and_inverted_exactly_enough(x, seed):
    r = HadamardRotation(x.size, seed)
    y = r.forward(x)
    scale = max(1.0, float(np.abs(x).max()))
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12, abs_tol=1e-9 * scale)
    np.testing.assert_allclose(r.inverse(y), x, atol=1e-9 * scale)
    out = y.copy()
    assert r.inverse(out, out=out) is out
    np.testing.assert_allclose(out, x, atol=1e-9 * scale)


@given(st.integers(2, 5000), st.binary(min_size=32, max_size=32), st.data())
def test_rotation_flattens_a_spike(d, seed, data):
    """Every output coordinate is a Rademacher sum with variance proxy <= ||x||^2 / B (proofs/dp.md 3.2)."""
    x = np.zeros(d)
    x[data.draw(st.integers(0, d - 1))] = 1.0
    r = HadamardRotation(d, seed)
    assert d / 2 < r.block <= d
    p = 1e-9  # Hoeffding: max_j |y_j| >= sqrt(2 log(2 d / p) / B) with probability <= p
    assert np.abs(r.forward(x)).max() <= math.sqrt(2 * math.log(2 * d / p) / r.block)


def test_signs_come_from_the_public_seed():
    x = np.arange(10.0)
    assert np.array_equal(HadamardRotation(10, b"s" * 32).forward(x), HadamardRotation(10, b"s" * 32).forward(x))
    assert not np.allclose(HadamardRotation(10, b"s" * 32).forward(x), HadamardRotation(10, b"t" * 32).forward(x))
