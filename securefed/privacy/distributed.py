"""Distributed DP noise inside secure aggregation: discrete Gaussian and Skellam integer encoders.

Each client (Kairouz, Liu and Steinke 2021, Algorithm 1; Agarwal, Kairouz and Liu 2021):

1. checks its update x has L2 norm <= l2_clip (clipping is the trainer's job; a larger
   norm is InvalidInput, never a silent clip);
2. rotates it (optional randomized Hadamard, signs from public round randomness);
3. scales by 1/granularity and rounds randomly to integers, re-rounding while the
   squared norm exceeds the conditional bound when beta > 0;
4. adds integer noise from its own cryptographic source, with per-client variance
   sigma^2 / t, where sigma = noise_multiplier * l2_clip is the target std of the
   total and t = min_survivors(n) is the fewest clients any finished round includes:
   a round that finishes sums at least t shares, so at least the target noise;
5. reduces modulo 2^k.

The server's modular sum decodes (centered, times granularity, rotated back) to
the sum of the included updates plus the noise. The width k is chosen so that any
coordinate wraps with probability at most ``wrap_probability`` per round (union
bound over coordinates; ``proofs/dp.md`` section 3). Privacy never depends on the
rotation or on k (wrapping is post-processing); they only protect the sum's accuracy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.encoding.fixedpoint import (
    IntegerEncoder,
    check_finite,
    check_vector,
    decode_centered,
)
from securefed.encoding.packing import storage_dtype
from securefed.errors import ConfigurationError, InvalidInput
from securefed.privacy import _bounds, sampling
from securefed.privacy.clipping import l2_norm
from securefed.privacy.events import DDGEvent, PrivacyEvent, SkellamEvent
from securefed.privacy.noise import NoiseModule
from securefed.privacy.rotation import HadamardRotation

__all__ = ["DistributedDiscreteGaussian", "DistributedSkellam", "default_granularity"]

#: Re-rounding attempts before giving up (each succeeds with probability >= 1 - beta).
_MAX_ROUNDING_TRIES = 1000


def default_granularity(l2_clip: float, dimension: int) -> float:
    """l2_clip / (100 sqrt(d)): rounding then inflates the L2 sensitivity by at most 1% (beta = 0)."""
    return l2_clip / (100.0 * math.sqrt(dimension))


def _kernels():
    from securefed.privacy import _kernels as k

    return k


class _DistributedNoise(IntegerEncoder, NoiseModule):
    """Shared machinery of the two distributed mechanisms; subclasses supply the noise."""

    mechanism: str = ""
    _event_class: ClassVar[type[DDGEvent | SkellamEvent]]

    def __init__(
        self,
        *,
        l2_clip: float,
        noise_multiplier: float,
        dimension: int,
        min_survivors: int | Callable[[int], int],
        granularity: float | None = None,
        beta: float = 0.0,
        rotation: bool = True,
        rotation_seed: bytes = bytes(32),
        wrap_probability: float = 1e-9,
    ) -> None:
        for name, v in (("l2_clip", l2_clip), ("noise_multiplier", noise_multiplier)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigurationError(f"{name} must be a finite number > 0, got {v!r}")
        if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
            raise ConfigurationError(f"dimension must be a positive integer, got {dimension!r}")
        if granularity is None:
            granularity = default_granularity(l2_clip, int(dimension))
        if not (isinstance(granularity, (int, float)) and math.isfinite(granularity) and granularity > 0):
            raise ConfigurationError(f"granularity must be a finite number > 0, got {granularity!r}")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ConfigurationError(f"beta must be in [0, 1), got {beta!r}")
        if not (isinstance(wrap_probability, float) and 0.0 < wrap_probability < 1.0):
            raise ConfigurationError(f"wrap_probability must be a float in (0, 1), got {wrap_probability!r}")
        if not (isinstance(min_survivors, (int, np.integer)) or callable(min_survivors)):
            raise ConfigurationError("min_survivors must be an int or a function of n (protocol.min_survivors)")
        self.l2_clip = float(l2_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.dimension = int(dimension)
        self.granularity = float(granularity)
        self.beta = float(beta)
        self.rotation = bool(rotation)
        self.rotation_seed = bytes(rotation_seed)
        self.wrap_probability = wrap_probability
        self.min_survivors = min_survivors
        scaled = self.l2_clip / self.granularity
        self._scaled_clip = scaled
        self._rounded_l2 = _bounds.rounded_l2_bound(scaled, self.dimension, self.beta)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(l2_clip={self.l2_clip!r}, noise_multiplier={self.noise_multiplier!r}, "
                f"dimension={self.dimension}, granularity={self.granularity!r}, beta={self.beta!r}, "
                f"rotation={self.rotation})")

    # -- parameters -----------------------------------------------------------------

    def survivors(self, n: int) -> int:
        """t: the fewest clients a finished round of n includes (the noise is provisioned for t)."""
        t = self.min_survivors(n) if callable(self.min_survivors) else self.min_survivors
        if not isinstance(t, (int, np.integer)) or not 1 <= t <= n:
            raise ConfigurationError(f"min_survivors must be in [1, n={n}] for a round of {n}, got {t!r}")
        return int(t)

    def local_sigma(self, n: int) -> float:
        """Integer-domain standard deviation of one client's noise share in a round of n."""
        return self.noise_multiplier * self._scaled_clip / math.sqrt(self.survivors(n))

    @functools.cached_property
    def _rotation(self) -> HadamardRotation | None:
        # Built on first encode/decode: accounting-only copies (events, budgets) never draw the
        # model-sized signs.
        return HadamardRotation(self.dimension, self.rotation_seed) if self.rotation else None

    def for_round(self, rotation_seed: bytes) -> _DistributedNoise:
        """The same mechanism with the rotation drawn from this round's public randomness."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.rotation_seed = bytes(rotation_seed)
        clone.__dict__.pop("_rotation", None)  # drawn again from the new seed when first used
        return clone

    def event(self, *, included: int, n: int, sampling_rate: float = 1.0, round: int | None = None) -> PrivacyEvent:
        """The privacy event of a round of n that summed `included` clients' shares (>= t)."""
        if not 1 <= included <= n:
            raise InvalidInput(f"included must be in [1, n={n}], got {included}")
        total_std = self.local_sigma(n) * math.sqrt(included)
        return self._event_class(
            noise_multiplier=total_std / self._scaled_clip, sampling_rate=sampling_rate, num_clients=included,
            round=round, l2_clip=self.l2_clip, dimension=self.dimension, granularity=self.granularity,
            beta=self.beta,
        )

    def describe(self) -> dict[str, object]:
        return {
            "encoder": type(self).__name__, "mechanism": self.mechanism, "l2_clip": self.l2_clip,
            "noise_multiplier": self.noise_multiplier, "dimension": self.dimension,
            "granularity": self.granularity, "beta": self.beta, "rotation": self.rotation,
            "rotation_seed": self.rotation_seed.hex(), "wrap_probability": self.wrap_probability,
        }

    # -- the modulus --------------------------------------------------------------------

    def _noise_tail(self, n: int, per_coordinate: float) -> float:
        """s with P(|sum of n noise shares| >= s) <= per_coordinate, for one coordinate."""
        raise NotImplementedError

    def _signal_bound(self, n: int, per_coordinate: float) -> float:
        """Bound on |sum of n rounded, rotated inputs| per coordinate (probability per_coordinate)."""
        worst = n * self._scaled_clip
        if self.rotation:
            # Hoeffding over the random signs: variance proxy ||sum||^2 / B <= (n c')^2 / B.
            block = 1 << (self.dimension.bit_length() - 1)  # the rotation's Hadamard block
            flat = worst * math.sqrt(2.0 * math.log(2.0 / per_coordinate) / block)
            worst = min(worst, flat)
        return worst + n  # each client's rounding moves a coordinate by less than 1

    def modulus_bits(self, n: int) -> int:
        """k such that a coordinate of the sum of n inputs wraps with probability <= wrap_probability / d."""
        per = self.wrap_probability / (2.0 * self.dimension)
        bound = math.ceil(self._signal_bound(n, per) + self._noise_tail(n, per))
        k = int(bound).bit_length() + 1
        if k > 64:
            raise ConfigurationError(
                f"the noisy sum of {n} clients needs a {k}-bit modulus; the limit is 64: raise the granularity "
                "or lower the noise"
            )
        return k

    def error_bound(self, n: int) -> float:
        """Per-coordinate error (DP noise plus rounding) of a decoded sum of up to n inputs that holds
        with probability >= 1 - wrap_probability; the noise is unbounded, so no worst case exists."""
        proxy = n * self.local_sigma(n) ** 2 + n / 4.0  # noise shares, plus rounding in [-1, 1)
        return self.granularity * math.sqrt(2.0 * proxy * math.log(2.0 * self.dimension / self.wrap_probability))

    # -- encoding -------------------------------------------------------------------------

    def _noise(self, rng: RandomSource, sigma: float, size: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def contribution_bound(self) -> float:
        """The L2 bound, in the integer domain, on one client's :meth:`quantize` output: the sensitivity
        its privacy event is accounted with (``_bounds.rounded_l2_bound``: c / gamma + sqrt(d), or the
        conditional bound when beta > 0). ``proofs/dp.md`` section 3."""
        return self._rounded_l2

    def quantize(self, x: np.ndarray, *, rng: RandomSource) -> np.ndarray:
        """One client's update rotated, scaled by 1/granularity and randomly rounded (int64), before noise.

        Its L2 norm is at most :attr:`contribution_bound` whatever the rounding draws: the scaled
        vector is brought within c / gamma in float64 with room for the dot product's rounding, and
        each coordinate then moves by less than 1. Raises InvalidInput for a vector of the wrong
        length, NaN/Inf, or L2 norm above l2_clip.
        """
        x = check_vector(x, self.dimension)
        check_finite(x, "update")
        norm = l2_norm(x)
        if norm > self.l2_clip:
            raise InvalidInput(
                f"update has L2 norm {norm:.6g} above l2_clip {self.l2_clip:g}; clip it first "
                "(securefed.privacy clipping) or configure a larger l2_clip"
            )
        y = self._rotation.forward(x) if self._rotation is not None else x.astype(np.float64)
        y *= 1.0 / self.granularity
        # The rotation and the scaling round in float64, so ||y|| may exceed c / gamma by a few ulps; a
        # computed norm <= target keeps the exact one <= c / gamma (a sum of d squares errs by < d 2^-53).
        target = self._scaled_clip * (1.0 - (self.dimension + 2) * 2.0**-53)
        scaled = l2_norm(y)
        if scaled > target:
            y *= target / scaled
            while l2_norm(y) > target:
                y = np.nextafter(y, 0.0)
        return self._round(y, rng.child("rounding"))

    def encode(self, x: np.ndarray, *, n: int, rng: RandomSource) -> np.ndarray:
        """One client's noisy, rounded, scaled (and rotated) update modulo 2^k: :meth:`quantize` plus its
        noise share.

        Raises InvalidInput for a vector of the wrong length, NaN/Inf, or L2 norm above l2_clip.
        """
        k = self.modulus_bits(n)
        rounded = self.quantize(x, rng=rng)
        rounded += self._noise(rng.child("noise"), self.local_sigma(n), self.dimension)
        mask = np.uint64((1 << k) - 1) if k < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        return (rounded.view(np.uint64) & mask).astype(storage_dtype(k))

    def _round(self, y: np.ndarray, rng: RandomSource) -> np.ndarray:
        out = np.empty(y.size, dtype=np.int64)
        words = np.empty(y.size, dtype=np.uint64)
        # Accept only if ||x~||^2 <= bound^2 (with float64 slack on the safe side).
        limit = self._rounded_l2**2 * (1.0 - 1e-9) if self.beta > 0 else math.inf
        for _ in range(_MAX_ROUNDING_TRIES):
            _kernels().round_into(y, rng.fill(words), out)
            if self.beta == 0 or float(np.dot(out.astype(np.float64), out.astype(np.float64))) <= limit:
                return out
        raise InvalidInput(  # probability <= beta^1000: only for a beta close to 1
            f"randomized rounding exceeded its norm bound {_MAX_ROUNDING_TRIES} times; lower beta"
        )

    def decode(self, s: np.ndarray, *, n: int, count: int | None = None) -> np.ndarray:
        """The float64 noisy sum from `s`, the modular sum of `count` encoded inputs of a round of n."""
        if not isinstance(s, np.ndarray) or s.ndim != 1 or s.dtype.kind != "u" or s.size != self.dimension:
            raise InvalidInput(f"decode expects a 1-D unsigned integer array of length {self.dimension}")
        out = np.empty(s.size, dtype=np.float64)
        decode_centered(s, self.modulus_bits(n), self.granularity, out)
        if self._rotation is not None:
            self._rotation.inverse(out, out=out)
        return out


class DistributedDiscreteGaussian(_DistributedNoise):
    """Distributed discrete Gaussian noise (Kairouz, Liu and Steinke, ICML 2021) as an integer encoding.

    Parameters (keyword-only): ``l2_clip`` (c), ``noise_multiplier`` (z: the total noise of
    t shares has std z c), ``dimension`` (d), ``min_survivors`` (t, an int or
    ``protocol.min_survivors``), ``granularity`` (gamma; default
    :func:`default_granularity`), ``beta`` (conditional rounding, default 0),
    ``rotation`` (randomized Hadamard, default on), ``rotation_seed`` (public round
    randomness, see :meth:`for_round`), ``wrap_probability`` (default 1e-9).
    See ``protocols/dp.md`` section 3.
    """

    mechanism = "ddg"
    _event_class = DDGEvent

    def _noise(self, rng: RandomSource, sigma: float, size: int) -> np.ndarray:
        return sampling.discrete_gaussian(rng, sigma, size)

    def _noise_tail(self, n: int, per_coordinate: float) -> float:
        # N_Z(0, s^2) is s^2-subgaussian (Canonne, Kamath, Steinke 2020), so the sum of n shares is n s^2-subgaussian.
        return math.sqrt(2.0 * n * self.local_sigma(n) ** 2 * math.log(2.0 / per_coordinate))


class DistributedSkellam(_DistributedNoise):
    """Distributed Skellam noise (Agarwal, Kairouz and Liu, NeurIPS 2021) as an integer encoding.

    Parameters as :class:`DistributedDiscreteGaussian`; each share is
    Sk(v/2, v/2) with variance v = (z c / gamma)^2 / t, and any number of shares
    sums to a Skellam variable again. See ``protocols/dp.md`` section 3.
    """

    mechanism = "skellam"
    _event_class = SkellamEvent

    def _noise(self, rng: RandomSource, sigma: float, size: int) -> np.ndarray:
        return sampling.skellam(rng, sigma**2, size)

    def _noise_tail(self, n: int, per_coordinate: float) -> float:
        # Chernoff: log E e^{lZ} = v (cosh l - 1) for Z ~ Sk(v/2, v/2); optimized at l = asinh(s/v).
        v = n * self.local_sigma(n) ** 2
        target = math.log(2.0 / per_coordinate)

        def exponent(s: float) -> float:
            return s * math.asinh(s / v) - math.sqrt(s * s + v * v) + v

        lo, hi = 0.0, max(1.0, math.sqrt(2.0 * v * target))
        while exponent(hi) < target:
            hi *= 2.0
        for _ in range(100):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if exponent(mid) < target else (lo, mid)
        return hi
