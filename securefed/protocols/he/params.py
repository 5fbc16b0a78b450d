"""Parameter rules of the HE protocols: security table, plaintext primes, headroom and noise bounds.

Pure Python (no tenseal), so parameters can be derived, described and audited
without loading TenSEAL. Derivations and proofs: ``protocols/he.md`` ("Parameters")
and ``proofs/he.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from securefed.errors import ConfigurationError

__all__ = [
    "MAX_COEFF_BITS",
    "MAX_PRIME_BITS",
    "NOISE_MARGIN_BITS",
    "BFVRound",
    "CKKSRound",
    "bfv_round",
    "check_ring",
    "ckks_round",
    "is_prime",
]

#: SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)``: the largest total
#: coefficient modulus (bits) for 128-bit classical security with ternary secrets
#: (HomomorphicEncryption.org standard, table 1). Cross-checked against TenSEAL in the tests.
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: SEAL's largest prime (coefficient or plaintext modulus).
MAX_PRIME_BITS = 60

#: CKKS: the output grid 2^-precision_bits is at least 2^20 standard deviations of the decryption
#: noise, so a released sum depends on the noise only near a rounding boundary (IND-CPA^D, proofs/he.md H4).
NOISE_MARGIN_BITS = 20

#: SEAL samples encryption errors from a normal of deviation 3.2 clipped at 6 deviations.
_ERROR_MAX = 19.2

#: Relative error of one float64 FFT butterfly pass, with twiddles accurate to u = 2^-53
#: (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 24.2, eta <= 8u).
_ETA = 8 * 2.0**-53


def check_ring(poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int]) -> tuple[int, ...]:
    """Validate N and the coefficient prime sizes against the 128-bit security table.

    Returns the sizes as a tuple. Raises ConfigurationError for an N that is not a power of two
    in the table, a prime size outside [20, 60], fewer than two primes (the last one is the
    special prime that absorbs the public-key encryption noise), a special prime smaller than a
    data prime, or a total above the table's bound.
    """
    n_ring = poly_modulus_degree
    if not isinstance(n_ring, int) or n_ring not in MAX_COEFF_BITS:
        raise ConfigurationError(
            f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got {poly_modulus_degree!r}"
        )
    try:
        bits = tuple(int(b) for b in coeff_mod_bit_sizes)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigurationError(
            f"coeff_mod_bit_sizes must be a sequence of ints, got {coeff_mod_bit_sizes!r}"
        ) from None
    if len(bits) < 2:
        raise ConfigurationError(
            "coeff_mod_bit_sizes needs at least two primes: data primes, then a special prime "
            f"(the last) that divides away the encryption noise; got {list(bits)}"
        )
    if any(not 20 <= b <= MAX_PRIME_BITS for b in bits):
        raise ConfigurationError(f"every coefficient prime must have 20 to {MAX_PRIME_BITS} bits, got {list(bits)}")
    if bits[-1] < max(bits[:-1]):
        raise ConfigurationError(
            f"the special prime (last) must be at least as large as every data prime, got {list(bits)}"
        )
    if sum(bits) > MAX_COEFF_BITS[n_ring]:
        raise ConfigurationError(
            f"coefficient moduli of {sum(bits)} bits at N={n_ring} are below 128-bit security "
            f"(at most {MAX_COEFF_BITS[n_ring]} bits): use fewer or smaller primes, or a larger N"
        )
    return bits


def data_bits(coeff_mod_bit_sizes: Sequence[int]) -> int:
    """A lower bound on log2 of the data-level modulus q (every prime but the special one).

    A b-bit prime exceeds 2^(b-1), so q > 2^(sum(b_i - 1)).
    """
    return sum(b - 1 for b in coeff_mod_bit_sizes[:-1])


def fresh_noise_bound(poly_modulus_degree: int, special_bits: int) -> float:
    """Worst-case |coefficient| of the noise in a fresh public-key encryption, at the data level.

    SEAL encrypts zero at the key level (noise e1 + e2 s - e u, each term at most
    N * 19.2 for ternary s, u), then divides by the special prime p and rounds:
    noise/p + r0 + r1 s with |r_i| <= 1/2, plus 1/2 for rounding the message (proofs/he.md H1).
    """
    n_ring = poly_modulus_degree
    key_level = _ERROR_MAX * (2 * n_ring + 1)
    return key_level / 2.0 ** (special_bits - 1) + 0.5 + n_ring / 2 + 0.5


# -- CKKS ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CKKSRound:
    """CKKS parameters in force for a round of n clients (see ``protocols/he.md``)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    value_range: float
    precision_bits: int
    n: int
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def noise_bits(self) -> float:
        """log2 of the standard deviation of the decryption noise of a sum of n, in Delta units."""
        return noise_bits(self.poly_modulus_degree, self.n)

    def error_bound(self) -> float:
        """Worst-case absolute error per coordinate of the released sum of up to n inputs."""
        n_ring, n = self.poly_modulus_degree, self.n
        rounding = 2.0 ** -(self.precision_bits + 1)
        noise = n * n_ring * fresh_noise_bound(n_ring, self.coeff_mod_bit_sizes[-1]) / 2.0**self.scale_bits
        fft = 2 * n * self.value_range * math.sqrt(n_ring / 2) * math.log2(n_ring) * _ETA
        return rounding + noise + fft


