import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.encoding import FixedPoint, decode_error_bound, modulus_bits, storage_dtype
from securefed.errors import ConfigurationError, InvalidInput


def modular_sum(encoded, k):
    acc = np.zeros(encoded[0].size, dtype=np.uint64)
    for e in encoded:
        acc += e  # uint64 wraps mod 2^64, and 2^k divides 2^64
    return acc & np.uint64((1 << k) - 1) if k < 64 else acc


@given(
    n=st.integers(1, 10_000),
    value_bits=st.integers(2, 40),
    c=st.floats(1e-3, 1e3),
    d=st.integers(1, 6),
    extreme=st.booleans(),
    seed=st.integers(0, 2**32),
)
@example(n=10_000, value_bits=50, c=1.0, d=3, extreme=True, seed=1)  # k = 64 exactly
@example(n=10_000, value_bits=16, c=0.01, d=3, extreme=False, seed=2)
def test_quantize_sum_decode_error_within_reported_bound(n, value_bits, c, d, extreme, seed):
    fp = FixedPoint(value_range=c, value_bits=value_bits)
    k = fp.modulus_bits(n)
    if k > 64:
        return
    gen = np.random.default_rng(seed)  # test data only, not secret
    # Worst case for wrap-around and rounding: every client at +-c; else uniform in range.
    xs = [np.full(d, c * gen.choice([-1.0, 1.0])) if extreme else gen.uniform(-c, c, d) for _ in range(n)]
    rng = RandomSource(seed)
    enc = [fp.encode(x, n=n, rng=rng) for x in xs]
    assert all(e.dtype == storage_dtype(k) for e in enc)
    got = fp.decode(modular_sum(enc, k), n=n, count=n)
    exact = [math.fsum(x[j] for x in xs) for j in range(d)]
    assert np.max(np.abs(got - exact)) <= fp.error_bound(n) == decode_error_bound(n, c, value_bits)


@given(arrays(np.float64, st.integers(1, 50), elements=st.floats(-1, 1)))
def test_decode_of_a_single_encoding_is_within_one_step(x):
    fp = FixedPoint(value_range=1.0, value_bits=12)
    got = fp.decode(fp.encode(x, n=1, rng=RandomSource(0)), n=1)
    assert np.max(np.abs(got - x)) <= fp.error_bound(1)


def test_stochastic_rounding_is_unbiased():
    # v = x*scale has fractional part 0.3: E[q] = v exactly; 200k draws give sd ~ 0.001.
    fp = FixedPoint(value_range=1.0, value_bits=8)
    x = np.full(200_000, (10 + 0.3) / fp.scale)
    q = fp.decode(fp.encode(x, n=1, rng=RandomSource(7)), n=1) * fp.scale
    assert set(np.round(q).astype(int).tolist()) == {10, 11}
    assert abs(q.mean() - 10.3) < 5 * math.sqrt(0.3 * 0.7 / x.size)


def test_rounding_coins_depend_on_the_source():
    fp = FixedPoint(value_range=1.0, value_bits=8)
    x = np.full(1000, 0.5 / fp.scale)
    a = fp.encode(x, n=1, rng=RandomSource(1))
    assert np.array_equal(a, fp.encode(x, n=1, rng=RandomSource(1)))  # seeded: reproducible
    assert not np.array_equal(a, fp.encode(x, n=1, rng=RandomSource()))  # OS-keyed: fresh


@pytest.mark.parametrize(
    "x",
    [np.array([0.0, np.nan]), np.array([np.inf]), np.array([-np.inf]), np.array([1.0000001]), np.array([-2.0])],
)
def test_nan_inf_and_out_of_range_raise_invalid_input(x):
    with pytest.raises(InvalidInput):
        FixedPoint(value_range=1.0, value_bits=16).encode(x, n=3, rng=RandomSource(0))


