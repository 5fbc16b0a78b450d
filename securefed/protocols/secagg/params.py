"""Threat models of SecAgg / SecAgg+ and the graph degree and Shamir threshold they allow.

One finder derives parameters from the threat model (fcp/secagg style); the same
rules check parameters a user overrides and parameters recorded in an audit trail.
Notation: n clients, gamma = ``corrupt_fraction``, delta = ``dropout_fraction``,
C = ceil(gamma n) corrupt clients, D = ceil(delta n) dropouts (both rounded up, so
the rules err on the safe side; fractions are read exactly from their decimal
form, so 0.1 * 30 is 3, not 3.0000000000000004).

Complete graph (SecAgg, Bonawitz et al. 2017; the rules of fcp/secagg):

- semi-honest: t > C; active: t > ceil((n + gamma n) / 2);
- liveness: t <= n - D (the round survives D dropouts);
- t >= 2 (a 1-of-n share is the secret itself) and t <= n.

Random Harary graph of even degree k (SecAgg+, Bell et al. 2020; search as in
fcp/secagg's graph parameter finder: smallest even k, statistical security 2^-40
split over two events, failure probability below 2^-20):

- the graph of honest survivors stays connected except with probability < 2^-41
  (union bound over pairs of gaps of k/2 consecutive bad clients on the ring);
- X ~ Hypergeometric(n - 1, C, k), the corrupt neighbours of a client; t1 is the
  smallest x with P(X > x) <= 2^-41 / n. Semi-honest: t > t1; active: 2t > k + 1 + t1
  (a client's secrets have k + 1 holders, its own share included: it reveals its own
  b-share when listed as a survivor; then no split of the honest holders gives the
  server t shares of both secrets of one client);
- Y ~ Hypergeometric(n - 1, n - D - 1, k), the surviving neighbours; t2 is the
  largest y with P(Y < y) <= 2^-20 / n; t <= t2;
- feasible only if gamma + delta <= 0.9 (semi-honest) or gamma + 2 delta <= 0.9 (active);
- active: n - D >= floor((n + C)/2) + 1, the quorum of signatures on the survivor list that
  every unmasking client checks (``SecAggPlus.quorum``).

If no even k < n - 1 works, SecAgg+ uses the complete graph and its rules.
See ``protocols/secagg.md`` (parameters) and ``proofs/secagg.md`` (Lemmas 4-6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Literal

import numpy as np

from securefed.errors import ConfigurationError

__all__ = [
    "ADVERSARIES",
    "GraphParameters",
    "ThreatModel",
    "complete_graph_parameters",
    "complete_threshold_range",
    "harary_parameters",
    "harary_threshold_range",
    "violations",
]

Adversary = Literal["semi-honest", "active"]
ADVERSARIES: tuple[str, ...] = ("semi-honest", "active")

#: log of the per-event statistical security bound (2^-40 split over two events).
_LOG_SECURITY = -41 * math.log(2)
#: log of the failure (abort) probability bound.
_LOG_CORRECTNESS = -20 * math.log(2)
#: Largest round the finder searches (as fcp/secagg).
MAX_CLIENTS = 1_000_000


def _exact(x: float | Fraction) -> Fraction:
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """Who may misbehave: the server (``adversary``), up to a fraction of clients, and dropouts.

    ``adversary="semi-honest"``: the server and corrupt clients follow the protocol
    but pool what they see. ``"active"``: the server may also send arbitrary messages
    (semi-malicious in fcp's terms). Fractions in [0, 1).
    """

    adversary: Adversary = "semi-honest"
    corrupt_fraction: float = 0.1
    dropout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.adversary, str) or self.adversary not in ADVERSARIES:  # str first: arrays
            raise ConfigurationError(f"adversary must be one of {ADVERSARIES}, got {self.adversary!r}")
        for name in ("corrupt_fraction", "dropout_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, Fraction)) or not 0 <= v < 1:
                raise ConfigurationError(f"{name} must be a number in [0, 1), got {v!r}")

    @property
    def active(self) -> bool:
        return self.adversary == "active"

    @functools.cached_property
    def gamma(self) -> Fraction:
        """The corrupt fraction, exactly."""
        return _exact(self.corrupt_fraction)

    @functools.cached_property
    def delta(self) -> Fraction:
        """The dropout fraction, exactly."""
        return _exact(self.dropout_fraction)

    def corrupt(self, n: int) -> int:
        """C = ceil(gamma n): corrupt clients assumed in a round of n."""
        return -(-self.gamma.numerator * n // self.gamma.denominator)

    def dropouts(self, n: int) -> int:
        """D = ceil(delta n): dropouts the round must survive."""
        return -(-self.delta.numerator * n // self.delta.denominator)

    def harary_feasible(self) -> bool:
        """gamma + delta <= 0.9 (semi-honest) or gamma + 2 delta <= 0.9 (active)."""
        return (self.gamma + 2 * self.delta if self.active else self.gamma + self.delta) <= Fraction(9, 10)


@dataclasses.dataclass(frozen=True)
class GraphParameters:
    """Masking graph and threshold for a round of n: ``degree == n - 1`` when ``complete``."""

    n: int
    degree: int
    threshold: int
    complete: bool
    justification: str


def complete_threshold_range(n: int, threat: ThreatModel) -> tuple[int, int]:
    """``(lo, hi)``: thresholds t with lo <= t <= hi satisfy the complete-graph rules (empty if lo > hi)."""
    _check_n(n)
    if threat.active:
        lo = _active_bound(n, threat) + 1
    else:
        lo = threat.corrupt(n) + 1
    return max(lo, 2), min(n, n - threat.dropouts(n))


def complete_graph_parameters(n: int, threat: ThreatModel, threshold: int | None = None) -> GraphParameters:
    """Complete-graph parameters: the smallest allowed threshold, or `threshold` checked.

    Raises ConfigurationError when no threshold, or not the given one, meets the rules.
    """
    lo, hi = complete_threshold_range(n, threat)
    t = lo if threshold is None else threshold
    problems = _complete_problems(n, t, threat)
    if problems:
        raise ConfigurationError(
            f"threshold for n={n} under {_describe(threat)}: " + "; ".join(problems)
            + (f" (allowed: {lo}..{hi})" if lo <= hi
               else " (no threshold is allowed: lower the fractions or add clients)")
        )
    return GraphParameters(n, n - 1, t, True, _complete_justification(n, t, threat))


def _active_bound(n: int, threat: ThreatModel) -> int:
    """ceil((n + gamma n) / 2), exactly."""
    g = threat.gamma
    return -(-(n * g.denominator + g.numerator * n) // (2 * g.denominator))


def _complete_problems(n: int, t: int, threat: ThreatModel) -> list[str]:
    out = []
    c, d = threat.corrupt(n), threat.dropouts(n)
    if t < 2:
        out.append(f"threshold {t} < 2 (a 1-of-n share is the secret itself)")
    if t > n:
        out.append(f"threshold {t} > n = {n}")
    if threat.active:
        need = _active_bound(n, threat)
        if t <= need:
            out.append(f"active adversary needs t > ceil((n + gamma n)/2) = {need}, got {t}")
    elif t <= c:
        out.append(f"semi-honest adversary needs t > C = ceil(gamma n) = {c} corrupt clients, got {t}")
    if t > n - d:
        out.append(f"liveness needs t <= n - D = {n - d} (D = ceil(delta n) = {d} dropouts), got {t}")
    return out


def _complete_justification(n: int, t: int, threat: ThreatModel) -> str:
    c, d = threat.corrupt(n), threat.dropouts(n)
    if threat.active:
        sec = f"t > ceil((n + gamma n)/2) = {_active_bound(n, threat)}"
    else:
        sec = f"t > C = {c} corrupt clients"
    return f"complete graph: {sec}; t <= n - D = {n - d} survives {d} dropouts"


# -- Harary graphs ----------------------------------------------------------------------


def _log_factorials(n: int) -> np.ndarray:
    return np.array([math.lgamma(i + 1) for i in range(n + 1)])


def _log_pmf(lf: np.ndarray, pop: int, good: int, draws: int) -> tuple[int, np.ndarray]:
    """(lowest value, log pmf over the support) of Hypergeometric(pop, good, draws)."""
    lo, hi = max(0, draws - (pop - good)), min(good, draws)
    x = np.arange(lo, hi + 1)
    log_c = lambda a, b: lf[a] - lf[b] - lf[a - b]  # noqa: E731
    return lo, log_c(good, x) + log_c(pop - good, draws - x) - log_c(pop, draws)


def _upper_quantile(lf: np.ndarray, pop: int, good: int, draws: int, log_eps: float) -> int:
    """Smallest x with P(X > x) <= eps."""
    lo, lp = _log_pmf(lf, pop, good, draws)
    tail = np.logaddexp.accumulate(lp[::-1])[::-1]  # tail[i] = log P(X >= lo + i)
    above = np.flatnonzero(tail[1:] > log_eps)  # P(X > lo + i) = tail[i + 1]
    return lo + (int(above[-1]) + 1 if above.size else 0)


def _lower_quantile(lf: np.ndarray, pop: int, good: int, draws: int, log_eps: float) -> int:
    """Largest y with P(Y < y) <= eps."""
    lo, lp = _log_pmf(lf, pop, good, draws)
    cdf = np.logaddexp.accumulate(lp)  # cdf[i] = log P(Y <= lo + i)
    over = np.flatnonzero(cdf > log_eps)
    return lo + (int(over[0]) if over.size else lp.size - 1)


def _log_disconnect(n: int, k: int, bad: int) -> float:
    """Union bound (log) on the honest survivors of a random H(n, k) being disconnected."""
    if k > bad:
        return -math.inf
    log_pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return log_pairs + math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1) - math.lgamma(bad - k + 1)


def harary_threshold_range(
    n: int, degree: int, threat: ThreatModel, _lf: np.ndarray | None = None
) -> tuple[int, int] | None:
    """``(lo, hi)``: thresholds allowed with a random Harary graph of `degree`; None if it may disconnect."""
    _check_n(n)
    k = degree
    c, d = threat.corrupt(n), threat.dropouts(n)
    if _log_disconnect(n, k, c + d) >= _LOG_SECURITY:
        return None
    lf = _log_factorials(n) if _lf is None else _lf
    t1 = _upper_quantile(lf, n - 1, min(c, n - 1), k, _LOG_SECURITY - math.log(n))
    t2 = _lower_quantile(lf, n - 1, max(n - d - 1, 0), k, _LOG_CORRECTNESS - math.log(n))
    # active: 2t > (k + 1) + t1, the k + 1 holders counting the client itself (proofs/secagg.md, Lemma 4)
    lo = (k + 1 + t1) // 2 + 1 if threat.active else t1 + 1
    return max(lo, 2), min(t2, k + 1)


def harary_parameters(
    n: int, threat: ThreatModel, *, degree: int | None = None, threshold: int | None = None
) -> GraphParameters:
    """SecAgg+ parameters: the smallest even degree (and then smallest threshold) that the threat model allows.

    A given `degree` or `threshold` is checked instead of searched. Falls back to the
    complete graph when no even degree below n - 1 works. Raises ConfigurationError
    when the threat model is infeasible or an override violates it.
    """
    _check_n(n)
    if not threat.harary_feasible():
        raise ConfigurationError(
            f"{_describe(threat)} is infeasible for SecAgg+: it needs corrupt + dropout <= 0.9 "
            "(semi-honest) or corrupt + 2 x dropout <= 0.9 (active)"
        )
    if degree is not None:
        if degree >= n - 1:
            return complete_graph_parameters(n, threat, threshold)
        problems = _harary_problems(n, degree, threshold, threat)
        if problems:
            raise ConfigurationError(f"SecAgg+ with n={n}, degree={degree}: " + "; ".join(problems))
        lo, _ = harary_threshold_range(n, degree, threat)  # type: ignore[misc]
        t = lo if threshold is None else threshold
        return GraphParameters(n, degree, t, False, _harary_justification(n, degree, t, threat))
    lf = _log_factorials(n)
    for k in range(2, n - 1, 2) if _quorum_live(n, threat) else ():
        rng = harary_threshold_range(n, k, threat, lf)
        if rng is None or rng[0] > rng[1]:
            continue
        if threshold is None:
            return GraphParameters(n, k, rng[0], False, _harary_justification(n, k, rng[0], threat))
        if rng[0] <= threshold <= rng[1]:
            return GraphParameters(n, k, threshold, False, _harary_justification(n, k, threshold, threat))
    return complete_graph_parameters(n, threat, threshold)


def _harary_problems(n: int, k: int, t: int | None, threat: ThreatModel) -> list[str]:
    if k < 2 or k % 2:
        return [f"degree must be even and >= 2 (a Harary ring has k/2 neighbours on each side), got {k}"]
    rng = harary_threshold_range(n, k, threat)
    if rng is None:
        return [(f"with {threat.corrupt(n) + threat.dropouts(n)} bad clients the survivors' graph may "
                 "disconnect with probability >= 2^-41: raise the degree")]
    lo, hi = rng
    out = []
    if not _quorum_live(n, threat):
        out.append(f"liveness: {n - threat.dropouts(n)} survivors cannot reach the signature quorum "
                   f"floor((n + C)/2) + 1 = {(n + threat.corrupt(n)) // 2 + 1} of the active variant: lower the "
                   "fractions or add clients")
    if t is None:
        return out + ([] if lo <= hi else [f"no threshold is allowed (needs {lo} <= t <= {hi}): raise the degree"])
    if t < lo:
        out.append(f"threshold {t} < {lo}: corrupt neighbours could reach it (security 2^-40)")
    if t > hi:
        out.append(f"threshold {t} > {hi}: too few neighbours survive w.p. > 2^-20 (liveness)")
    return out


def _quorum_live(n: int, threat: ThreatModel) -> bool:
    """Active: n - D survivors still reach the quorum floor((n + C)/2) + 1 of survivor-list signatures."""
    return not threat.active or n - threat.dropouts(n) >= (n + threat.corrupt(n)) // 2 + 1


def _harary_justification(n: int, k: int, t: int, threat: ThreatModel) -> str:
    c, d = threat.corrupt(n), threat.dropouts(n)
    rule = "2t > k + 1 + t1" if threat.active else "t > t1"
    return (
        f"random Harary graph of degree {k}: survivors' graph connected w.p. >= 1 - 2^-41 with {c} corrupt "
        f"+ {d} dropouts; {rule} for t1 corrupt neighbours (w.p. >= 1 - 2^-41/n); >= {t} neighbours "
        f"survive w.p. >= 1 - 2^-20/n"
    )


def violations(
    n: int, degree: int, threshold: int, threat: ThreatModel, *, complete: bool
) -> list[str]:
    """Every rule of the threat model that (n, degree, threshold) breaks; empty when sound."""
    try:
        _check_n(n)
    except ConfigurationError as e:
        return [str(e)]
    if complete:
        out = [] if degree == n - 1 else [f"complete graph needs degree n - 1 = {n - 1}, got {degree}"]
        return out + _complete_problems(n, threshold, threat)
    if not threat.harary_feasible():
        return [f"{_describe(threat)} is infeasible for SecAgg+"]
    if degree >= n - 1:
        return [f"a Harary degree must be below n - 1 = {n - 1}, got {degree}"]
    return _harary_problems(n, degree, threshold, threat)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_CLIENTS:
        raise ConfigurationError(f"a round has 1..{MAX_CLIENTS} clients, got {n!r}")


def _describe(threat: ThreatModel) -> str:
    return (f"{threat.adversary} adversary, corrupt_fraction={threat.corrupt_fraction}, "
            f"dropout_fraction={threat.dropout_fraction}")
