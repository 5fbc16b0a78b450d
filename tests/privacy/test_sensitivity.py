"""Sensitivity after encoding: what one client adds to the decoded sum stays within what the accountant is told.

The outside audit (issue 19) found the fixed-point encoder's stochastic rounding pushing a clipped update to
1.40 C when C is about 0.5 sqrt(d) steps (8 and 16 bits). Central noise is now provisioned for C plus the
encoding's margin sqrt(d) x error_bound(1) (``ClientLevelMechanism.contribution_bound``); the distributed
encoders account their rounding in their events (``contribution_bound`` of the encoder). These tests take the
worst case: vectors at the clip whose every coordinate sits just above a rounding grid point, rounded away
from zero by adversarial rounding draws, at small bit widths. ``proofs/dp.md`` sections 2 and 3.
"""

import math

import numpy as np
import pytest

import securefed as sf
from securefed.crypto.random import RandomSource
from securefed.encoding.packing import storage_dtype
from securefed.privacy import (
    CentralDP,
    DistributedDiscreteGaussian,
    DistributedSkellam,
    FlatClipping,
    _bounds,
    l2_norm,
)
from securefed.privacy.client_level import ClientLevelMechanism
from securefed.privacy.rotation import HadamardRotation


def away_from_zero_uniforms(x):
    """FixedPoint's rounding uniforms that round every coordinate away from zero (up for x > 0, down for x < 0)."""
    return np.where(x > 0, 0, 2**32 - 1).astype(np.uint32)


def worst_vector(d, k, step, offset, gen):
    """Every coordinate k + `offset` steps from 0, random signs: at the clip C = its norm, and as far from
    the next grid point outward as rounding can move it."""
    return (k + offset) * step * gen.choice([-1.0, 1.0], size=d)


PROTOCOLS = [
    pytest.param(lambda r, b: sf.protocols.SecAgg(value_range=r, value_bits=b), id="secagg"),
    pytest.param(lambda r, b: sf.protocols.SecAggPlus(value_range=r, value_bits=b), id="secagg+"),
    pytest.param(lambda r, b: sf.protocols.BFV(value_range=r, value_bits=b), id="bfv"),
]


