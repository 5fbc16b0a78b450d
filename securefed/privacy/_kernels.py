"""Compiled samplers and transforms for the noise mechanisms (numba, cached, GIL released).

Every sampler consumes raw 64-bit words from the party's AES-CTR
:class:`~securefed.crypto.random.RandomSource` (never numpy's generators) and
turns word w into the uniform ((w >> 11) + 1/2) / 2^53 in (0, 1). Rejection
samplers take a buffer of words and return how far they got; the caller refills.
They trust their inputs: :mod:`securefed.privacy.sampling` checks them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_INV53 = 1.0 / 9007199254740992.0
_TWO_PI = 2.0 * math.pi


@njit(cache=True, nogil=True)
def _u(w):  # pragma: no cover - compiled
    return (np.float64(w >> np.uint64(11)) + 0.5) * _INV53


@njit(cache=True, nogil=True)
def gaussian_into(out, std, words):  # pragma: no cover - compiled
    """Box-Muller: out[i] ~ N(0, std^2); uses 2 words per pair of outputs (len(words) >= len(out) + 1)."""
    j = 0
    i = 0
    while i < out.size:
        r = math.sqrt(-2.0 * math.log(_u(words[j]))) * std
        th = _TWO_PI * _u(words[j + 1])
        out[i] = r * math.cos(th)
        if i + 1 < out.size:
            out[i + 1] = r * math.sin(th)
        i += 2
        j += 2


@njit(cache=True, nogil=True)
def discrete_gaussian_into(out, start, sigma, words):  # pragma: no cover - compiled
    """Canonne, Kamath and Steinke (NeurIPS 2020), Algorithm 3: fill out[start:] with N_Z(0, sigma^2).

    Candidate Y ~ discrete Laplace with scale t = floor(sigma) + 1 (a difference of two
    geometrics, each floor(-t log U)); accept with probability
    exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). Three words per candidate; returns the
    next index to fill.
    """
    t = math.floor(sigma) + 1.0
    s2 = sigma * sigma
    i = start
    j = 0
    while i < out.size and j + 3 <= words.size:
        g1 = math.floor(-t * math.log(_u(words[j])))
        g2 = math.floor(-t * math.log(_u(words[j + 1])))
        y = g1 - g2
        a = abs(y) - s2 / t
        if _u(words[j + 2]) < math.exp(-a * a / (2.0 * s2)):
            out[i] = np.int64(y)
            i += 1
        j += 3
    return i


@njit(cache=True, nogil=True)
def poisson_into(out, start, lam, words):  # pragma: no cover - compiled
    """Fill out[start:] with Poisson(lam) draws; returns the next index to fill.

    lam < 10: inversion by sequential search (one word per draw). lam >= 10:
    Hormann's PTRS transformed rejection (1993), as numpy implements it (two
    words per candidate).
    """
    i = start
    j = 0
    if lam < 10.0:
        p0 = math.exp(-lam)
        while i < out.size and j < words.size:
            u = _u(words[j])
            j += 1
            k = 0
            p = p0
            cdf = p
            while u > cdf and k < 1000:
                k += 1
                p *= lam / k
                cdf += p
            out[i] = k
            i += 1
        return i
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while i < out.size and j + 2 <= words.size:
        uu = _u(words[j]) - 0.5
        v = _u(words[j + 1])
        j += 2
        us = 0.5 - abs(uu)
        k = math.floor((2.0 * a / us + b) * uu + lam + 0.43)
        if us >= 0.07 and v <= vr:
            out[i] = np.int64(k)
            i += 1
            continue
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1.0):
            out[i] = np.int64(k)
            i += 1
    return i


@njit(cache=True, nogil=True)
def round_into(y, words, out):  # pragma: no cover - compiled
    """Randomized rounding: out[i] = floor(y[i]) + [frac(y[i]) > U_i], so E[out[i]] = y[i]."""
    for i in range(y.size):
        f = math.floor(y[i])
        r = np.int64(f)
        if y[i] - f > _u(words[i]):
            r += 1
        out[i] = r


@njit(cache=True, nogil=True)
def fwht(a):  # pragma: no cover - compiled
    """In-place unnormalized Walsh-Hadamard transform of a float64 array of power-of-two length."""
    n = a.size
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                x = a[j]
                y = a[j + h]
                a[j] = x + y
                a[j + h] = x - y
        h *= 2