@pytest.mark.parametrize("x", [np.zeros((2, 2)), np.zeros(0), np.zeros(3, dtype=np.int32), [0.0, 1.0]])
def test_shape_and_dtype_errors_raise_invalid_input(x):
    with pytest.raises(InvalidInput):
        FixedPoint(value_range=1.0, value_bits=16).encode(x, n=3, rng=RandomSource(0))


def test_out_of_range_is_never_clipped_silently():
    with pytest.raises(InvalidInput, match="outside the declared range"):
        FixedPoint(value_range=0.5, value_bits=16).encode(np.array([0.1, 0.7]), n=2, rng=RandomSource(0))


def test_modulus_width_over_64_bits_is_a_configuration_error():
    assert modulus_bits(48, 2**16) == 64
    with pytest.raises(ConfigurationError):
        modulus_bits(48, 2**16 + 1)
    with pytest.raises(ConfigurationError):
        FixedPoint(value_range=1.0, value_bits=53).encode(np.zeros(3), n=4096, rng=RandomSource(0))


@pytest.mark.parametrize("kwargs", [dict(value_range=0.0, value_bits=8), dict(value_range=1.0, value_bits=1),
                                    dict(value_range=float("inf"), value_bits=8), dict(value_range=1.0, value_bits=54)])
def test_bad_encoder_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        FixedPoint(**kwargs)


def test_modulus_is_value_bits_plus_ceil_log2_n():
    assert [modulus_bits(16, n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [16, 17, 18, 18, 19, 26, 27]


@given(k=st.integers(2, 64), wide=st.booleans(), data=st.data())
def test_decode_centres_the_low_k_bits_of_each_word(k, wide, data):
    """decode reads each word modulo 2^k as a signed value in [-2^(k-1), 2^(k-1)) (the int32 path for
    k <= 32 and the int64 one agree with this integer reading, bits above k ignored)."""
    dtype = np.uint64 if wide or k > 32 else np.uint32
    top = 2 ** (8 * np.dtype(dtype).itemsize) - 1
    edges = [0, 1, 2 ** (k - 1) - 1, 2 ** (k - 1), 2**k - 1, top]
    s = np.array(edges + data.draw(st.lists(st.integers(0, top), max_size=40)), dtype=dtype)
    enc = FixedPoint(value_range=1.0, value_bits=min(53, max(2, k - 1)))
    n = 2 ** (k - enc.value_bits)  # so that modulus_bits(n) == k
    assert enc.modulus_bits(n) == k
    low = [int(v) % 2**k for v in s.tolist()]
    want = [float(v - 2**k if v >= 2 ** (k - 1) else v) * (1.0 / enc.scale) for v in low]
    assert enc.decode(s, n=n).tolist() == want


@pytest.mark.parametrize("value_range, value_bits", [(5e-324, 16), (1e-310, 16), (1e-300, 53)])
def test_a_value_range_whose_scale_overflows_is_refused(value_range, value_bits):
    # The scale was inf: every input quantized to 0 and error_bound(n) was 0 (issue 21, the public-API fuzz).
    with pytest.raises(ConfigurationError, match=f"value_range {value_range!r} is too small .* overflows float64"):
        FixedPoint(value_range=value_range, value_bits=value_bits)
    with pytest.raises(ConfigurationError, match="too small"):
        sf.protocols.SecAgg(value_range=value_range, value_bits=value_bits)


def test_the_smallest_value_range_with_a_finite_scale_still_sums_exactly():
    c = 1e-300
    fp = FixedPoint(value_range=c, value_bits=16)
    assert math.isfinite(fp.scale) and fp.error_bound(3) > 0
    xs = [np.array([0.5 * c, -0.25 * c, c])] * 3
    p = sf.protocols.SecAgg(value_range=c)
    total = sf.simulate_aggregation(p, xs, seed=1).total
    assert np.abs(total - np.sum(xs, axis=0)).max() <= p.error_bound(3)
