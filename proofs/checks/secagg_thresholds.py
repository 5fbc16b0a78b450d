"""Lemmas 3, 4 and 6 of proofs/secagg.md: the threshold inequalities, with z3 and exhaustively.

- For every n <= 10^4 and a grid of threat models, the complete-graph threshold that
  securefed picks satisfies the rules (exact integer arithmetic, independent of the
  code's own formulas) and is the smallest that does.
- z3, for all integers: a client's secrets have k + 1 holders (its k neighbours and
  itself: it reveals its own b-share when listed as a survivor). With 2t > k + 1 + c,
  no split of the honest holders gives the server t shares of both secrets of one
  client (Lemma 4), and the bound is tight; the old rule 2t > k + c, which counted k
  holders, admits a split. fcp's active rule t > ceil((n + gamma n) / 2) implies
  2t > n + ceil(gamma n) (Lemma 4 for the complete graph, whose k + 1 = n); t > C keeps
  a coalition of C clients below t shares (Lemma 3); t <= n - D survives D dropouts
  (Lemma 6).
- The modulus never wraps: n inputs of |q| <= 2^(b-1) - 1 sum to magnitude below
  2^(k-1), k = b + ceil(log2 n), for every n <= 10^4 and b <= 53 with k <= 64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import z3

from securefed.errors import ConfigurationError
from securefed.protocols.secagg.params import ThreatModel, complete_graph_parameters

GRID = [(g, d, a) for g in (0.05, 0.1, 1 / 3) for d in (0.1, 0.25) for a in ("semi-honest", "active")]


def _allowed(n: int, g: Fraction, d: Fraction, adversary: str) -> int | None:
    """The smallest threshold the rules allow, in integer arithmetic (None if none is)."""
    gp, gq, dp, dq = g.numerator, g.denominator, d.numerator, d.denominator
    corrupt = -(-gp * n // gq)  # ceil(gamma n)
    dropouts = -(-dp * n // dq)  # ceil(delta n)
    half = -(-(gq * n + gp * n) // (2 * gq))  # ceil((n + gamma n) / 2)
    lo = max(half + 1 if adversary == "active" else corrupt + 1, 2)
    return lo if lo <= n - dropouts else None


def check_complete_graph_thresholds_every_n(max_n: int = 10_000) -> int:
    checked = 0
    for gamma, delta, adversary in GRID:
        threat = ThreatModel(adversary, gamma, delta)
        g, d = Fraction(str(gamma)), Fraction(str(delta))
        for n in range(1, max_n + 1):
            want = _allowed(n, g, d, adversary)
            try:
                got = complete_graph_parameters(n, threat).threshold
            except ConfigurationError:
                got = None
            assert got == want, (n, gamma, delta, adversary, got, want)
            checked += 1
    return checked


def _prove(claim) -> None:
    solver = z3.Solver()
    solver.add(z3.Not(claim))
    assert solver.check() == z3.unsat, solver.model()


def _split(k, c, a, b, owner):
    """a honest holders reveal b_v-shares, b honest holders s_v-shares (disjoint, Lemma 4(a)); `owner`
    (0 or 1): the victim's own b-share, revealed when it is listed as a survivor; c corrupt holders."""
    holders = z3.And(a >= 0, b >= 0, c >= 0, k >= 0, z3.Or(owner == 0, owner == 1),
                     a + b + c <= k)  # the k other holders: a + b honest ones, c corrupt
    return holders


def check_no_split_yields_both_secrets() -> None:
    k, c, t, a, b, o = z3.Ints("k c t a b o")
    both = z3.And(a + o + c >= t, b + c >= t)  # t shares of b_v (owner included) and of s_v
    _prove(z3.Implies(z3.And(_split(k, c, a, b, o), 2 * t > k + 1 + c), z3.Not(both)))
    # tight: with 2t <= k + 1 + c some split yields both
    solver = z3.Solver()
    solver.add(_split(k, c, a, b, o), 2 * t <= k + 1 + c, t >= 1, both)
    assert solver.check() == z3.sat


def check_the_old_rule_admits_a_split() -> None:
    """The rule 2t > k + c (k holders, the owner forgotten) lets a split through: issue 18's attack."""
    k, c, t, a, b, o = z3.Ints("k c t a b o")
    solver = z3.Solver()
    solver.add(_split(k, c, a, b, o), 2 * t > k + c, t >= 2, a + o + c >= t, b + c >= t)
    assert solver.check() == z3.sat
    m = solver.model()
    assert 2 * m[t].as_long() == m[k].as_long() + 1 + m[c].as_long()  # exactly the boundary case


def check_quorum_lists_share_an_honest_signer() -> None:
    """Lemma 7 (1): two survivor lists signed by q = floor((n + C)/2) + 1 clients each share more than C
    signers, so at least one honest client signed both; and the quorum stays within reach of n - D
    survivors when gamma + 2 delta < 1 (here as C + 2D < n, the finder checks the exact counts)."""
    n, c, q, s1, s2, both = z3.Ints("n c q s1 s2 both")
    quorum = z3.And(n >= 1, c >= 0, c < n, 2 * q >= n + c + 1, 2 * q <= n + c + 2)  # q = floor((n+C)/2) + 1
    lists = z3.And(s1 >= q, s2 >= q, s1 <= n, s2 <= n, both >= s1 + s2 - n)  # inclusion-exclusion
    _prove(z3.Implies(z3.And(quorum, lists), both > c))
    d = z3.Int("d")
    _prove(z3.Implies(z3.And(quorum, d >= 0, c + 2 * d + 2 <= n), n - d >= q))


def check_active_rule_implies_the_split_lemma() -> None:
    n, t, c, h = z3.Ints("n t c h")
    g = z3.Real("g")  # gamma * n
    rule = z3.And(n >= 1, g >= 0, g < n, c >= g, c < g + 1, 2 * h >= n + g, 2 * h < n + g + 2, t > h)
    _prove(z3.Implies(rule, 2 * t > n + c))  # the complete graph: k + 1 = n holders


def check_semi_honest_rule_and_liveness() -> None:
    n, t, c, d, alive = z3.Ints("n t c d alive")
    _prove(z3.Implies(z3.And(t > c, c >= 0), c < t))  # C colluders hold C shares: fewer than t
    _prove(z3.Implies(z3.And(t <= n - d, d >= 0, alive >= n - d), alive >= t))


def check_modulus_never_wraps(max_n: int = 10_000) -> int:
    checked = 0
    for b in range(2, 54):
        for n in range(1, max_n + 1):
            k = b + (math.ceil(math.log2(n)) if n > 1 else 0)
            if k > 64:
                break
            assert n * (2 ** (b - 1) - 1) < 2 ** (k - 1), (n, b)
            checked += 1
    return checked


if __name__ == "__main__":
    print("complete-graph thresholds checked:", check_complete_graph_thresholds_every_n())
    check_no_split_yields_both_secrets()
    check_the_old_rule_admits_a_split()
    check_quorum_lists_share_an_honest_signer()
    check_active_rule_implies_the_split_lemma()
    check_semi_honest_rule_and_liveness()
    print("z3 lemmas proved; modulus cases:", check_modulus_never_wraps())
