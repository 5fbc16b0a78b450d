"""The RDP bounds dp-accounting lacks: distributed discrete Gaussian, Skellam, and generic Poisson subsampling.

Everything here works in the *scaled integer domain*: a client's vector, clipped to
L2 norm c, is multiplied by 1/gamma and randomly rounded to integers, so the
sensitivities below are integer-domain norms and the noise parameters are
integer-domain variances. See ``proofs/dp.md`` (sections 2-4) for the arguments.

Orders are integers >= 2 (the Skellam theorem and the subsampling bound are stated
for integers); the accountant evaluates a fractional order alpha at ceil(alpha),
a valid upper bound because Renyi divergence is non-decreasing in its order.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ddg_rdp",
    "ddg_tau",
    "poisson_subsampled_rdp",
    "rounded_l1_bound",
    "rounded_l2_bound",
    "skellam_rdp",
]


def rounded_l2_bound(scaled_clip: float, dimension: int, beta: float) -> float:
    """L2 norm bound of a vector of norm <= `scaled_clip` in R^d after (conditional) randomized rounding.

    Kairouz, Liu and Steinke (ICML 2021), Theorem 1 / Proposition 22: unconditional
    rounding moves each coordinate by less than 1, so ||x~|| <= c' + sqrt(d);
    conditioning on ||x~||^2 <= c'^2 + d/4 + sqrt(2 log(1/beta)) (c' + sqrt(d)/2)
    (an event of probability >= 1 - beta, re-rounding otherwise) gives the second
    bound when beta > 0. Here c' = c / gamma.
    """
    plain = scaled_clip + math.sqrt(dimension)
    if beta <= 0.0:
        return plain
    conditional = math.sqrt(
        scaled_clip**2 + dimension / 4.0
        + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + math.sqrt(dimension) / 2.0)
    )
    return min(plain, conditional)


def rounded_l1_bound(l2: float, dimension: int) -> float:
    """L1 bound of an integer vector in Z^d with L2 norm <= l2: min(sqrt(d) l2, l2^2) (each |x_i| >= 1 or 0)."""
    return l2 * min(math.sqrt(dimension), l2)


#: Terms of tau summed one by one; the rest are bounded by their common limit (see ddg_tau).
_TAU_EXACT_TERMS = 2**20


def ddg_tau(local_sigma: float, num_clients: int) -> float:
    """tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) (Kairouz, Liu, Steinke 2021, Theorem 1).

    `local_sigma` is the integer-domain parameter of one client's discrete Gaussian share. The terms
    fall with k, so those past K = 2^20 are each bounded by the first of them, k = K + 1: a huge n
    costs no memory and the result stays an upper bound (every RDP bound here grows with tau).
    """
    if num_clients <= 1:
        return 0.0
    c = 2.0 * math.pi**2 * local_sigma**2
    k = np.arange(1, min(num_clients, _TAU_EXACT_TERMS + 1), dtype=np.float64)
    first = _TAU_EXACT_TERMS + 1
    tail = max(num_clients - first, 0) * math.exp(-c * first / (first + 1.0))
    return float(10.0 * (np.exp(-c * k / (k + 1.0)).sum() + tail))


def ddg_rdp(orders: np.ndarray, l2: float, l1: float, sigma: float, tau: float, dimension: int) -> np.ndarray:
    """RDP of the sum of n discrete Gaussian shares added to an integer query (no subsampling).

    Kairouz, Liu and Steinke (ICML 2021), Theorem 1 and Proposition 14 (eq. 17):
    with sensitivities l2 = Delta_2, l1 = Delta_1, total parameter sigma^2 = n sigma_local^2
    and tau from :func:`ddg_tau`, for every order alpha >= 1

        eps(alpha) = min{ alpha Delta_2^2 / (2 sigma^2) + tau d,
                          alpha / 2 (Delta_2^2 / sigma^2 + 2 Delta_1 tau / sigma + tau^2 d),
                          alpha / 2 (Delta_2 / sigma + tau sqrt(d))^2 }.
    """
    a = np.asarray(orders, dtype=np.float64)
    r2, r1 = l2 / sigma, l1 / sigma
    t1 = a / 2.0 * r2**2 + tau * dimension
    t2 = a / 2.0 * (r2**2 + 2.0 * r1 * tau + tau**2 * dimension)
    t3 = a / 2.0 * (r2 + math.sqrt(dimension) * tau) ** 2
    return np.minimum(np.minimum(t1, t2), t3)


def skellam_rdp(orders: np.ndarray, l2: float, l1: float, mu: float) -> np.ndarray:
    """RDP of the multidimensional Skellam mechanism (no subsampling), integer orders alpha > 1.

    Agarwal, Kairouz and Liu (NeurIPS 2021), Theorem 3.5 / Corollary 3.6, with the
    noise Sk(mu/2, mu/2) per coordinate (variance mu) and integer sensitivities
    Delta_2 = l2, Delta_1 = l1:

        eps(alpha) <= alpha Delta_2^2 / (2 mu)
                      + min{ ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu) }.
    """
    a = np.asarray(orders, dtype=np.float64)
    first = a * l2**2 / (2.0 * mu)
    second = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * mu**2), 3.0 * l1 / (2.0 * mu))
    return first + second


def _log_factorials(n: int) -> np.ndarray:
    out = np.zeros(n + 1)
    out[1:] = np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))
    return out


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(x - m).sum()))


def poisson_subsampled_rdp(orders: np.ndarray, q: float, base: np.ndarray) -> np.ndarray:
    """RDP at integer `orders` of a mechanism run on a Poisson sample (rate q) of the data.

    `base[l]` is the mechanism's RDP at order l for l = 0..max(orders) (entries 0
    and 1 unused). Zhu and Wang (ICML 2019), "Poisson Subsampled Renyi Differential
    Privacy", Theorem 5 (general upper bound, add-or-remove-one neighbours):

        eps'(alpha) <= 1/(alpha-1) log{ (1-q)^(alpha-1) (alpha q - q + 1)
                        + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                        + 3 sum_{l=3}^{alpha} C(alpha,l) (1-q)^(alpha-l) q^l e^{(l-1) eps(l)} },

    and never more than eps(alpha) itself (sampling cannot hurt).
    """
    orders = np.asarray(orders, dtype=np.int64)
    if q >= 1.0:
        return base[orders].astype(np.float64)
    if q <= 0.0:
        return np.zeros(orders.size)
    logq, log1q = math.log(q), math.log1p(-q)
    lf = _log_factorials(int(orders.max()))
    out = np.empty(orders.size)
    for i, a in enumerate(orders.tolist()):
        a = int(a)
        terms = [(a - 1) * log1q + math.log(a * q - q + 1.0)]
        terms.append(lf[a] - lf[2] - lf[a - 2] + 2 * logq + (a - 2) * log1q + base[2])
        if a >= 3:
            ls = np.arange(3, a + 1)
            terms_l = (
                math.log(3.0) + lf[a] - lf[ls] - lf[a - ls] + (a - ls) * log1q + ls * logq
                + (ls - 1) * base[3 : a + 1]
            )
            terms.extend(terms_l.tolist())
        out[i] = min(_logsumexp(np.array(terms)) / (a - 1), float(base[a]))
    return out


def _binomial_terms(alpha: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """log|C(alpha, i)| and the sign of C(alpha, i) for i = 0..count-1 (generalized binomial coefficients)."""
    from scipy.special import gammaln  # type: ignore[import-untyped]

    i = np.arange(count, dtype=np.float64)
    log_abs = gammaln(alpha + 1.0) - gammaln(i + 1.0) - gammaln(alpha - i + 1.0)
    negative = np.maximum(0.0, i - math.floor(alpha) - 1.0)  # factors alpha - k < 0 among k = 0..i-1
    sign = np.where(negative % 2 == 1, -1.0, 1.0)
    return log_abs, sign


def sampled_gaussian_log_a(q: float, sigma: float, alpha: float, *, rtol: float = 1e-12) -> float:
    """An upper bound on log A_alpha of the Poisson-sampled Gaussian mechanism at a fractional order alpha > 1.

    A_alpha = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha], so the
    mechanism's RDP is log(A_alpha) / (alpha - 1) (Mironov, Talwar and Zhang 2019, section 3.3,
    add-or-remove-one neighbours, the quantity Opacus and TF Privacy compute). Split at z0 =
    sigma^2 log(1/q - 1) + 1/2 and expanded binomially on each side, A_alpha is the sum of two
    series whose terms alternate in sign and shrink in magnitude from i = floor(alpha) + 1 on,
    pointwise in z (the expansion variable is in [0, 1]): a partial sum that stops before a
    negative term, or includes a positive one, is an upper bound (Leibniz), and the integrated
    terms keep that order. The series is summed until its last term is below `rtol` of the
    total; float rounding is covered by adding `rtol` times the sum of the magnitudes.
    ``proofs/dp.md`` section 5.
    """
    from scipy.special import log_ndtr

    if not (0.0 < q < 1.0) or sigma <= 0 or alpha <= 1.0:
        raise ValueError(f"need 0 < q < 1, sigma > 0, alpha > 1; got q={q!r}, sigma={sigma!r}, alpha={alpha!r}")
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    logq, log1q = math.log(q), math.log1p(-q)
    count = 1024
    while True:
        log_abs, sign = _binomial_terms(alpha, count)
        i = np.arange(count, dtype=np.float64)
        j = alpha - i
        s2 = 2.0 * sigma**2
        log0 = log_abs + i * logq + j * log1q + (i * i - i) / s2 + log_ndtr((z0 - i) / sigma)
        log1 = log_abs + j * logq + i * log1q + (j * j - j) / s2 + log_ndtr((j - z0) / sigma)
        top = float(max(log0.max(), log1.max()))
        t0, t1 = sign * np.exp(log0 - top), sign * np.exp(log1 - top)
        last = count - 1
        partial = math.fsum(t0[:last]) + math.fsum(t1[:last])
        # The tail from `last` on has the sign of term `last` and at most its magnitude.
        upper = partial + max(float(t0[last]), 0.0) + max(float(t1[last]), 0.0)
        magnitude = float(np.abs(t0).sum() + np.abs(t1).sum())
        small = max(abs(float(t0[last])), abs(float(t1[last]))) <= rtol * upper
        if small or count >= 1 << 18:  # the bound holds either way; a longer sum only tightens it
            return top + math.log(upper + rtol * magnitude)
        count *= 4
