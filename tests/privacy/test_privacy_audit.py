"""The one-run privacy audit (securefed.testing.privacy_audit): sound on the library's mechanisms, and it catches
noise that repeats (a public seed) or that is smaller than declared.

Cheap: every audit is one release (a few for the distributed encoders) of 256-1000 canaries, a fraction of a
second each. Honest audits use different seeds for the audited run and the reference run (the auditor does not
know the key); a seeded deployment gives both the same RandomSource(seed).
"""

import math

import numpy as np
import pytest
from scipy import stats

from securefed.errors import ConfigurationError
from securefed.privacy import (
    DPSGD,
    CentralGaussian,
    DistributedDiscreteGaussian,
    DistributedSkellam,
    sampling,
)
from securefed.testing import ConformanceError
from securefed.testing.privacy_audit import (
    accounted_epsilon,
    assert_epsilon_respected,
    audit_epsilon,
    central_mechanism,
    distributed_mechanism,
    dpsgd_mechanism,
    epsilon_lower_bound,
    in_rounds,
    p_value,
)

DELTA = 1e-5


def central(z):
    noise = CentralGaussian(noise_multiplier=z, l2_clip=1.0)
    return central_mechanism(noise), noise.event(included=1, n=1), 1000


def distributed(cls, z, d=256):
    enc = cls(l2_clip=1.0, noise_multiplier=z, dimension=d, min_survivors=d)
    return distributed_mechanism(enc), enc.event(included=d, n=d), d


def dpsgd(q, z):
    dp = DPSGD(noise_multiplier=z, max_grad_norm=1.0, sampling_rate=q)
    return dpsgd_mechanism(dp), dp.event(steps=1), 500


CASES = {
    "central-z0.7": lambda: central(0.7),
    "central-z2": lambda: central(2.0),
    "ddg-z1": lambda: distributed(DistributedDiscreteGaussian, 1.0),
    "skellam-z1": lambda: distributed(DistributedSkellam, 1.0),
    "dpsgd-q1-z1": lambda: dpsgd(1.0, 1.0),
    "dpsgd-q0.5-z2": lambda: dpsgd(0.5, 2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_honest_audits_stay_below_the_accountant(case):
    mechanism, event, m = CASES[case]()
    result = audit_epsilon(mechanism, canaries=m, delta=DELTA, seed=1, noise_seed=2, reference_seed=3)
    epsilon = accounted_epsilon(event, DELTA)
    assert_epsilon_respected(result, epsilon)
    assert 0.0 <= result.epsilon_lower_bound < epsilon
    assert result.canaries == m and result.correct <= result.guesses <= m


SEEDED = {
    "central-z2": lambda: central(2.0),
    "ddg-z2": lambda: distributed(DistributedDiscreteGaussian, 2.0),
    "skellam-z2": lambda: distributed(DistributedSkellam, 2.0),
    "dpsgd-q0.5-z2": lambda: dpsgd(0.5, 2.0),
    "dpsgd-q1-z2": lambda: dpsgd(1.0, 2.0),
}


@pytest.mark.parametrize("case", list(SEEDED))
def test_a_seeded_run_is_caught(case):
    """Noise from a public seed: the auditor runs the mechanism again with the same RandomSource(seed) on the
    neighbouring input without canaries, gets identical noise, and reads every canary off the difference."""
    mechanism, event, m = SEEDED[case]()
    result = audit_epsilon(mechanism, canaries=m, delta=DELTA, seed=1, noise_seed=7, reference_seed=7)
    epsilon = accounted_epsilon(event, DELTA)
    assert result.score == "difference" and result.epsilon_lower_bound > epsilon, (result, epsilon)
    with pytest.raises(ConformanceError) as info:
        assert_epsilon_respected(result, epsilon, what=case)
    assert info.value.property == "audit" and "public seed" in str(info.value)


def test_less_noise_than_declared_is_caught():
    """A central module that charges for z = 2 (epsilon 2.2) but adds z = 0.5: the audit alone shows it."""

    class QuarterNoise(CentralGaussian):
        def add_to(self, total, rng):
            total += sampling.gaussian(rng, self.stddev / 4, total.size)
            return total

    noise = QuarterNoise(noise_multiplier=2.0, l2_clip=1.0)
    result = audit_epsilon(central_mechanism(noise), canaries=1000, delta=DELTA, seed=1, noise_seed=2,
                           reference_seed=3)
    assert result.epsilon_lower_bound > accounted_epsilon(noise.event(included=1, n=1), DELTA)


def test_rounds_compose_in_parallel():
    """A 16-coordinate encoder audits 512 canaries over 32 releases; the seeded run is still caught."""
    enc = DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=2.0, dimension=16, min_survivors=16)
    mech = in_rounds(distributed_mechanism(enc), 16)
    epsilon = accounted_epsilon(enc.event(included=16, n=16), DELTA)
    honest = audit_epsilon(mech, canaries=512, delta=DELTA, seed=1, noise_seed=2, reference_seed=3)
    seeded = audit_epsilon(mech, canaries=512, delta=DELTA, seed=1, noise_seed=4, reference_seed=4)
    assert honest.epsilon_lower_bound < epsilon < seeded.epsilon_lower_bound


def reference_p_value(m, r, v, eps, delta):
    """Steinke, Nasr and Jagielski (2023), Appendix D, with scipy.stats (an independent computation)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (1000, 100, 90, 1.5, 1e-5), (1000, 1000, 1000, 5.0, 1e-5), (256, 51, 47, 1.0, 1e-5), (500, 10, 0, 1.0, 1e-5),
    (500, 200, 150, 0.3, 0.0), (1000, 1000, 990, 4.0, 1e-6),
])
def test_p_value_is_the_papers(m, r, v, eps, delta):
    ours = p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_lower_bound_in_closed_form_without_delta():
    # All r guesses right, delta = 0: refuted while p^r < 1 - confidence, p = e^eps / (1 + e^eps).
    for r in (10, 100, 1000):
        root = 0.05 ** (1 / r)
        assert epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0) == pytest.approx(
            math.log(root / (1 - root)), rel=1e-9)
    assert epsilon_lower_bound(canaries=100, guesses=100, correct=50, delta=1e-5) == 0.0  # chance level
    bounds = [epsilon_lower_bound(canaries=1000, guesses=100, correct=v, delta=1e-5) for v in range(60, 101, 10)]
    assert bounds == sorted(bounds) and bounds[-1] > bounds[0] > 0


@pytest.mark.parametrize("kwargs", [dict(canaries=1), dict(delta=1.0), dict(confidence=1.0), dict(confidence=0)])
def test_bad_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        audit_epsilon(lambda inc, rng: np.zeros(inc.size), **kwargs)


def test_a_mechanism_too_short_is_refused():
    with pytest.raises(ConfigurationError, match="at least 100"):
        audit_epsilon(lambda inc, rng: np.zeros(3), canaries=100)
