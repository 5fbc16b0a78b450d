"""check_clipper and check_noise (securefed/testing/privacy.py): the shipped DP modules pass, broken ones are
caught with the property named."""

import numpy as np
import pytest

from securefed.privacy import (
    AdaptiveClipping,
    CentralGaussian,
    DistributedDiscreteGaussian,
    DistributedSkellam,
    FlatClipping,
    PerLayerClipping,
    l2_norm,
    sampling,
)
from securefed.testing import ConformanceError, check_clipper, check_noise


def adapted():
    clip = AdaptiveClipping(initial_clip=0.5)
    clip.observe(0.9)  # the norm has moved once
    return clip


@pytest.mark.parametrize("factory,options", [
    (lambda: FlatClipping(l2_clip=1.0), {}),
    (lambda: FlatClipping(l2_clip=1e-30), {}),
    (lambda: PerLayerClipping(l2_clip=2.0), {}),
    (lambda: PerLayerClipping(layer_clips=[0.5, 3.0, 1e3]), {"tensors": 3}),
    (adapted, {}),
], ids=["flat", "flat-tiny", "per-layer", "per-layer-clips", "adaptive"])
def test_shipped_clippers_pass(factory, options):
    check_clipper(factory, **options)


class NoNudge(FlatClipping):
    """Scales by bound / norm and trusts float64: the result can exceed the bound by an ulp."""

    def clip(self, update, layout=None):
        x = np.asarray(update, dtype=np.float64)
        if not np.isfinite(x).all():
            from securefed.errors import InvalidInput

            raise InvalidInput("not finite")
        norm = l2_norm(x)
        return x * min(1.0, self.l2_clip / norm) if norm > 0 else x.copy()


class Clamps(FlatClipping):
    """Clamps every coordinate to the bound instead of scaling the vector."""

    def clip(self, update, layout=None):
        return np.clip(super().clip(update, layout), -self.l2_clip / 10, self.l2_clip / 10)


class InPlace(FlatClipping):
    def clip(self, update, layout=None):
        out = super().clip(update, layout)
        update[...] = out
        return out


class AlwaysScales(FlatClipping):
    """Scales every update to the bound, short ones up: not a clip."""

    def clip(self, update, layout=None):
        x = super().clip(update, layout)
        norm = l2_norm(x)
        return x * (self.l2_clip / norm) * (1 - 2.0**-40) if norm > 0 else x


class TakesNaN(FlatClipping):
    def clip(self, update, layout=None):
        if np.isnan(update).any():
            return np.zeros(update.size)
        return super().clip(update, layout)


@pytest.mark.parametrize("cls,props", [
    (NoNudge, {"norm_bound", "idempotent"}),  # above the bound by an ulp, so clipped again
    (Clamps, {"scaling_only", "passthrough"}),  # a clamped short update also changes
    (InPlace, {"output"}),
    (AlwaysScales, {"scaling_only", "passthrough", "idempotent"}),
    (TakesNaN, {"output"}),
], ids=["no-nudge", "clamps", "in-place", "always-scales", "takes-nan"])
def test_broken_clippers_are_caught(cls, props):
    with pytest.raises(ConformanceError) as info:
        check_clipper(lambda: cls(l2_clip=1.0), max_examples=200)
    prop = info.value.property
    assert prop in props, str(info.value)
    assert f"violates {prop!r}" in str(info.value) and "counterexample" in str(info.value)


class LosesPassthrough(PerLayerClipping):
    """Shrinks every tensor by a hair, even those within their clip."""

    def clip(self, update, layout=None):
        return super().clip(update, layout) * (1 - 2.0**-30)


def test_a_per_layer_clip_that_changes_short_tensors_is_caught():
    with pytest.raises(ConformanceError) as info:
        check_clipper(lambda: LosesPassthrough(l2_clip=1.0), max_examples=100)
    assert info.value.property in ("passthrough", "idempotent")


@pytest.mark.parametrize("module", [
    CentralGaussian(noise_multiplier=1.1, l2_clip=0.5),
    DistributedDiscreteGaussian(l2_clip=1.0, noise_multiplier=1.0, dimension=16, min_survivors=3),
    DistributedSkellam(l2_clip=1.0, noise_multiplier=0.7, dimension=16, min_survivors=4),
    DistributedDiscreteGaussian(l2_clip=2.0, noise_multiplier=0.5, dimension=8, min_survivors=2, rotation=False,
                                granularity=0.05),
], ids=["central", "ddg", "skellam", "ddg-coarse"])
def test_shipped_noise_modules_pass(module):
    check_noise(module)


class HalfNoise(CentralGaussian):
    """Declares std z C but adds half of it: the accountant would be told of noise that is not there."""

    def add_to(self, total, rng):
        total += sampling.gaussian(rng, self.stddev / 2, total.size)
        return total


class Biased(CentralGaussian):
    def add_to(self, total, rng):
        total += sampling.gaussian(rng, self.stddev, total.size) + 0.5 * self.stddev
        return total


class Misaccounted(CentralGaussian):
    """Adds the right noise but charges the accountant for twice the multiplier."""

    def event(self, **kw):
        import dataclasses

        e = super().event(**kw)
        return dataclasses.replace(e, noise_multiplier=2 * e.noise_multiplier)


class OverclaimingDDG(DistributedDiscreteGaussian):
    """Its event claims 1.5 times the noise the shares add up to."""

    def event(self, **kw):
        import dataclasses

        e = super().event(**kw)
        return dataclasses.replace(e, noise_multiplier=1.5 * e.noise_multiplier)


@pytest.mark.parametrize("module,prop", [
    (HalfNoise(noise_multiplier=1.0, l2_clip=1.0), "variance"),
    (Biased(noise_multiplier=1.0, l2_clip=1.0), "unbiased"),
    (Misaccounted(noise_multiplier=1.0, l2_clip=1.0), "variance"),
    (OverclaimingDDG(l2_clip=1.0, noise_multiplier=1.0, dimension=16, min_survivors=3), "variance"),
], ids=["half-noise", "biased", "misaccounted", "overclaiming-ddg"])
def test_broken_noise_is_caught(module, prop):
    with pytest.raises(ConformanceError) as info:
        check_noise(module)
    assert info.value.property == prop and f"violates {prop!r}" in str(info.value)


def test_check_noise_refuses_modules_it_cannot_drive():
    with pytest.raises(TypeError, match="central module"):
        check_noise(object())


class SignNoise(CentralGaussian):
    """Noise of the declared mean and variance but not Gaussian: +-std with a fair coin (a broken sampler).
    The moments pass; the canaries land on separate points, which the one-run audit reads off."""

    def add_to(self, total, rng):
        coins = rng.fill(np.empty(total.size, dtype=np.uint8)) & 1
        total += self.stddev * (2.0 * coins - 1.0)
        return total


def test_noise_of_the_right_variance_but_the_wrong_law_fails_the_audit():
    with pytest.raises(ConformanceError) as info:
        check_noise(SignNoise(noise_multiplier=2.0, l2_clip=1.0))
    assert info.value.property == "audit" and "one-run audit" in str(info.value)
    check_noise(SignNoise(noise_multiplier=2.0, l2_clip=1.0), audit_canaries=0)  # the moments alone pass


def test_the_audit_property_is_listed():
    from securefed.testing.privacy import NOISE_PROPERTIES

    assert NOISE_PROPERTIES == ("unbiased", "variance", "audit")
