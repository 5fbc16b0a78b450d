"""Fixed-point encoding of real vectors into integers modulo 2^k, and back.

A coordinate x in [-c, c] becomes the signed integer q = SR(x * s) with scale
s = (2^(b-1) - 1) / c and SR unbiased stochastic rounding, so |q| <= 2^(b-1) - 1.
It is stored modulo 2^k with k = b + ceil(log2 n): the sum of n such integers has
magnitude below 2^(k-1), so the centered representative of the modular sum is the
exact integer sum (no wrap). See ``protocols/encoding.md``.

Randomness for rounding: 32-bit uniforms from the party's AES-CTR
:class:`~securefed.crypto.random.RandomSource`, because rounding noise is part of
what hides an input (and of the DP analysis of distributed noise), so it must not
be predictable. With 32-bit uniforms, P(round up) = ceil(frac * 2^32) / 2^32:
the expected error of one coordinate is at most 2^-32 of a step.
"""

from __future__ import annotations

import abc
import math
import sys

import numpy as np

from securefed import parallel
from securefed.crypto.random import RandomSource
from securefed.encoding.loops import loops
from securefed.encoding.packing import storage_dtype
from securefed.errors import ConfigurationError, InvalidInput

__all__ = [
    "FixedPoint",
    "IntegerEncoder",
    "check_vector",
    "decode_centered",
    "decode_error_bound",
    "modulus_bits",
]


#: Largest value_bits: beyond float64's 53-bit significand more bits carry no information.
MAX_VALUE_BITS = 53


def decode_centered(s: np.ndarray, k: int, inv_scale: float, out: np.ndarray) -> None:
    """``out[i] = centered(s[i] mod 2^k) * inv_scale`` (centered into [-2^(k-1), 2^(k-1))), in one compiled pass.

    The last step of every integer encoder's ``decode``; it trusts its caller for shapes and dtypes."""
    loops(s.size).decode_into(s, k, inv_scale, out)


