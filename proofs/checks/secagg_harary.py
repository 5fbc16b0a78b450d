"""Lemma 5 of proofs/secagg.md: the Harary-graph conditions, exhaustively and in exact arithmetic.

- Removing a set R of clients disconnects H(n, k) (k even) only if R contains two
  disjoint runs of k/2 clients consecutive on the ring. So the honest survivors stay
  connected unless the bad clients fill two such gaps, which the parameter finder
  bounds by n (n - k - 1) / 2 pairs times P(k given clients are all bad).
- The degree and threshold the finder picks (floating point, log space) meet the
  conditions when recomputed with exact rational hypergeometric tails, and no
  smaller even degree does, for rounds up to 10^4 clients.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

from securefed.errors import ConfigurationError
from securefed.protocols.secagg.params import ThreatModel, harary_parameters


def _connected(n: int, k: int, alive: set[int]) -> bool:
    if not alive:
        return True
    start = next(iter(alive))
    seen, todo = {start}, [start]
    while todo:
        u = todo.pop()
        for j in range(1, k // 2 + 1):
            for v in ((u + j) % n, (u - j) % n):
                if v in alive and v not in seen:
                    seen.add(v)
                    todo.append(v)
    return seen == alive


def _two_disjoint_gaps(n: int, h: int, removed: set[int]) -> bool:
    runs = [frozenset((s + i) % n for i in range(h)) for s in range(n)]
    full = [r for r in runs if r <= removed]
    return any(not (a & b) for a, b in itertools.combinations(full, 2))


def check_disconnection_needs_two_gaps(max_n: int = 11) -> int:
    checked = 0
    for n in range(4, max_n + 1):
        for k in range(2, n - 1, 2):
            for size in range(n - 1):
                for removed in itertools.combinations(range(n), size):
                    r = set(removed)
                    if not _connected(n, k, set(range(n)) - r):
                        assert _two_disjoint_gaps(n, k // 2, r), (n, k, removed)
                    checked += 1
    return checked


def _weights(pop: int, good: int, draws: int) -> list[int]:
    """w[i] = C(good, i) C(pop - good, draws - i): P(X = i) = w[i] / C(pop, draws), exactly."""
    return [math.comb(good, i) * math.comb(pop - good, draws - i) for i in range(draws + 1)]


def exact_harary_range(n: int, k: int, threat: ThreatModel) -> tuple[int, int] | None:
    """Thresholds (lo, hi) that degree k allows, from the conditions in exact arithmetic; None if it may disconnect."""
    c, d = threat.corrupt(n), threat.dropouts(n)
    if threat.active and n - d < (n + c) // 2 + 1:
        return None  # the survivors cannot reach the signature quorum of the active variant, whatever k is
    bad = c + d
    if k <= bad and Fraction(n * (n - k - 1), 2) * Fraction(math.comb(bad, k), math.comb(n, k)) >= Fraction(1, 2**41):
        return None
    total = math.comb(n - 1, k)
    # t1: smallest x with P(X > x) <= 2^-41 / n, i.e. 2^41 n * sum_{i > x} w[i] <= C(n-1, k)
    w, above, t1 = _weights(n - 1, c, k), 0, k
    for x in range(k, -1, -1):
        if 2**41 * n * above > total:
            break
        t1 = x
        above += w[x]
    # t2: largest y with P(Y < y) <= 2^-20 / n
    w, below, t2 = _weights(n - 1, max(n - d - 1, 0), k), 0, 0
    for y in range(k + 2):
        if 2**20 * n * below > total:
            break
        t2 = y
        below += w[y] if y <= k else 0
    lo = (k + 1 + t1) // 2 + 1 if threat.active else t1 + 1  # 2t > (k + 1) + t1: k + 1 holders
    return max(lo, 2), min(t2, k + 1)


def _works(r: tuple[int, int] | None) -> bool:
    return r is not None and r[0] <= r[1]


SIZES = sorted({*range(4, 64), *(round(10 ** (e / 8)) for e in range(15, 33))})
THREATS = [ThreatModel(a, g, d) for a in ("semi-honest", "active") for g, d in ((0.1, 0.1), (0.05, 0.05))]


def check_finder_meets_the_conditions_exactly(sizes=SIZES, threats=THREATS) -> int:
    checked = 0
    for threat in threats:
        for n in sizes:
            try:
                p = harary_parameters(n, threat)
            except ConfigurationError:
                assert not any(_works(exact_harary_range(n, k, threat)) for k in range(2, n - 1, 2)), (n, threat)
                continue
            if not p.complete:
                assert exact_harary_range(n, p.degree, threat) is not None
                lo, hi = exact_harary_range(n, p.degree, threat)  # type: ignore[misc]
                assert lo == p.threshold <= hi, (n, threat, p, lo, hi)
            smaller = range(2, p.degree if not p.complete else n - 1, 2)
            assert not any(_works(exact_harary_range(n, k, threat)) for k in smaller), (n, threat, p)
            checked += 1
    return checked


if __name__ == "__main__":
    print("removal sets checked:", check_disconnection_needs_two_gaps())
    print("finder choices checked exactly:", check_finder_meets_the_conditions_exactly())