def noise_bits(poly_modulus_degree: int, n: int) -> float:
    """log2(sqrt(n) N / 6): per slot, the noise of one fresh encryption has deviation about N/6
    (variance N/2 * N/18 from the mod-switch rounding r1 s); n independent ones add in variance."""
    return math.log2(poly_modulus_degree / 6) + 0.5 * math.log2(n)


def ckks_round(
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: Sequence[int],
    value_range: float,
    precision_bits: int,
    n: int,
) -> CKKSRound:
    """Derive the encoding scale for a round of n clients, or raise ConfigurationError.

    Scale Delta = 2^s with s = floor(log2 q) - 2 - ceil(log2(n c)): a sum of n inputs in [-c, c]
    stays below q/4 (headroom). The output grid 2^-precision_bits must be at least
    2^NOISE_MARGIN_BITS noise deviations: s - noise_bits(n) >= precision_bits + NOISE_MARGIN_BITS.
    """
    bits = check_ring(poly_modulus_degree, coeff_mod_bit_sizes)
    if not isinstance(n, int) or n < 1:
        raise ConfigurationError(f"the number of clients must be a positive integer, got {n!r}")
    q_bits = data_bits(bits)
    scale_bits = min(q_bits - 2, q_bits - 2 - math.ceil(math.log2(n * value_range)))
    need = precision_bits + NOISE_MARGIN_BITS + noise_bits(poly_modulus_degree, n)
    if scale_bits < need:
        raise ConfigurationError(
            f"CKKS with value_range={value_range:g}, precision_bits={precision_bits} and n={n} needs a scale of "
            f"2^{math.ceil(need)} but the data modulus (~2^{q_bits}) leaves room for 2^{scale_bits}: lower "
            "value_range or precision_bits, use fewer clients per round, or add a data prime"
        )
    return CKKSRound(poly_modulus_degree, bits, float(value_range), int(precision_bits), n, scale_bits)


# -- BFV ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BFVRound:
    """BFV parameters in force for a round of n clients (see ``protocols/he.md``)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int
    modulus_bits: int
    n: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree


def bfv_noise_ok(poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int], plain_modulus: int, n: int) -> bool:
    """Whether a sum of n fresh encryptions always decrypts correctly: n B t < q/2 (proofs/he.md H2)."""
    bound = n * fresh_noise_bound(poly_modulus_degree, coeff_mod_bit_sizes[-1])
    return math.log2(2 * bound * plain_modulus) < data_bits(coeff_mod_bit_sizes)


def bfv_round(
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: Sequence[int] | None,
    modulus_bits: int,
    n: int,
) -> BFVRound:
    """Derive the plaintext prime (and, if not given, the coefficient primes) for n clients.

    The plaintext modulus t is the smallest prime = 1 (mod 2N) above n 2^k, k = modulus_bits:
    the exact sum of n centered k-bit values never wraps modulo t. Without explicit
    coefficient sizes, the fewest 60-bit data primes (plus a 60-bit special prime) for which
    the noise of n summands stays below q/(2t). Raises ConfigurationError.
    """
    n_ring = poly_modulus_degree
    if n_ring not in MAX_COEFF_BITS:
        check_ring(n_ring, (60, 60))  # raises with the message about N
    if not isinstance(n, int) or n < 1:
        raise ConfigurationError(f"the number of clients must be a positive integer, got {n!r}")
    t = next_batching_prime(n << modulus_bits, n_ring)
    if t.bit_length() > MAX_PRIME_BITS:
        raise ConfigurationError(
            f"BFV needs a plaintext modulus above n 2^k = {n} * 2^{modulus_bits}, more than SEAL's "
            f"{MAX_PRIME_BITS} bits: lower value_bits or the number of clients per round"
        )
    if coeff_mod_bit_sizes is None:
        for data_primes in range(1, MAX_COEFF_BITS[n_ring] // MAX_PRIME_BITS):
            bits = (MAX_PRIME_BITS,) * (data_primes + 1)
            if bfv_noise_ok(n_ring, bits, t, n):
                break
        else:
            raise ConfigurationError(
                f"no coefficient modulus within 128-bit security at N={n_ring} holds the noise of {n} "
                f"summands with a {t.bit_length()}-bit plaintext modulus: use a larger N or fewer clients"
            )
    else:
        bits = check_ring(n_ring, coeff_mod_bit_sizes)
        if not bfv_noise_ok(n_ring, bits, t, n):
            raise ConfigurationError(
                f"coefficient moduli {list(bits)} cannot hold the noise of a sum of {n} encryptions with a "
                f"{t.bit_length()}-bit plaintext modulus: add a data prime or leave coeff_mod_bit_sizes=None"
            )
    return BFVRound(n_ring, check_ring(n_ring, bits), t, modulus_bits, n)


_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(m: int) -> bool:
    """Deterministic Miller-Rabin, exact for m < 3.3e24 (these bases suffice; Sorenson and Webster 2015)."""
    if m < 2:
        return False
    for p in _MR_BASES:
        if m % p == 0:
            return m == p
    d, r = m - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, m)
        if x in (1, m - 1):
            continue
        for _ in range(r - 1):
            x = x * x % m
            if x == m - 1:
                break
        else:
            return False
    return True


def next_batching_prime(bound: int, poly_modulus_degree: int) -> int:
    """The smallest prime t > bound with t = 1 (mod 2N), so that BFV batching has N slots."""
    step = 2 * poly_modulus_degree
    t = bound // step * step + 1
    if t <= bound:
        t += step
    while not is_prime(t):
        t += step
    return t