def check_positive_count(n: object, what: str = "the number of summands") -> int:
    """`n` as an int if it is an integer >= 1 (not a bool); else ConfigurationError naming `what`."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigurationError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def modulus_bits(value_bits: int, n: int) -> int:
    """k = value_bits + ceil(log2 n): the width of a sum of n inputs; ConfigurationError above 64."""
    n = check_positive_count(n)
    k = int(value_bits) + math.ceil(math.log2(n)) if n > 1 else int(value_bits)
    if k > 64:
        raise ConfigurationError(
            f"a sum of {n} inputs at {value_bits} bits needs a {k}-bit modulus; the limit is 64: "
            "lower value_bits or the number of clients per round"
        )
    return k


def decode_error_bound(n: int, value_range: float, value_bits: int) -> float:
    """Worst-case absolute error of one coordinate of a decoded sum of n inputs.

    Each input's rounding error is below one step 1/s; float64 rounding of the
    scaling and of the decoded integer adds at most 2^-52 * c per input.
    ConfigurationError unless n is a positive integer (a bound for n < 1 would be negative).
    """
    n = check_positive_count(n, "the number of clients")
    scale = (2 ** (value_bits - 1) - 1) / value_range
    return n * (1.0 / scale + 2.0 * value_range * 2.0**-52)


def check_vector(x: object, dim: int | None = None) -> np.ndarray:
    """Return `x` as a 1-D float32 or float64 array in native byte order, or raise InvalidInput.

    Every protocol's client input goes through here, because the compiled loops take only
    those two dtypes. Exact conversions are made: a torch tensor is detached and moved to
    the CPU (bfloat16 and float16 widen to float32), a numpy float16 array widens to float32,
    a big-endian array is byte-swapped. A wider float (longdouble) narrows to float64, the
    precision every sum is made in (InvalidInput for a value beyond float64's range).
    Integer, complex or object arrays are refused. Finiteness is checked by the caller
    (:func:`check_finite`, or the encoder's own pass, which needs no second one).
    """
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach"):  # a tensor, not a device or module
        x = _from_torch(x)
    if not isinstance(x, np.ndarray):
        raise InvalidInput(f"expected a 1-D numpy float array or torch tensor, got {type(x).__name__}")
    if x.ndim != 1 or x.dtype.kind != "f":
        raise InvalidInput(f"expected a 1-D float array, got shape {x.shape} and dtype {x.dtype}")
    if x.size == 0:
        raise InvalidInput("empty input vector")
    if dim is not None and x.size != dim:
        raise InvalidInput(f"expected a vector of length {dim}, got {x.size}")
    return _native_float(x)


def _from_torch(t: object) -> object:
    """A torch tensor as a numpy array (a view where torch allows one); torch is not imported here."""
    t = t.detach().cpu()  # type: ignore[attr-defined]
    if str(t.dtype) in ("torch.bfloat16", "torch.float16"):  # type: ignore[attr-defined]
        t = t.float()  # type: ignore[attr-defined]  # numpy has no bfloat16; float32 holds both exactly
    return t.numpy()  # type: ignore[attr-defined]


def _native_float(x: np.ndarray) -> np.ndarray:
    """The float array `x` as float32 or float64 in native byte order (no copy when it already is)."""
    if x.dtype.itemsize == 2:
        return x.astype(np.float32)  # exact
    if x.dtype.itemsize > 8:
        with np.errstate(over="ignore"):
            y = x.astype(np.float64)
        beyond = np.flatnonzero(np.isinf(y) & np.isfinite(x))
        if beyond.size:
            i = int(beyond[0])
            v = np.format_float_scientific(x[i], precision=6, trim="-")  # format() would print inf
            raise InvalidInput(
                f"input coordinate {i} is {v}, beyond float64's range (+-{np.finfo(np.float64).max:.4g}) "
                "in which securefed sums: scale the update down"
            )
        return y
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def check_finite(x: np.ndarray, what: str = "input") -> None:
    """InvalidInput if the 1-D float array `x` holds a NaN or Inf; checked chunk by chunk
    (no vector-sized boolean temporary)."""
    step = parallel.get_chunk_size()
    if not all(np.isfinite(x[lo : lo + step]).all() for lo in range(0, x.size, step)):
        raise InvalidInput(f"{what} contains NaN or Inf; updates must be finite")


def check_sum(total: np.ndarray, n: int | None = None) -> np.ndarray:
    """`total` (a decoded float sum) if every coordinate is finite; else InvalidInput.

    Finite inputs can still add up beyond float64's range: such a sum (or a mean made from it)
    is an error, never a result. `n`, when known, is the count of summands, for the message.
    """
    step = parallel.get_chunk_size()
    for lo in range(0, total.size, step):
        bad = np.flatnonzero(~np.isfinite(total[lo : lo + step]))
        if bad.size:
            i = lo + int(bad[0])
            of = f" of {n} inputs" if n is not None else ""
            big = np.finfo(np.float64).max
            why = (f"finite inputs overflowed float64 (+-{big:.4g}); scale the updates down so that "
                   f"n * value_range stays below {big:.4g}" if np.isinf(total[i])
                   else "a sum must be finite; the protocol produced no valid total")
            raise InvalidInput(f"the sum{of} is {total[i]} at coordinate {i}: {why}")
    return total


class IntegerEncoder(abc.ABC):
    """Maps real vectors to integers modulo 2^k so that decoding a modular sum gives the real sum.

    The masking and BFV protocols carry whatever an encoder produces; the default is
    :class:`FixedPoint`, and the distributed-DP mechanisms are encoders too.
    """

    @abc.abstractmethod
    def modulus_bits(self, n: int) -> int:
        """Width k of the modulus for a round of n parties."""

    @abc.abstractmethod
    def encode(self, x: np.ndarray, *, n: int, rng: RandomSource) -> np.ndarray:
        """One client's input as integers mod 2^k (uint32 if k <= 32, else uint64)."""

    #: True when :meth:`encode_chunk` is available: coordinate i's encoding depends only on x[i]
    #: and the i-th rounding uniform, so a vector can be encoded piece by piece, in any order
    #: (streaming, threads). Encoders that mix coordinates (rotations) keep False.
    chunked: bool = False

    def check(self, x: np.ndarray) -> None:
        """InvalidInput unless every coordinate of the 1-D float array `x` can be encoded (chunked encoders)."""
        raise NotImplementedError(f"{type(self).__name__} checks inputs as it encodes them")

    def encode_chunk(self, x: np.ndarray, uniforms: np.ndarray, *, n: int, out: np.ndarray, offset: int = 0) -> None:
        """Encode the piece `x` (coordinates ``offset..`` of a vector) into `out`, rounding with `uniforms`.

        `uniforms` holds one uint32 per coordinate; `out` is :func:`storage_dtype` of the
        width, as long as `x`. Raises InvalidInput like :meth:`encode`, naming the
        coordinate's index in the whole vector. Only for :attr:`chunked` encoders.
        """
        raise NotImplementedError(f"{type(self).__name__} encodes whole vectors only")

    @abc.abstractmethod
    def decode(self, s: np.ndarray, *, n: int, count: int) -> np.ndarray:
        """The float64 sum from `s`, the modular sum of `count` encoded inputs of a round of n."""

    @abc.abstractmethod
    def error_bound(self, n: int) -> float:
        """Worst-case absolute error per coordinate of a decoded sum of up to n inputs."""

    def describe(self) -> dict[str, object]:
        """Parameters for logs and the audit trail."""
        return {"encoder": type(self).__name__}


class FixedPoint(IntegerEncoder):
    """Signed fixed point: inputs in [-value_range, value_range] at value_bits bits.

    Values outside the range raise InvalidInput (never a silent clip). Coordinates are
    encoded independently, so vectors can be encoded chunk by chunk (:meth:`encode_chunk`).
    """

    chunked = True

    def __init__(self, *, value_range: float, value_bits: int) -> None:
        if (isinstance(value_range, (bool, np.bool_))  # True would read as 1.0
                or not isinstance(value_range, (int, float, np.integer, np.floating))
                or not (math.isfinite(value_range) and value_range > 0)):
            raise ConfigurationError(f"value_range must be a finite number > 0 (not a bool), got {value_range!r}")
        if (isinstance(value_bits, (bool, np.bool_)) or not isinstance(value_bits, (int, np.integer))
                or not 2 <= value_bits <= MAX_VALUE_BITS):
            raise ConfigurationError(f"value_bits must be an integer in [2, {MAX_VALUE_BITS}], got {value_bits!r}")
        self.value_range = float(value_range)
        self.value_bits = int(value_bits)
        self.scale = (2 ** (self.value_bits - 1) - 1) / self.value_range
        if not math.isfinite(self.scale):  # a (sub)normal range this small: inf scale, every sum decodes to 0
            raise ConfigurationError(
                f"value_range {self.value_range!r} is too small for {self.value_bits}-bit fixed point: its scale "
                f"(2^{self.value_bits - 1} - 1) / value_range overflows float64; give value_range >= "
                f"{(2 ** (self.value_bits - 1) - 1) / sys.float_info.max:.3g} or scale the inputs up")

    def __repr__(self) -> str:
        return f"FixedPoint(value_range={self.value_range!r}, value_bits={self.value_bits})"

    def modulus_bits(self, n: int) -> int:
        return modulus_bits(self.value_bits, n)

    def error_bound(self, n: int) -> float:
        return decode_error_bound(n, self.value_range, self.value_bits)

    def describe(self) -> dict[str, object]:
        return {"encoder": "FixedPoint", "value_range": self.value_range, "value_bits": self.value_bits}

    def encode(
        self, x: np.ndarray, *, n: int, rng: RandomSource, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Quantize `x` with stochastic rounding into `out` (or a new array) modulo 2^k.

        Raises InvalidInput for NaN/Inf, a non-1-D/non-float array, or |x_i| > value_range.
        """
        x = check_vector(x)
        k = self.modulus_bits(n)
        dtype = storage_dtype(k)
        if out is None:
            out = np.empty(x.size, dtype=dtype)
        elif out.shape != x.shape or out.dtype != dtype:
            raise InvalidInput(f"out must have shape {x.shape} and dtype {dtype}")
        step = parallel.get_chunk_size()  # the rounding uniforms of a chunk stay in cache
        u = np.empty(min(step, x.size), dtype=np.uint32)
        for lo in range(0, x.size, step):
            hi = min(lo + step, x.size)
            self.encode_chunk(x[lo:hi], rng.fill(u[: hi - lo]), n=n, out=out[lo:hi], offset=lo)
        return out

    def check(self, x: np.ndarray) -> None:
        """InvalidInput for a coordinate of `x` that is NaN/Inf or outside [-value_range, value_range]."""
        bad = loops(x.size).first_outside(x, self.value_range)
        if bad >= 0:
            raise self._bad_value(x, bad)

    def encode_chunk(self, x: np.ndarray, uniforms: np.ndarray, *, n: int, out: np.ndarray, offset: int = 0) -> None:
        """Quantize the piece `x` into `out` with the given rounding uniforms (see IntegerEncoder)."""
        mask = np.uint64((1 << self.modulus_bits(n)) - 1)
        bad = loops(x.size).quantize_into(x, self.scale, self.value_range, uniforms, mask, out)
        if bad >= 0:
            raise self._bad_value(x, bad, offset)

    def _bad_value(self, x: np.ndarray, i: int, offset: int = 0) -> InvalidInput:
        v = float(x[i])
        if not math.isfinite(v):
            return InvalidInput(f"input coordinate {i + offset} is {v}; updates must be finite")
        return InvalidInput(
            f"input coordinate {i + offset} is {v:.6g}, outside the declared range [-{self.value_range:g}, "
            f"{self.value_range:g}]; clip or scale the update, or declare a larger value_range"
        )

    def decode(self, s: np.ndarray, *, n: int, count: int | None = None) -> np.ndarray:
        """The float64 sum encoded by the modular sum `s` of a round of n parties."""
        k = self.modulus_bits(n)
        if not isinstance(s, np.ndarray) or s.ndim != 1 or s.dtype.kind != "u":
            raise InvalidInput("decode expects a 1-D unsigned integer array")
        out = np.empty(s.size, dtype=np.float64)
        decode_centered(s, k, 1.0 / self.scale, out)
        return out
