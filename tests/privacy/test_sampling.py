"""The samplers match their distributions (chi-square / KS at fixed seeds), and the tests have power."""

import math

import numpy as np
import pytest
from scipy import special, stats

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError
from securefed.privacy import sampling

N = 200_000  # draws per test: enough that a few percent change of scale is rejected (the power checks)
ALPHA = 1e-4  # a correct sampler fails a fixed-seed test with this probability


def chi2_pvalue(draws, pmf_at):
    """Chi-square goodness of fit over integer bins with expected count >= 20, tails pooled."""
    lo, hi = int(draws.min()), int(draws.max())
    support = np.arange(lo - 50, hi + 51)
    p = pmf_at(support)
    expected = p * draws.size
    keep = expected >= 20
    first, last = np.flatnonzero(keep)[[0, -1]]
    counts = np.bincount(draws - support[0], minlength=support.size).astype(float)
    obs = np.concatenate([[counts[: first + 1].sum()], counts[first + 1 : last], [counts[last:].sum()]])
    exp = np.concatenate([[p[: first + 1].sum()], p[first + 1 : last], [p[last:].sum()]])
    exp = exp / exp.sum() * draws.size
    return stats.chisquare(obs, exp).pvalue


def dg_pmf(sigma):
    def pmf(k):
        w = np.exp(-(k.astype(float) ** 2) / (2 * sigma**2))
        wide = np.arange(-int(60 * sigma) - 60, int(60 * sigma) + 61)
        return w / np.exp(-(wide.astype(float) ** 2) / (2 * sigma**2)).sum()
    return pmf


def skellam_pmf(variance):
    lam = variance / 2  # Sk(lam, lam): P(k) = exp(-2 lam) I_|k|(2 lam)
    return lambda k: special.ive(np.abs(k), 2 * lam)


def poisson_pmf(lam):
    return lambda k: np.where(k >= 0, stats.poisson.pmf(np.maximum(k, 0), lam), 0.0)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.7, 25.0])
def test_discrete_gaussian_matches_its_pmf(sigma):
    x = sampling.discrete_gaussian(RandomSource(11), sigma, N)
    assert x.dtype == np.int64
    assert chi2_pvalue(x, dg_pmf(sigma)) > ALPHA
    assert chi2_pvalue(x, dg_pmf(sigma * 1.02 if sigma > 1 else sigma * 1.1)) < 1e-6  # power


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.99, 10.0, 60.0, 5000.0])  # both branches: inversion and PTRS
def test_poisson_matches_its_pmf(lam):
    x = sampling.poisson(RandomSource(12), lam, N)
    assert chi2_pvalue(x, poisson_pmf(lam)) > ALPHA
    assert chi2_pvalue(x, poisson_pmf(lam * 1.02 if lam > 1 else lam * 1.1)) < 1e-6


@pytest.mark.parametrize("variance", [1.0, 30.0, 1e4])
def test_skellam_matches_its_pmf(variance):
    x = sampling.skellam(RandomSource(13), variance, N)
    assert chi2_pvalue(x, skellam_pmf(variance)) > ALPHA
    assert chi2_pvalue(x, skellam_pmf(variance * 1.1)) < 1e-6


@pytest.mark.parametrize("std", [1e-3, 1.0, 250.0])
def test_gaussian_matches_its_cdf(std):
    x = sampling.gaussian(RandomSource(14), std, N + 1)  # odd size: the last Box-Muller pair is cut
    assert x.size == N + 1
    assert stats.kstest(x, "norm", args=(0, std)).pvalue > ALPHA
    assert stats.kstest(x, "norm", args=(0, std * 1.05)).pvalue < 1e-6


def test_samplers_are_reproducible_from_a_seed_and_differ_across_sources():
    a = sampling.discrete_gaussian(RandomSource(5).child("noise"), 3.0, 1000)
    b = sampling.discrete_gaussian(RandomSource(5).child("noise"), 3.0, 1000)
    c = sampling.discrete_gaussian(RandomSource(5).child("other"), 3.0, 1000)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_zero_parameters_and_empty_sizes():
    rng = RandomSource(0)
    assert not sampling.discrete_gaussian(rng, 0.0, 5).any()
    assert not sampling.skellam(rng, 0.0, 5).any()
    assert sampling.gaussian(rng, 1.0, 0).size == 0
    assert sampling.discrete_gaussian(rng, 2.0, 0).size == 0


@pytest.mark.parametrize("call", [
    lambda r: sampling.gaussian(r, -1.0, 3),
    lambda r: sampling.discrete_gaussian(r, math.nan, 3),
    lambda r: sampling.poisson(r, math.inf, 3),
    lambda r: sampling.skellam(r, 1.0, -1),
])
def test_bad_parameters_are_refused(call):
    with pytest.raises(ConfigurationError):
        call(RandomSource(0))


@pytest.mark.parametrize("rate", [1.0, 1 - 2**-53, 0.5, 2**-60, 0.0])
def test_poisson_sample_takes_every_accepted_rate(rate):
    idx = sampling.poisson_sample(RandomSource(1), 10_000, rate)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    if rate == 1.0:
        assert idx.tolist() == list(range(10_000))
    elif rate == 0.0 or rate < 1e-9:
        assert idx.size == 0
    elif rate > 0.9:
        assert idx.size == 10_000  # misses one index with probability ~1e-12
    else:
        assert abs(idx.size - 5_000) < 5 * 50


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan, "1"])
def test_poisson_sample_refuses_bad_rates(rate):
    with pytest.raises(ConfigurationError):
        sampling.poisson_sample(RandomSource(1), 10, rate)
