"""Clipping: bound one participant's update in L2 norm, so that its influence on the sum is at most ``bound``.

One interface, three modules: :class:`FlatClipping` (one norm for the whole
update), :class:`PerLayerClipping` (a norm per parameter tensor) and
:class:`AdaptiveClipping` (Andrew et al. 2021: the norm follows a target quantile
of the participants' update norms, learned from a noised, securely aggregated
count). Every clip returns a float64 vector whose :func:`l2_norm` is at most the
bound, exactly as the privacy checks compute it. See ``proofs/dp.md`` section 2.
"""

from __future__ import annotations

import abc
import math
import sys
from collections.abc import Sequence

import numpy as np

from securefed.encoding.fixedpoint import check_finite, check_vector
from securefed.errors import ConfigurationError, InvalidInput

__all__ = ["AdaptiveClipping", "Clipping", "FlatClipping", "PerLayerClipping", "l2_norm"]


def _positive(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def l2_norm(x: np.ndarray) -> float:
    """The L2 norm as every privacy check computes it (float64 dot product, rescaled if it overflows)."""
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        squares = float(np.dot(x64, x64))
    if math.isfinite(squares):
        return math.sqrt(squares)
    top = float(np.max(np.abs(x64)))
    if not math.isfinite(top):
        return math.inf
    y = x64 / top
    return top * math.sqrt(float(np.dot(y, y)))


def _scale_to(x: np.ndarray, bound: float) -> np.ndarray:
    """x scaled by min(1, bound/||x||), nudged down until float64 agrees that ||x|| <= bound."""
    out = np.array(x, dtype=np.float64, copy=True)
    norm = l2_norm(out)
    if norm <= bound:
        return out
    if not math.isfinite(norm):  # finite entries whose norm overflows: bring them to [-1, 1] first
        out /= float(np.max(np.abs(out)))
        norm = l2_norm(out)
    factor = bound / norm
    if factor >= sys.float_info.min:  # a normal factor: one rounding per coordinate
        out *= factor
    else:  # it underflows (a huge update, a tiny clip: 1e-30 / 1e305) and would zero the update: two steps
        out /= norm
        out *= bound
    while l2_norm(out) > bound:  # a step or two: the scaled norm is bound * (1 +- 1e-15)
        out = np.nextafter(out, 0.0)  # one ulp toward zero, so even subnormals shrink
    return out


def _check_update(update: np.ndarray) -> np.ndarray:
    x = check_vector(update)
    check_finite(x, "update")
    return x


class Clipping(abc.ABC):
    """Bounds one participant's update in L2 norm; ``bound`` is the L2 sensitivity that results."""

    @property
    @abc.abstractmethod
    def bound(self) -> float:
        """The largest L2 norm :meth:`clip` returns."""

    @abc.abstractmethod
    def clip(self, update: np.ndarray, layout: Sequence[int] | None = None) -> np.ndarray:
        """The clipped float64 copy of the 1-D `update`; `layout`: sizes of its consecutive tensors.

        Raises InvalidInput for NaN/Inf or a non-1-D, non-float array.
        """

    def describe(self) -> dict[str, object]:
        """Parameters for logs and the audit trail."""
        return {"clipping": type(self).__name__, "bound": self.bound}


class FlatClipping(Clipping):
    """x -> x * min(1, l2_clip / ||x||): the DP-FedAvg clip (McMahan et al. 2018)."""

    def __init__(self, *, l2_clip: float) -> None:
        self.l2_clip = _positive("l2_clip", l2_clip)

    def __repr__(self) -> str:
        return f"FlatClipping(l2_clip={self.l2_clip!r})"

    @property
    def bound(self) -> float:
        return self.l2_clip

    def clip(self, update: np.ndarray, layout: Sequence[int] | None = None) -> np.ndarray:
        return _scale_to(_check_update(update), self.l2_clip)


class PerLayerClipping(Clipping):
    """Each tensor clipped on its own: to ``layer_clips[i]``, or to l2_clip / sqrt(L) each for L tensors.

    The whole update then has norm <= sqrt(sum of squared layer clips) (= l2_clip when split evenly).
    With explicit ``layer_clips``, ``bound`` carries a relative slack of 1e-12 so that the float64
    norm of the whole update never exceeds it even when every tensor sits at its clip (the even
    split instead shrinks each layer's clip by that much); the slack only adds noise.
    """

    def __init__(self, *, l2_clip: float | None = None, layer_clips: Sequence[float] | None = None) -> None:
        if (l2_clip is None) == (layer_clips is None):
            raise ConfigurationError("give either l2_clip (split evenly over the layers) or layer_clips")
        self.l2_clip = None if l2_clip is None else _positive("l2_clip", l2_clip)
        if layer_clips is not None and (isinstance(layer_clips, (str, bytes)) or not isinstance(layer_clips, Sequence)
                                        or len(layer_clips) == 0):
            raise ConfigurationError(f"layer_clips must be a non-empty sequence of norms, one per tensor, "
                                     f"got {layer_clips!r}")
        self.layer_clips = None if layer_clips is None else tuple(_positive("layer clip", c) for c in layer_clips)

    def __repr__(self) -> str:
        arg = f"l2_clip={self.l2_clip!r}" if self.layer_clips is None else f"layer_clips={self.layer_clips!r}"
        return f"PerLayerClipping({arg})"

    @property
    def bound(self) -> float:
        if self.layer_clips is None:
            assert self.l2_clip is not None
            return self.l2_clip
        return math.sqrt(sum(c * c for c in self.layer_clips)) * (1.0 + 1e-12)

    def clips_for(self, layers: int) -> tuple[float, ...]:
        """The clip of each of `layers` tensors."""
        if self.layer_clips is None:
            assert self.l2_clip is not None
            # Slightly below l2_clip / sqrt(L), so the float64 sum of squares stays <= l2_clip^2.
            return (self.l2_clip / math.sqrt(layers) * (1.0 - 1e-12),) * layers
        if len(self.layer_clips) != layers:
            raise ConfigurationError(f"layer_clips has {len(self.layer_clips)} entries for {layers} tensors")
        return self.layer_clips

    def clip(self, update: np.ndarray, layout: Sequence[int] | None = None) -> np.ndarray:
        x = _check_update(update)
        if layout is None or sum(layout) != x.size or any(s < 1 for s in layout):
            raise InvalidInput("per-layer clipping needs the layout: the sizes of the update's tensors, in order")
        out = np.empty(x.size, dtype=np.float64)
        lo = 0
        for size, c in zip(layout, self.clips_for(len(layout))):
            out[lo : lo + size] = _scale_to(x[lo : lo + size], c)
            lo += size
        return out


class AdaptiveClipping(Clipping):
    """Flat clipping whose norm tracks a quantile of update norms (Andrew, Thakkar, McMahan, Ramaswamy 2021).

    Each round every participant also contributes b = [||x|| <= C]; from the noised
    fraction b~ of unclipped updates the norm moves geometrically:
    C <- C * exp(-learning_rate * (b~ - target_quantile)). The count carries Gaussian
    noise of std ``count_stddev`` (default: 0.05 x expected participants per round,
    the paper's choice); the update's noise multiplier is raised to
    z_update = (z^-2 - (2 count_stddev)^-2)^(-1/2) so that the pair costs what one
    Gaussian release with multiplier z costs (their Theorem 1).
    """

    def __init__(
        self, *, initial_clip: float = 0.1, target_quantile: float = 0.5, learning_rate: float = 0.2,
        count_stddev: float | None = None,
    ) -> None:
        self.clip_norm = _positive("initial_clip", initial_clip)
        self.initial_clip = self.clip_norm
        if isinstance(target_quantile, bool) or not (
                isinstance(target_quantile, (int, float)) and 0.0 <= target_quantile <= 1.0):
            raise ConfigurationError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = _positive("learning_rate", learning_rate)
        self.count_stddev = None if count_stddev is None else _positive("count_stddev", count_stddev)

    def __repr__(self) -> str:
        return (f"AdaptiveClipping(clip_norm={self.clip_norm!r}, target_quantile={self.target_quantile!r}, "
                f"learning_rate={self.learning_rate!r}, count_stddev={self.count_stddev!r})")

    @property
    def bound(self) -> float:
        return self.clip_norm

    def clip(self, update: np.ndarray, layout: Sequence[int] | None = None) -> np.ndarray:
        return _scale_to(_check_update(update), self.clip_norm)

    def unclipped(self, update: np.ndarray) -> bool:
        """b: whether `update` is within the current norm (the bit the participant contributes)."""
        return l2_norm(update) <= self.clip_norm

    def update_noise_multiplier(self, noise_multiplier: float, count_stddev: float) -> float:
        """z_update for an overall multiplier z. ConfigurationError unless 2 count_stddev > z."""
        if 2.0 * count_stddev <= noise_multiplier:
            raise ConfigurationError(
                f"the clipped count's noise ({count_stddev:g}) must exceed noise_multiplier / 2 "
                f"({noise_multiplier / 2:g}) to pay for itself; raise count_stddev"
            )
        return (noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5

    def observe(self, unclipped_fraction: float) -> None:
        """Move the norm toward the target quantile from the round's noised unclipped fraction."""
        if not math.isfinite(unclipped_fraction):
            raise InvalidInput("the unclipped fraction must be finite")
        self.clip_norm *= math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))

    def describe(self) -> dict[str, object]:
        return {"clipping": "AdaptiveClipping", "bound": self.clip_norm, "initial_clip": self.initial_clip,
                "target_quantile": self.target_quantile, "learning_rate": self.learning_rate,
                "count_stddev": self.count_stddev}
