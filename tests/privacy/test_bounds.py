"""DDG and Skellam accounting: monotonicity, the Gaussian limit, and an independent transcription."""

import math

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from securefed.privacy import compute_epsilon, rdp_orders
from securefed.privacy._bounds import ddg_tau, poisson_subsampled_rdp, rounded_l2_bound

MECHS = ("ddg", "skellam")


def eps(mechanism, **p):
    p = dict(p)
    if mechanism == "skellam":
        p.pop("num_clients", None)
    return compute_epsilon(mechanism=mechanism, **p)


base_params = st.fixed_dictionaries({
    "noise_multiplier": st.floats(0.5, 5.0),
    "sampling_rate": st.sampled_from([1.0, 0.5, 0.1, 0.01]),
    "steps": st.integers(1, 500),
    "delta": st.sampled_from([1e-3, 1e-5, 1e-8]),
    "l2_clip": st.floats(0.1, 10.0),
    "dimension": st.integers(1, 10**6),
    "granularity_rel": st.floats(1e-6, 0.3),  # granularity / l2_clip
    "beta": st.sampled_from([0.0, 0.1, math.exp(-0.5), 0.9]),
    "num_clients": st.integers(1, 300),
})


def resolve(p):
    p = dict(p)
    p["granularity"] = p.pop("granularity_rel") * p["l2_clip"]
    return p


# For each parameter: how it moves, and the direction epsilon must follow (theory: proofs/dp.md section 4).
DIRECTIONS = {
    "noise_multiplier": (lambda v, f: v * f, -1),
    "sampling_rate": (lambda v, f: min(1.0, v * f), +1),
    "steps": (lambda v, f: math.ceil(v * f), +1),
    "delta": (lambda v, f: min(0.5, v * f), -1),
    "granularity": (lambda v, f: v * f, +1),
    "l2_clip": (lambda v, f: v * f, -1),  # at a fixed granularity: relatively finer rounding
    "dimension": (lambda v, f: math.ceil(v * f), +1),
    "beta": (lambda v, f: min(0.99, v + (f - 1.0) / 10.0), -1),
    "num_clients": (lambda v, f: math.ceil(v * f), +1),  # same total noise in more, smaller shares
}


def moved(mechanism, p, name, factor):
    move, sign = DIRECTIONS[name]
    return eps(mechanism, **p), eps(mechanism, **dict(p, **{name: move(p[name], factor)})), sign


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@settings(max_examples=15)
@given(mechanism=st.sampled_from(MECHS), params=base_params, factor=st.floats(1.05, 4.0))
def test_epsilon_is_monotone_where_theory_says_so(name, mechanism, params, factor):
    assume(not (name == "num_clients" and mechanism == "skellam"))  # Skellam shares sum to one Skellam
    a, b, sign = moved(mechanism, resolve(params), name, factor)
    assume(math.isfinite(a) and math.isfinite(b))
    if sign > 0:
        assert b >= a * (1 - 1e-9) - 1e-12
    else:
        assert b <= a * (1 + 1e-9) + 1e-12


# A point where every parameter matters (rounding at the scale of sqrt(d), coarse shares for tau).
REFERENCE = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=100, delta=1e-5, l2_clip=1.0, dimension=10_000,
                 granularity=0.01, beta=math.exp(-0.5), num_clients=10)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("mechanism", MECHS)
def test_each_parameter_moves_epsilon_strictly_at_a_reference_point(mechanism, name):
    if name == "num_clients":
        p = dict(REFERENCE, granularity=0.3, dimension=10)  # shares of std ~1 in integer units: tau > 0
    else:
        p = REFERENCE
    a, b, sign = moved(mechanism, p, name, 2.0)
    if name == "num_clients" and mechanism == "skellam":
        assert a == b
    else:
        assert (b - a) * sign > 1e-6 * a


@settings(max_examples=20)
@given(st.sampled_from(MECHS), base_params, st.floats(0.01, 100.0))
def test_epsilon_depends_on_clip_and_granularity_only_through_their_ratio(mechanism, params, k):
    p = resolve(params)
    scaled = dict(p, l2_clip=p["l2_clip"] * k, granularity=p["granularity"] * k)
    assert eps(mechanism, **scaled) == pytest.approx(eps(mechanism, **p), rel=1e-9)