@pytest.mark.parametrize("make", PROTOCOLS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("k", [0, 1, 3, 50])  # whole steps per coordinate: C / (sqrt(d) step) = k + offset
@pytest.mark.parametrize("offset", [0.5, 1e-6])  # where a coordinate sits between two grid points
def test_central_dp_contribution_within_the_noises_sensitivity(make, bits, k, offset):
    d, value_range = 64, 1.0
    protocol = make(value_range, bits)
    encoder = protocol.encoder
    step = 1.0 / encoder.scale
    gen = np.random.default_rng(0)
    clip = l2_norm(worst_vector(d, k, step, offset, gen))
    config = CentralDP(noise_multiplier=1.3, clipping=clip)
    mech = ClientLevelMechanism(config, protocol=protocol, dimension=d)
    sensitivity = mech.noise().stddev / config.noise_multiplier
    assert sensitivity == pytest.approx(mech.contribution_bound, rel=1e-15)
    assert sensitivity == pytest.approx(clip + math.sqrt(d) * protocol.error_bound(1), rel=1e-15)
    worst = 0.0
    for _ in range(5):
        x = FlatClipping(l2_clip=clip).clip(worst_vector(d, k, step, offset, gen))
        assert l2_norm(x) <= clip and np.abs(x).max() <= value_range
        k = encoder.modulus_bits(3)
        out = np.empty(d, dtype=storage_dtype(k))
        encoder.encode_chunk(x, away_from_zero_uniforms(x), n=3, out=out)
        contribution = encoder.decode(out, n=3, count=1)
        worst = max(worst, l2_norm(contribution))
        assert l2_norm(contribution) <= sensitivity
    if k == 0:
        assert worst > 1.3 * clip  # the audit's finding: the rounded update is well past the clip itself


def test_the_audits_case_with_real_rounding():
    """C = 0.5 sqrt(d) step at 8 bits, every coordinate half a step: real CSPRNG rounding through the whole
    protocol reaches about 1.4 C (the audit's number) and stays within the provisioned sensitivity."""
    d = 64
    protocol = sf.protocols.SecAgg(value_range=1.0, value_bits=8)
    step = 1.0 / protocol.encoder.scale
    clip = 0.5 * math.sqrt(d) * step
    mech = ClientLevelMechanism(CentralDP(noise_multiplier=1.0, clipping=clip), protocol=protocol, dimension=d)
    x = np.full(d, 0.5 * step)
    ratios = []
    for seed in range(20):
        res = sf.simulate_aggregation(protocol, [x, np.zeros(d), np.zeros(d)], seed=seed)
        ratios.append(l2_norm(res.total) / clip)
    assert max(ratios) <= mech.contribution_bound / clip
    assert 1.2 < float(np.mean(ratios)) < 1.6


def test_plain_has_no_margin():
    mech = ClientLevelMechanism(CentralDP(noise_multiplier=1.0, clipping=0.5), protocol=sf.protocols.Plain(),
                                dimension=100)
    assert mech.contribution_bound == 0.5 and mech.noise().stddev == 0.5


class AdversarialRounding:
    """A stand-in for the client's RandomSource whose rounding draws round every coordinate of `y` away from
    zero (word 0 is the smallest uniform, all ones the largest)."""

    def __init__(self, y):
        self.words = np.where(y > 0, 0, np.iinfo(np.uint64).max).astype(np.uint64)

    def child(self, label):
        return self

    def fill(self, out):
        out[:] = self.words[: out.size]
        return out


@pytest.mark.parametrize("cls", [DistributedDiscreteGaussian, DistributedSkellam])
@pytest.mark.parametrize("rotation", [False, True])
@pytest.mark.parametrize("k", [0, 3, 1000])  # c / (sqrt(d) gamma) = k + offset
@pytest.mark.parametrize("offset", [0.5, 1e-9])
def test_distributed_contribution_within_the_accounted_bound(cls, rotation, k, offset):
    d, clip = 48, 1.0  # not a power of two: the rotation's two overlapping windows
    gamma = clip / ((k + offset) * math.sqrt(d))
    enc = cls(l2_clip=clip, noise_multiplier=1.0, dimension=d, min_survivors=2, granularity=gamma,
              rotation=rotation, rotation_seed=bytes(range(32)))
    accounted = _bounds.rounded_l2_bound(clip / gamma, d, 0.0)  # what the event's sensitivity is built from
    assert enc.contribution_bound == accounted
    gen = np.random.default_rng(1)
    for _ in range(5):
        # The rounded vector's worst case: every rotated, scaled coordinate just above a grid point.
        y = worst_vector(d, k, 1.0, offset, gen)
        rot = HadamardRotation(d, bytes(range(32)))
        x = FlatClipping(l2_clip=clip).clip(rot.inverse(y * gamma) if rotation else y * gamma)
        y_seen = (rot.forward(x) if rotation else x) / gamma
        q = enc.quantize(x, rng=AdversarialRounding(y_seen))
        assert np.all(np.abs(q) >= np.abs(np.trunc(y_seen)))  # rounded away from zero (up to float ties)
        assert l2_norm(q.astype(np.float64)) <= accounted
        assert l2_norm(enc.quantize(x, rng=RandomSource(7)).astype(np.float64)) <= accounted


@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_conditional_rounding_stays_within_its_bound(beta):
    d, clip = 64, 1.0
    gamma = clip / (0.5 * math.sqrt(d))
    enc = DistributedDiscreteGaussian(l2_clip=clip, noise_multiplier=1.0, dimension=d, min_survivors=2,
                                      granularity=gamma, beta=beta, rotation=False)
    assert enc.contribution_bound == _bounds.rounded_l2_bound(clip / gamma, d, beta) < clip / gamma + math.sqrt(d)
    x = np.full(d, clip / math.sqrt(d)) * (1 - 1e-12)
    for seed in range(50):
        q = enc.quantize(x, rng=RandomSource(seed))
        assert l2_norm(q.astype(np.float64)) <= enc.contribution_bound


def test_ckks_contribution_within_its_error_bound():
    """CKKS encodes approximately: the decoded update moves by its error bound at most, which the margin covers."""
    d = 64
    protocol = sf.protocols.CKKS()
    mech = ClientLevelMechanism(CentralDP(noise_multiplier=1.0, clipping=0.01), protocol=protocol, dimension=d)
    assert mech.contribution_bound == pytest.approx(0.01 + math.sqrt(d) * protocol.error_bound(1), rel=1e-15)
    x = FlatClipping(l2_clip=0.01).clip(np.random.default_rng(2).normal(size=d))
    for seed in range(3):
        res = sf.simulate_aggregation(protocol, [x, np.zeros(d), np.zeros(d)], seed=seed)
        assert l2_norm(res.total) <= mech.contribution_bound
