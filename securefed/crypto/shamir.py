"""Shamir t-of-n secret sharing of short secrets (keys, seeds) over the prime field GF(2^31 - 1).

Field and chunking: a secret of L bytes is read as a little-endian integer and cut
into ``ceil(8L / 30)`` chunks of 30 bits (32 bytes: 9 chunks); each chunk is an
element of GF(p), p = 2^31 - 1, shared with its own random polynomial of degree
t - 1 (Shamir 1979). Holder h gets the evaluations at x = h + 1, one per chunk:
a share is ``4 * chunks`` bytes (36 for a 32-byte secret), little-endian uint32
values below p. Products of two field elements fit in 62 bits: evaluation runs vectorized
in uint64 numpy arrays over all secrets, chunks and holders at once; reconstruction
(interpolation at zero, the chunks back to bytes, the checks below) is one compiled pass
(``_shamir_kernels``), as the server runs it once per round for every secret. Fewer than t
shares are uniformly distributed whatever the secret (``tests/crypto/test_shamir.py`` checks it
exhaustively over small fields).

Reconstruction uses the first t shares given and checks that every chunk is a
valid 30-bit value and the padding above 8L bits is zero; a share set that fails
that check raises MessageRejected("invalid shares") (a wrong share is detected
with probability about 1 - 2^-14 per 32-byte secret by these checks alone;
callers verify the secret against a public value, e.g. a public key).
See ``protocols/secagg.md`` (Shamir sharing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from securefed.crypto.random import RandomSource
from securefed.errors import MessageRejected

__all__ = [
    "CHUNK_BITS",
    "PRIME",
    "chunk_count",
    "reconstruct",
    "share_from_bytes",
    "share_size",
    "share_to_bytes",
    "split",
]

PRIME = 2**31 - 1
CHUNK_BITS = 30
_CHUNK_MASK = (1 << CHUNK_BITS) - 1


def chunk_count(secret_len: int) -> int:
    """Field elements per share of a `secret_len`-byte secret."""
    if secret_len < 1:
        raise ValueError("a secret has at least one byte")
    return -(-8 * secret_len // CHUNK_BITS)


def share_size(secret_len: int) -> int:
    """Bytes of one serialized share of a `secret_len`-byte secret."""
    return 4 * chunk_count(secret_len)


def _to_chunks(secret: bytes, chunks: int) -> list[int]:
    v = int.from_bytes(secret, "little")
    return [(v >> (CHUNK_BITS * i)) & _CHUNK_MASK for i in range(chunks)]


def _evaluate(secrets: np.ndarray, coeffs: np.ndarray, xs: np.ndarray, p: int) -> np.ndarray:
    """f(x) for each x in `xs`: f has constant term `secrets` (shape S) and `coeffs[j]` for x^(j+1).

    Returns shape ``(len(xs),) + secrets.shape``; all arithmetic modulo `p` in uint64.
    """
    x = xs.astype(np.uint64).reshape((-1,) + (1,) * secrets.ndim)
    pp = np.uint64(p)
    acc = np.broadcast_to(coeffs[-1] if len(coeffs) else secrets, (xs.size,) + secrets.shape).astype(np.uint64)
    for j in range(len(coeffs) - 2, -2, -1):
        term = coeffs[j] if j >= 0 else secrets
        acc = (acc * x + term) % pp
    return acc


def _kernels():  # numba loads on first use, keeping `import securefed` fast
    from securefed.crypto import _shamir_kernels as k

    return k


def _lagrange_at_zero(xs: Sequence[int], p: int) -> np.ndarray:
    """Coefficients l_i with f(0) = sum l_i f(x_i) mod p, for distinct non-zero `xs` (compiled: O(t^2)
    products and one exponentiation, Montgomery's trick for the t inverses)."""
    return _kernels().lagrange_at_zero(np.asarray(xs, dtype=np.int64).astype(np.uint64) % np.uint64(p), np.uint64(p))


def _combine(lam: np.ndarray, ys: np.ndarray, p: int) -> np.ndarray:
    """sum_i lam_i * ys[i] mod p over the first axis (ys below p, shape (t, S[, C]))."""
    y = np.asarray(ys, dtype=np.uint64)
    shaped = y.reshape(y.shape[0], y.shape[1] if y.ndim > 1 else 1, -1)
    return _kernels().combine(np.asarray(lam, dtype=np.uint64), shaped, np.uint64(p)).reshape(y.shape[1:])


def _check_holders(holders: Sequence[int]) -> list[int]:
    if np.ndim(holders) != 1 or not len(holders):
        raise ValueError("holders must be a non-empty sequence of party indices")
    h = [int(v) for v in holders]
    if min(h) < 0 or max(h) > PRIME - 2:
        raise ValueError(f"holder indices must be in [0, {PRIME - 2}]")
    if len(set(h)) != len(h):
        raise ValueError("holder indices must be distinct")
    return h


def split(secrets: Sequence[bytes], threshold: int, holders: Sequence[int], rng: RandomSource) -> np.ndarray:
    """Share each of `secrets` (equal lengths) t-of-len(holders) among `holders`.

    Returns uint32 shares of shape ``(len(holders), len(secrets), chunk_count(L))``:
    ``out[i, s]`` is holder ``holders[i]``'s share of ``secrets[s]``.
    """
    h = np.array(_check_holders(holders), dtype=np.int64)
    if not 1 <= threshold <= h.size:
        raise ValueError(f"threshold must be in [1, {h.size}], got {threshold}")
    if not secrets or len({len(s) for s in secrets}) != 1:
        raise ValueError("secrets must be a non-empty sequence of byte strings of equal length")
    chunks = chunk_count(len(secrets[0]))
    values = np.array([_to_chunks(bytes(s), chunks) for s in secrets], dtype=np.uint64)
    coeffs = rng.integers_below(PRIME, (threshold - 1) * values.size).reshape((threshold - 1,) + values.shape)
    return _evaluate(values, coeffs, h + 1, PRIME).astype(np.uint32)


def reconstruct(holders: Sequence[int], shares: np.ndarray, threshold: int, secret_len: int) -> list[bytes]:
    """The secrets from the shares ``shares[i]`` (shape ``(S, chunks)``) of ``holders[i]``.

    Uses the first `threshold` holders. Raises ValueError when fewer are given and
    MessageRejected("invalid shares") when the result is not a valid secret.
    """
    h = _check_holders(holders)
    if len(h) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(h)}")
    ys = np.asarray(shares)
    if ys.ndim != 3 or ys.shape[0] != len(h) or ys.shape[2] != chunk_count(secret_len):
        raise ValueError("shares must have shape (holders, secrets, chunks)")
    ys = ys[:threshold]
    if ys.dtype != np.uint32:  # wider values must not wrap on the way to the check below p
        if (ys < 0).any() or (ys >= PRIME).any():
            raise MessageRejected("invalid shares")
        ys = ys.astype(np.uint32)
    out = np.empty((ys.shape[1], secret_len), dtype=np.uint8)
    x = np.array(h[:threshold], dtype=np.uint64) + np.uint64(1)
    if _kernels().reconstruct(x, np.ascontiguousarray(ys), np.uint64(PRIME), CHUNK_BITS, out):
        raise MessageRejected("invalid shares")
    raw = out.tobytes()
    return [raw[i : i + secret_len] for i in range(0, len(raw), secret_len)]


def share_to_bytes(share: np.ndarray) -> bytes:
    """Serialize one share (1-D, values < p) as little-endian uint32."""
    return np.ascontiguousarray(share, dtype="<u4").tobytes()


def share_from_bytes(data: bytes | memoryview, secret_len: int) -> np.ndarray:
    """Parse one share; MessageRejected("invalid share") for a wrong length or a value >= p."""
    if len(data) != share_size(secret_len):
        raise MessageRejected("invalid share")
    v = np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32)
    if (v >= PRIME).any():
        raise MessageRejected("invalid share")
    return v