def test_skellam_ignores_the_number_of_shares():
    kw = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=100, delta=1e-5, l2_clip=1.0, dimension=100,
              granularity=0.01)
    assert compute_epsilon(mechanism="skellam", num_clients=2, **kw) == compute_epsilon(
        mechanism="skellam", num_clients=200, **kw)


FULL = [(5.0, 100), (1.5, 10), (2.0, 50), (0.9, 3)]


@pytest.mark.parametrize("z, steps", FULL)
@pytest.mark.parametrize("mechanism", MECHS)
def test_full_participation_approaches_the_gaussian_as_granularity_shrinks(mechanism, z, steps):
    d = 1000
    gauss = compute_epsilon(noise_multiplier=z, steps=steps, delta=1e-5)
    ratios = [
        eps(mechanism, noise_multiplier=z, steps=steps, delta=1e-5, l2_clip=1.0, dimension=d,
            granularity=g / math.sqrt(d), num_clients=10) / gauss
        for g in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
    ]
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))  # finer rounding never costs more
    assert ratios[0] > 1.05  # coarse rounding does cost
    # DDG's bound holds at every real order, so it reaches the Gaussian value; Skellam's is evaluated at
    # integer orders (a fractional order takes its ceiling), which costs at most a few percent.
    assert 1.0 - 1e-9 <= ratios[-1] <= (1.0005 if mechanism == "ddg" else 1.03)


@pytest.mark.parametrize("z, q, steps", [(1.0, 0.1, 100), (1.1, 0.01, 1000), (3.0, 0.3, 20)])
@pytest.mark.parametrize("mechanism", MECHS)
def test_sampled_rounds_approach_the_gaussian_under_the_same_amplification_bound(mechanism, z, q, steps):
    """With q < 1 both papers amplify with Zhu and Wang's general bound; in the limit the mechanisms
    become the Gaussian under that bound, which is above dp-accounting's exact sampled-Gaussian value."""
    orders = rdp_orders()
    ceil = np.maximum(np.ceil(orders - 1e-9).astype(int), 2)
    grid = np.arange(ceil.max() + 1, dtype=float)
    per_step = poisson_subsampled_rdp(np.unique(ceil), q, grid / (2 * z * z))
    gauss_zw = steps * per_step[np.searchsorted(np.unique(ceil), ceil)]
    log_delta = math.log(1e-5)
    limit = min(r + math.log1p(-1 / a) - (log_delta + math.log(a)) / (a - 1) for a, r in zip(orders, gauss_zw))
    got = eps(mechanism, noise_multiplier=z, sampling_rate=q, steps=steps, delta=1e-5, l2_clip=1.0,
              dimension=1000, granularity=1e-7, num_clients=10)
    assert got == pytest.approx(limit, rel=2e-3)
    assert got >= compute_epsilon(noise_multiplier=z, sampling_rate=q, steps=steps, delta=1e-5)


# -- an independent transcription of the papers' formulas (mpmath, scalar loops) ------------------


def naive_rdp_one_step(mechanism, alpha, z, q, clip, gamma, d, beta, n):
    """Kairouz-Liu-Steinke Prop. 14 / Agarwal-Kairouz-Liu Thm 3.5, then Zhu-Wang Thm 5, written out."""
    mp = mpmath.mp
    mp.dps = 50
    c = mpmath.mpf(clip) / gamma
    l2 = c + mpmath.sqrt(d)
    if beta > 0:
        l2 = min(l2, mpmath.sqrt(c**2 + mpmath.mpf(d) / 4 + mpmath.sqrt(2 * mpmath.log(1 / mpmath.mpf(beta)))
                                 * (c + mpmath.sqrt(d) / 2)))
    l1 = l2 * min(mpmath.sqrt(d), l2)
    sigma = z * c

    def base(a):
        if mechanism == "ddg":
            s_local2 = sigma**2 / n
            tau = 10 * mpmath.fsum(mpmath.exp(-2 * mpmath.pi**2 * s_local2 * k / (k + 1)) for k in range(1, n))
            return min(a * l2**2 / (2 * sigma**2) + tau * d,
                       a / 2 * (l2**2 / sigma**2 + 2 * l1 * tau / sigma + tau**2 * d),
                       a / 2 * (l2 / sigma + tau * mpmath.sqrt(d)) ** 2)
        mu = sigma**2
        return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))

    exact = base(alpha if mechanism == "ddg" else max(2, math.ceil(alpha - 1e-9)))  # DDG: any real order
    if q >= 1:
        return exact
    a = max(2, math.ceil(alpha - 1e-9))
    q = mpmath.mpf(q)
    total = ((1 - q) ** (a - 1) * (a * q - q + 1)
             + mpmath.binomial(a, 2) * q**2 * (1 - q) ** (a - 2) * mpmath.exp(base(2)))
    total += 3 * mpmath.fsum(mpmath.binomial(a, l) * (1 - q) ** (a - l) * q**l * mpmath.exp((l - 1) * base(l))
                             for l in range(3, a + 1))
    return min(mpmath.log(total) / (a - 1), exact)


