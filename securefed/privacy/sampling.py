"""Noise samplers driven by a cryptographic source: Gaussian, discrete Gaussian, Poisson, Skellam.

Each takes the party's :class:`~securefed.crypto.random.RandomSource` (AES-CTR),
so noise is unpredictable without the party's key and reproducible in seeded
simulations. The samplers work in float64 (as TensorFlow Privacy's and Opacus'
do), so their distributions match the exact ones up to float64 rounding of the
logarithms and exponentials involved (relative error ~1e-16 per probability);
the tests check them against the exact probability mass functions. See
``proofs/dp.md`` section 6.
"""

from __future__ import annotations

import math

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError

__all__ = ["discrete_gaussian", "gaussian", "poisson", "poisson_sample", "skellam"]


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    from securefed.privacy import _kernels as k

    return k


def _check(name: str, value: float, size: int) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(size, (int, np.integer)) or size < 0:
        raise ConfigurationError(f"size must be an integer >= 0, got {size!r}")


def _words(rng: RandomSource, count: int) -> np.ndarray:
    return rng.fill(np.empty(count, dtype=np.uint64))


def poisson_sample(rng: RandomSource, size: int, rate: float) -> np.ndarray:
    """Indices (ascending, int64) of a Poisson sample of range(size): each in independently with probability `rate`.

    One 64-bit word per index, in when below ``floor(rate * 2^64)`` (an exact integer threshold, so
    P(in) = rate up to 2^-64); `rate` = 1 takes every index (no word is drawn) and 0 none.
    """
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise ConfigurationError(f"the sampling rate must be in [0, 1], got {rate!r}")
    if not isinstance(size, (int, np.integer)) or size < 0:
        raise ConfigurationError(f"size must be an integer >= 0, got {size!r}")
    if rate >= 1.0:
        return np.arange(size, dtype=np.int64)
    if rate <= 0.0 or size == 0:
        return np.zeros(0, dtype=np.int64)
    # rate < 1 is at most 1 - 2^-53, so rate * 2^64 <= 2^64 - 2^11: exact in float64 and below 2^64.
    threshold = np.uint64(int(float(rate) * 2.0**64))
    return np.flatnonzero(_words(rng, int(size)) < threshold).astype(np.int64)


def gaussian(rng: RandomSource, std: float, size: int) -> np.ndarray:
    """`size` independent N(0, std^2) draws as float64 (Box-Muller)."""
    _check("std", std, size)
    out = np.empty(size, dtype=np.float64)
    if size:
        _kernels().gaussian_into(out, float(std), _words(rng, size + 1 + (size & 1)))
    return out


def _rejection(kernel, rng: RandomSource, param: float, size: int, words_per_draw: float) -> np.ndarray:
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        # Acceptance is above 1/2 for every parameter, so twice the words rarely needs a second pass.
        need = int(words_per_draw * 2 * (size - filled)) + 16
        filled = kernel(out, filled, param, _words(rng, need))
    return out


def discrete_gaussian(rng: RandomSource, sigma: float, size: int) -> np.ndarray:
    """`size` independent draws of the discrete Gaussian N_Z(0, sigma^2) as int64 (zeros if sigma == 0).

    P(x) is proportional to exp(-x^2 / (2 sigma^2)) on the integers (Canonne, Kamath, Steinke 2020).
    """
    _check("sigma", sigma, size)
    if sigma == 0:
        return np.zeros(size, dtype=np.int64)
    return _rejection(_kernels().discrete_gaussian_into, rng, float(sigma), size, 3)


def poisson(rng: RandomSource, lam: float, size: int) -> np.ndarray:
    """`size` independent Poisson(lam) draws as int64."""
    _check("lam", lam, size)
    if lam == 0:
        return np.zeros(size, dtype=np.int64)
    return _rejection(_kernels().poisson_into, rng, float(lam), size, 1 if lam < 10 else 2)


def skellam(rng: RandomSource, variance: float, size: int) -> np.ndarray:
    """`size` draws of the symmetric Skellam Sk(v/2, v/2) = Poisson(v/2) - Poisson(v/2), variance v."""
    _check("variance", variance, size)
    return poisson(rng, variance / 2.0, size) - poisson(rng, variance / 2.0, size)
