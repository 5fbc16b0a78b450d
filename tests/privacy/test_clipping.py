import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import AdaptiveClipping, FlatClipping, PerLayerClipping, l2_norm

finite = st.floats(allow_nan=False, allow_infinity=False) | st.floats(-1e-3, 1e-3)
vectors = st.tuples(st.sampled_from([np.float32, np.float64]), st.integers(1, 300)).flatmap(
    lambda t: arrays(t[0], t[1], elements=st.floats(width=32 if t[0] is np.float32 else 64, allow_nan=False,
                                                      allow_infinity=False)))
bounds = st.floats(1e-6, 1e6)


@given(vectors, bounds)
def test_flat_clipping_never_leaves_a_norm_above_the_bound(x, c):
    y = FlatClipping(l2_clip=c).clip(x)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert l2_norm(y) <= c
    if l2_norm(x) <= c:
        np.testing.assert_array_equal(y, x.astype(np.float64))  # within the bound: untouched
    else:
        assert l2_norm(y) >= c * (1 - 1e-12)  # scaled onto the sphere, direction kept
        i = int(np.argmax(np.abs(x)))
        np.testing.assert_allclose(y, x.astype(np.float64) * (y[i] / float(x[i])), rtol=1e-9, atol=1e-12 * c)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6).flatmap(
    lambda sizes: st.tuples(st.just(sizes), arrays(np.float64, sum(sizes), elements=finite))), bounds)
def test_per_layer_clipping_bounds_every_layer_and_the_whole(sizes_x, c):
    sizes, x = sizes_x
    clip = PerLayerClipping(l2_clip=c)
    y = clip.clip(x, sizes)
    assert l2_norm(y) <= c == clip.bound
    per = clip.clips_for(len(sizes))
    lo = 0
    for size, cl in zip(sizes, per):
        assert l2_norm(y[lo:lo + size]) <= cl
        lo += size


def test_clipping_keeps_the_direction_when_the_norm_overflows():
    x = np.full(1000, 1.5e307)
    y = FlatClipping(l2_clip=2.0).clip(x)
    np.testing.assert_allclose(y, np.full(1000, 2.0 / math.sqrt(1000)), rtol=1e-12)


def test_clipping_terminates_and_holds_for_subnormal_bounds():
    x = np.array([3e-320, 4e-320, 1e-323])
    y = FlatClipping(l2_clip=2e-320).clip(x)
    assert l2_norm(y) <= 2e-320


def test_per_layer_clipping_with_explicit_bounds():
    clip = PerLayerClipping(layer_clips=[3.0, 4.0])
    assert 5.0 < clip.bound <= 5.0 * (1 + 1e-12)  # slack for float64 rounding of the total norm
    at_clips = clip.clip(np.array([3.0, 0.0, 0.0, 4.0]), [2, 2])  # every tensor exactly at its clip
    assert at_clips.tolist() == [3.0, 0.0, 0.0, 4.0]
    y = clip.clip(np.array([30.0, 0.0, 0.0, 0.5]), [2, 2])
    np.testing.assert_allclose(y, [3.0, 0.0, 0.0, 0.5])
    # Found by securefed.testing.check_clipper: with every tensor clipped to its own bound, the float64
    # total came out one ulp above sqrt(sum of squared clips); the bound's slack absorbs that.
    found = PerLayerClipping(layer_clips=[5.65, 2.96, 4.19])
    x = np.array([1322.4574697668331, -13.914668524093733, 1041.8397592128222, 1402.2648267725224,
                  1150.165636149692, -2365.3039062769744, 1228.683719203421, 339.62000824864265, 423.77135285334725])
    y = found.clip(x, [3, 3, 3])
    assert l2_norm(y) > math.sqrt(5.65**2 + 2.96**2 + 4.19**2)  # what the unslacked bound got wrong
    assert l2_norm(y) <= found.bound
    with pytest.raises(ConfigurationError):
        clip.clip(np.zeros(6), [2, 2, 2])
    with pytest.raises(InvalidInput):
        clip.clip(np.zeros(4))  # no layout
    with pytest.raises(ConfigurationError):
        PerLayerClipping(l2_clip=1.0, layer_clips=[1.0])


def test_adaptive_clipping_tracks_the_target_quantile():
    """Andrew et al. 2021: without noise, C converges to the target quantile of the update norms."""
    rng = np.random.default_rng(0)
    clip = AdaptiveClipping(initial_clip=0.1, target_quantile=0.8, learning_rate=0.2)
    for _ in range(300):
        norms = rng.uniform(0.0, 2.0, size=100)
        clip.observe(float(np.mean(norms <= clip.bound)))
    assert clip.bound == pytest.approx(1.6, rel=0.05)  # the 0.8 quantile of U(0, 2)


def test_adaptive_clipping_noise_split_pays_for_the_count():
    clip = AdaptiveClipping(initial_clip=1.0)
    z, sigma_b = 1.0, 5.0
    zu = clip.update_noise_multiplier(z, sigma_b)
    # The pair (update with multiplier zu, count with std sigma_b and sensitivity 1/2) costs what z costs.
    assert zu**-2 + (1 / (2 * sigma_b)) ** 2 == pytest.approx(z**-2)
    assert zu > z
    with pytest.raises(ConfigurationError):
        clip.update_noise_multiplier(2.0, 1.0)
    assert clip.unclipped(np.array([0.6, 0.8])) and not clip.unclipped(np.array([0.6, 0.81]))


@pytest.mark.parametrize("x", [np.array([np.nan, 1.0]), np.array([np.inf]), np.zeros((2, 2)), np.zeros(0)])
def test_bad_updates_are_refused(x):
    for clip in (FlatClipping(l2_clip=1.0), AdaptiveClipping()):
        with pytest.raises(InvalidInput):
            clip.clip(x)


@pytest.mark.parametrize("make", [
    lambda: FlatClipping(l2_clip=0.0), lambda: FlatClipping(l2_clip=math.inf),
    lambda: AdaptiveClipping(target_quantile=1.5), lambda: AdaptiveClipping(learning_rate=0.0),
])
def test_bad_parameters_are_refused(make):
    with pytest.raises(ConfigurationError):
        make()


def test_a_huge_update_under_a_tiny_clip_keeps_its_direction():
    """bound / norm underflows to zero here (1e-30 / 2e305): the update must still come out scaled, not zeroed
    (the CI profile's clipper check found it and then spent its time shrinking it)."""
    out = FlatClipping(l2_clip=1e-30).clip(np.array([1.99e305, 1.0, -1e305]))
    assert 0 < l2_norm(out) <= 1e-30
    assert out[0] > 0 > out[2] and out[0] == pytest.approx(1.99 / np.hypot(1.99, 1.0) * 1e-30, rel=1e-12)