@pytest.mark.parametrize("mechanism, z, q, steps, gamma, d, beta, n", [
    ("ddg", 1.0, 1.0, 10, 0.01, 100, 0.0, 5),
    ("ddg", 0.7, 0.2, 50, 0.003, 2000, math.exp(-0.5), 30),
    ("ddg", 2.0, 0.05, 200, 0.05, 10, 0.0, 3),  # coarse: tau and the L1 terms matter
    ("skellam", 1.0, 1.0, 10, 0.01, 100, 0.0, 5),
    ("skellam", 0.7, 0.2, 50, 0.003, 2000, math.exp(-0.5), 30),
    ("skellam", 2.0, 0.05, 200, 0.2, 10, 0.0, 3),
])
def test_matches_an_independent_transcription_of_the_papers(mechanism, z, q, steps, gamma, d, beta, n):
    orders = [a for a in rdp_orders() if a <= 64]  # the transcription is slow at high orders
    best = math.inf
    for a in orders:
        r = steps * float(naive_rdp_one_step(mechanism, a, z, q, 1.0, gamma, d, beta, n))
        best = min(best, r + math.log(1 / 1e-5) / (a - 1))  # the classic conversion, written out
    # Ours uses more orders (up to 1024), so it can only be lower, and is the same where the optimum is low.
    ours = compute_epsilon(mechanism=mechanism, noise_multiplier=z, sampling_rate=q, steps=steps, delta=1e-5,
                           l2_clip=1.0, dimension=d, granularity=gamma, beta=beta, num_clients=n,
                           conversion="classic")
    assert ours == pytest.approx(best, rel=1e-9)


def test_rounding_bound_of_the_papers():
    # Unconditional rounding: c + sqrt(d); conditional: Kairouz et al. Theorem 1, smaller when beta > 0.
    assert rounded_l2_bound(100.0, 400, 0.0) == 120.0
    b = rounded_l2_bound(100.0, 400, math.exp(-0.5))
    assert b == pytest.approx(math.sqrt(100**2 + 100 + 1.0 * (100 + 10)))
    assert b < 120.0


@pytest.mark.parametrize("local_sigma", [0.05, 0.3, 1.0])
def test_ddg_tau_of_a_huge_round_is_an_upper_bound_without_the_memory(local_sigma):
    # Past 2^20 terms ddg_tau bounds each term by its limit: above the exact sum, and close to it.
    n = 2**20 + 5000
    k = np.arange(1, n, dtype=np.float64)
    exact = float(10.0 * np.exp(-2.0 * math.pi**2 * local_sigma**2 * k / (k + 1.0)).sum())
    assert exact <= ddg_tau(local_sigma, n) <= exact * (1 + 1e-9) + 1e-300
    assert ddg_tau(local_sigma, 2**20 + 1) == pytest.approx(exact - float(
        10.0 * np.exp(-2.0 * math.pi**2 * local_sigma**2 * k[2**20:] / (k[2**20:] + 1.0)).sum()), rel=1e-12)
    huge = ddg_tau(local_sigma, 2**32 - 1)  # was a 32 GiB array (MemoryError)
    assert math.isfinite(huge) and huge >= exact
    assert math.isfinite(compute_epsilon(mechanism="ddg", noise_multiplier=1.0, delta=1e-5, l2_clip=1.0,
                                         dimension=100, granularity=0.01, num_clients=2**32 - 1))
