"""Cryptographic randomness for one party: AES-CTR keyed from the OS or, in simulation, from a seed.

Why AES-CTR and not ``os.urandom`` for bulk randomness (stochastic rounding, noise):
a 256-bit key from ``os.urandom`` expanded with AES-256-CTR is a CSPRNG and runs at
several GB/s with AES-NI, about ten times faster than the kernel's generator for
model-sized buffers. Never ``random`` or numpy's generators: their outputs are
predictable from a few samples.

A *seeded* source derives every key from the seed with HKDF-SHA256 and a label, so
a simulated round is reproducible. Seeds are for simulation and tests only: a
deployment leaves ``seed=None``.

Fork safety: the stream lives in user space, so a forked child would inherit its
parent's key and draw the parent's next bytes. ``os.register_at_fork`` bumps a
generation counter in the child, and an unseeded source (and every source derived
from it) takes a fresh key from ``os.urandom`` before its next draw there. A seeded
source stays deterministic across forks: that is what a seed asks for.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.crypto.prg import keystream_into, new_stream

__all__ = ["RandomSource", "derive_key"]

#: Bumped in every forked child; an unseeded source rekeys when it sees a new value.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked)


def derive_key(secret: bytes, label: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of `secret` with ``info = b"securefed/" + label``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=b"securefed/" + label.encode()
    ).derive(secret)


def _seed_bytes(seed: int | bytes) -> bytes:
    if isinstance(seed, (bytes, bytearray)):
        return bytes(seed)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        return seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "big")
    raise TypeError(f"seed must be a non-negative int, bytes or None, got {seed!r}")


class RandomSource:
    """A stream of cryptographic random bytes and numbers for one party.

    ``RandomSource()`` draws its key from ``os.urandom``; ``RandomSource(seed)``
    derives it from `seed` (simulation only). :meth:`child` gives an independent
    source for a named purpose, deterministic when the parent is seeded.
    """

    __slots__ = ("_generation", "_key", "_stream", "seeded")

    def __init__(self, seed: int | bytes | None = None) -> None:
        self.seeded = seed is not None
        key = os.urandom(32) if seed is None else derive_key(_seed_bytes(seed), "root")
        self._set_key(key)

    @classmethod
    def _from_key(cls, key: bytes, seeded: bool) -> RandomSource:
        self = cls.__new__(cls)
        self.seeded = seeded
        self._set_key(key)
        return self

    def _set_key(self, key: bytes) -> None:
        self._key = key
        self._stream = new_stream(key)
        self._generation = _fork_generation

    def _check_fork(self) -> None:
        # In a forked child an OS-keyed source must not replay its parent's stream.
        if self._generation != _fork_generation and not self.seeded:
            self._set_key(os.urandom(32))

    def child(self, label: str) -> RandomSource:
        """An independent source for `label`; same label, same stream when seeded."""
        self._check_fork()
        return RandomSource._from_key(derive_key(self._key, "child/" + label), self.seeded)

    def token_bytes(self, n: int) -> bytes:
        """`n` random bytes (keys, seeds, nonces)."""
        self._check_fork()
        return self._stream.update(bytes(n))

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite the C-contiguous array `out` with random bits; returns it."""
        self._check_fork()
        keystream_into(self._stream, out)
        return out

    def integers_below(self, bound: int, size: int) -> np.ndarray:
        """`size` independent uniform integers in ``[0, bound)``, bound <= 2**63 (rejection sampling)."""
        if not 1 <= bound <= 1 << 63:
            raise ValueError(f"bound must be in [1, 2**63], got {bound}")
        out = np.empty(size, dtype=np.uint64)
        if bound == 1:
            out[:] = 0
            return out
        bits = (bound - 1).bit_length()
        mask = np.uint64((1 << bits) - 1)
        filled = 0
        while filled < size:
            # Accept probability > 1/2, so a batch of 2x the shortfall (+8) rarely repeats.
            cand = self.fill(np.empty(2 * (size - filled) + 8, dtype=np.uint64)) & mask
            cand = cand[cand < np.uint64(bound)][: size - filled]
            out[filled : filled + cand.size] = cand
            filled += cand.size
        return out
