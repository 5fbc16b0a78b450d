"""Distributed DDG and Skellam encoders: end to end through SecAgg/SecAgg+, noise provisioned from t."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.encoding import storage_dtype
from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import DDGEvent, DistributedDiscreteGaussian, DistributedSkellam, SkellamEvent, l2_norm
from securefed.privacy._bounds import rounded_l2_bound

ENCODERS = (DistributedDiscreteGaussian, DistributedSkellam)


def unit_vectors(n, d, seed, norm=1.0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=d) for _ in range(n)]
    return [x * (norm / np.linalg.norm(x)) * (1 - 1e-12) for x in xs]


def modular_sum(enc, xs, n, seed=0):
    k = enc.modulus_bits(n)
    acc = np.zeros(enc.dimension, dtype=np.uint64)
    for i, x in enumerate(xs):
        y = enc.encode(x, n=n, rng=RandomSource(seed).child(f"client/{i}"))
        assert y.dtype == storage_dtype(k) and y.shape == (enc.dimension,)
        assert int(y.max()) < 2**k
        acc += y.astype(np.uint64)
    acc &= np.uint64((1 << k) - 1) if k < 64 else np.uint64(2**64 - 1)
    return enc.decode(acc.astype(storage_dtype(k)), n=n, count=len(xs))


def dg_variance(sigma):
    k = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41, dtype=float)
    w = np.exp(-k * k / (2 * sigma * sigma))
    return float((w * k * k).sum() / w.sum())


@pytest.mark.parametrize("t", [3, 10])
@pytest.mark.parametrize("cls", ENCODERS)
@pytest.mark.parametrize("local_sigma", [0.6, 40.0])  # integer-domain std of one share
def test_the_sum_of_n_shares_has_the_claimed_variance(cls, t, local_sigma):
    n, d, z, c = 10, 100_000, 1.5, 2.0
    gamma = z * c / (local_sigma * math.sqrt(t))
    enc = cls(l2_clip=c, noise_multiplier=z, dimension=d, min_survivors=t, granularity=gamma, rotation=False)
    assert enc.local_sigma(n) == pytest.approx(local_sigma)
    noise = modular_sum(enc, [np.zeros(d)] * n, n) / gamma  # zero inputs: the sum is the noise alone
    share_var = dg_variance(local_sigma) if cls is DistributedDiscreteGaussian else local_sigma**2
    claimed = n * share_var
    # Sample variance of d independent coordinates: relative sd sqrt(2/d) ~ 0.45%; allow 5 sd.
    assert noise.var() == pytest.approx(claimed, rel=5 * math.sqrt(2 / d))
    assert abs(noise.mean()) < 5 * math.sqrt(claimed / d)
    if local_sigma > 10:  # the discrete Gaussian's variance is its parameter's square up to e^-(2 pi^2 sigma^2)
        assert n * local_sigma**2 * gamma**2 == pytest.approx((z * c) ** 2 * n / t)


@pytest.mark.parametrize("cls", ENCODERS)
def test_through_secagg_with_dropouts_down_to_t_the_sum_keeps_the_target_noise(cls):
    n, d, z, c, t = 8, 20_000, 0.8, 1.0, 5
    protocol = sf.protocols.SecAgg(threshold=t)
    assert protocol.min_survivors(n) == t
    enc = cls(l2_clip=c, noise_multiplier=z, dimension=d, min_survivors=protocol.min_survivors)
    xs = unit_vectors(n, d, seed=1)
    for dropped in ({}, {0: "masked_input", 3: "masked_input", 7: "share_keys"}):
        res = sf.simulate_aggregation(protocol.with_encoder(enc), xs, dropouts=dropped, seed=2)
        m = len(res.included)
        assert m == n - len(dropped) >= t
        noise = res.total - sum(xs[i] for i in res.included)
        # Per-coordinate noise variance (z c)^2 m / t, never below the target (z c)^2; rounding adds
        # at most m gamma^2 / 4, far below at this granularity.
        assert noise.var() == pytest.approx((z * c) ** 2 * m / t, rel=0.05)
        assert np.abs(noise).max() <= enc.error_bound(n)
        assert enc.event(included=m, n=n).noise_multiplier == pytest.approx(z * math.sqrt(m / t))


@pytest.mark.parametrize("cls", ENCODERS)
def test_through_secagg_plus_the_decoded_sum_is_the_inputs_plus_noise(cls):
    n, d = 6, 3000
    protocol = sf.protocols.SecAggPlus()
    enc = cls(l2_clip=0.5, noise_multiplier=1e-3, dimension=d, min_survivors=protocol.min_survivors)
    xs = unit_vectors(n, d, seed=3, norm=0.5)
    res = sf.simulate_aggregation(protocol.with_encoder(enc), xs, dropouts={2: "masked_input"}, seed=4)
    expected = sum(xs[i] for i in res.included)
    assert res.included == (0, 1, 3, 4, 5)
    assert np.abs(res.total - expected).max() <= enc.error_bound(n)
    assert np.abs(res.total - expected).max() > 0  # noise and rounding are there


@pytest.mark.parametrize("rotation", [True, False])
@pytest.mark.parametrize("cls", ENCODERS)
def test_worst_case_inputs_do_not_wrap(cls, rotation):
    """Every client puts its whole norm on one coordinate: the largest sum a coordinate can hold."""
    n, d, c = 12, 1000, 3.0
    enc = cls(l2_clip=c, noise_multiplier=0.5, dimension=d, min_survivors=4, rotation=rotation)
    spike = np.zeros(d)
    spike[17] = c
    for seed in range(3):
        total = modular_sum(enc, [spike] * n, n, seed=seed)
        assert abs(total[17] - n * c) <= enc.error_bound(n)
        assert np.abs(np.delete(total, 17)).max() <= enc.error_bound(n)


def test_rotation_buys_bits_when_the_signal_dominates():
    kw = dict(l2_clip=1.0, noise_multiplier=0.01, dimension=2**16, min_survivors=10)
    assert (DistributedDiscreteGaussian(rotation=True, **kw).modulus_bits(100)
            < DistributedDiscreteGaussian(rotation=False, **kw).modulus_bits(100))


@settings(max_examples=25)
@given(arrays(np.float64, 64, elements=st.floats(-1, 1)), st.sampled_from([0.05, math.exp(-0.5), 0.9]))
def test_conditional_rounding_never_exceeds_its_bound(x, beta):
    norm = l2_norm(x)
    if norm > 1.0:
        x = x / norm * (1 - 1e-12)
    enc = DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=1.0, dimension=64, min_survivors=1,
                                      granularity=0.3, beta=beta, rotation=False)
    bound = rounded_l2_bound(1.0 / 0.3, 64, beta)
    for seed in range(20):
        r = enc._round(x / 0.3, RandomSource(seed))
        assert math.sqrt(float(np.dot(r, r))) <= bound
        assert np.all(np.abs(r - x / 0.3) < 1)


def test_randomized_rounding_is_unbiased():
    enc = DistributedSkellam(l2_clip=1.0, noise_multiplier=1.0, dimension=1, min_survivors=1, granularity=1.0,
                             rotation=False)
    y = np.full(200_000, 0.3)
    r = enc._round(y, RandomSource(8))
    assert set(np.unique(r)) == {0, 1}
    assert r.mean() == pytest.approx(0.3, abs=5 * math.sqrt(0.21 / y.size))


@pytest.mark.parametrize("cls", ENCODERS)
def test_events_count_the_shares_actually_summed(cls):
    enc = cls(l2_clip=2.0, noise_multiplier=1.0, dimension=50, min_survivors=lambda n: n // 2, granularity=0.01)
    e = enc.event(included=8, n=10, sampling_rate=0.1, round=3)
    assert isinstance(e, DDGEvent if cls is DistributedDiscreteGaussian else SkellamEvent)
    assert (e.num_clients, e.round, e.sampling_rate, e.l2_clip, e.dimension) == (8, 3, 0.1, 2.0, 50)
    assert e.noise_multiplier == pytest.approx(math.sqrt(8 / 5))
    full = sf.privacy.compute_epsilon(mechanism=e.mechanism, noise_multiplier=e.noise_multiplier, delta=1e-5,
                                      l2_clip=2.0, dimension=50, granularity=0.01, num_clients=8)
    fewer = enc.event(included=5, n=10)
    assert sf.privacy.compute_epsilon(mechanism=e.mechanism, noise_multiplier=fewer.noise_multiplier, delta=1e-5,
                                      l2_clip=2.0, dimension=50, granularity=0.01, num_clients=5) > full


def test_each_round_rotates_with_its_own_public_seed():
    enc = DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=1.0, dimension=100, min_survivors=1)
    a, b = enc.for_round(b"a" * 32), enc.for_round(b"b" * 32)
    x = unit_vectors(1, 100, seed=0)[0]
    assert not np.allclose(a._rotation.forward(x), b._rotation.forward(x))
    assert a.describe()["rotation_seed"] == (b"a" * 32).hex() and a.l2_clip == enc.l2_clip


@pytest.mark.parametrize("x", [
    np.full(10, 1.0),  # norm sqrt(10) > clip 1
    np.array([np.nan] + [0.0] * 9),
    np.zeros(9),
    np.zeros((2, 5)),
    np.zeros(10, dtype=np.int64),
])
@pytest.mark.parametrize("cls", ENCODERS)
def test_bad_inputs_are_refused(cls, x):
    enc = cls(l2_clip=1.0, noise_multiplier=1.0, dimension=10, min_survivors=2)
    with pytest.raises(InvalidInput):
        enc.encode(x, n=3, rng=RandomSource(0))


@pytest.mark.parametrize("kwargs", [
    dict(l2_clip=0.0), dict(noise_multiplier=-1.0), dict(dimension=0), dict(granularity=0.0),
    dict(beta=1.0), dict(wrap_probability=0.0), dict(min_survivors="all"),
])
def test_bad_parameters_are_refused(kwargs):
    base = dict(l2_clip=1.0, noise_multiplier=1.0, dimension=10, min_survivors=2)
    with pytest.raises(ConfigurationError):
        DistributedDiscreteGaussian(**{**base, **kwargs})


def test_threshold_must_fit_the_round_and_the_modulus_64_bits():
    enc = DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=1.0, dimension=10, min_survivors=5)
    with pytest.raises(ConfigurationError):
        enc.encode(np.zeros(10), n=3, rng=RandomSource(0))  # t = 5 > n = 3
    huge = DistributedSkellam(l2_clip=1.0, noise_multiplier=1e6, dimension=10, min_survivors=1, granularity=1e-12)
    with pytest.raises(ConfigurationError, match="64"):
        huge.modulus_bits(10)


def test_protocols_without_integer_encodings_refuse_the_encoders():
    enc = DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=1.0, dimension=10, min_survivors=1)
    with pytest.raises(ConfigurationError):
        sf.protocols.Plain().with_encoder(enc)
