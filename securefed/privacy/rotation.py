"""A random rotation of R^d that flattens vectors: randomized Hadamard on two overlapping windows.

For d = 2^a the rotation is H D / sqrt(d) (H the Walsh-Hadamard matrix, D random
signs), as in Kairouz, Liu and Steinke (2021). For other d, with B the largest
power of two <= d, it is H D1 / sqrt(B) on coordinates [0, B) followed by
H D2 / sqrt(B) on [d - B, d): orthogonal, no padding (an encoded vector keeps
the length the protocol expects), and each output coordinate is a Rademacher
sum with variance proxy at most ||x||^2 / B <= 2 ||x||^2 / d. The signs come
from public round randomness, so every party and the server rotate alike.
See ``proofs/dp.md`` section 3.
"""

from __future__ import annotations

import math

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import ConfigurationError

__all__ = ["HadamardRotation"]


def _kernels():
    from securefed.privacy import _kernels as k

    return k


class HadamardRotation:
    """The rotation for vectors of length `dim`, its signs derived from the public `seed`."""

    def __init__(self, dim: int, seed: bytes) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigurationError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.block = 1 << (self.dim.bit_length() - 1)
        src = RandomSource(bytes(seed)).child("hadamard-signs")
        self._signs = [self._draw(src) for _ in range(1 if self.block == self.dim else 2)]
        self._norm = 1.0 / math.sqrt(self.block)

    def _draw(self, src: RandomSource) -> np.ndarray:
        bits = src.fill(np.empty(self.block, dtype=np.uint8)) & 1
        return 1.0 - 2.0 * bits.astype(np.float64)

    def _windows(self) -> list[tuple[slice, np.ndarray]]:
        return [(slice(0, self.block), self._signs[0])] + (
            [(slice(self.dim - self.block, self.dim), self._signs[1])] if len(self._signs) == 2 else []
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The rotated copy of `x` (float64)."""
        y = np.array(x, dtype=np.float64, copy=True)
        for window, signs in self._windows():
            part = y[window] * signs
            _kernels().fwht(part)
            y[window] = part * self._norm
        return y

    def inverse(self, y: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Undo :meth:`forward` (in `out` if given, which may be `y`)."""
        x = np.array(y, dtype=np.float64, copy=True) if out is None else out
        if out is not None and out is not y:
            x[:] = y
        for window, signs in reversed(self._windows()):
            part = np.ascontiguousarray(x[window])
            _kernels().fwht(part)
            x[window] = part * self._norm * signs
        return x
