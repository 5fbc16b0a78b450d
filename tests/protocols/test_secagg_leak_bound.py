"""Issue 18's acceptance bound, computed independently of the parameter finder.

For every n in [5, 1000] and both adversaries, the defaults of SecAgg and SecAggPlus keep the
probability that the server plus C = ceil(0.1 n) corrupt clients can reconstruct both secrets of
an honest client (and so strip its masks) at or below 2^-40, by the hypergeometric union bound
over victims. A victim v's shares have k + 1 holders: its k neighbours and itself. With X corrupt
neighbours, a semi-honest coalition needs X >= t (shares of s_v); an active server that shows two
groups of honest holders two survivor lists gets t shares of b_v (one group, v itself and the
corrupt) and t of s_v (the other group and the corrupt) iff X >= t or 2t <= k + 1 + X
(proofs/secagg.md, Lemma 4). Only (k, t) come from the library; everything else is exact integer
arithmetic here.
"""

import math

import pytest

from securefed.protocols import SecAgg, SecAggPlus

NS = range(5, 1001)


def _needed_corrupt(n: int, k: int, t: int, active: bool) -> int:
    """Fewest corrupt holders among the victim's k neighbours that let the coalition unmask it."""
    return min(t, 2 * t - k - 1) if active else t


def _leaks_above(n: int, k: int, t: int, active: bool, log2_bound: int = -40) -> bool:
    """Whether n * P(Hypergeometric(n - 1, C, k) >= need) > 2^log2_bound, exactly."""
    c = math.ceil(n / 10)  # C = ceil(0.1 n), the default corrupt fraction
    need = max(_needed_corrupt(n, k, t, active), 0)
    tail = sum(math.comb(c, x) * math.comb(n - 1 - c, k - x) for x in range(need, min(c, k) + 1))
    return n * tail * 2 ** (-log2_bound) > math.comb(n - 1, k)


@pytest.mark.parametrize("protocol", [SecAgg, SecAggPlus])
@pytest.mark.parametrize("adversary", ["semi-honest", "active"])
def test_defaults_keep_every_input_hidden_at_2_to_the_minus_40(protocol, adversary):
    proto = protocol(adversary=adversary)
    bad = []
    for n in NS:
        p = proto.parameters(n)
        if _leaks_above(n, p.degree, p.threshold, adversary == "active"):
            bad.append((n, p.degree, p.threshold))
    assert not bad, f"{protocol.__name__} {adversary}: (n, k, t) leaking w.p. > 2^-40: {bad[:10]}"


def test_the_bound_can_fail_one_below_the_threshold():
    """The computation is not vacuous: one threshold lower, active SecAgg+ leaks for some n."""
    proto = SecAggPlus(adversary="active")
    low = [n for n in NS if not (p := proto.parameters(n)).complete
           and _leaks_above(n, p.degree, p.threshold - 1, True)]
    assert len(low) > 100


def test_the_old_rule_leaks_at_the_sizes_of_the_report():
    """The rule 2t > k + t1 (k holders counted): at the report's n = 10 and 24 its threshold leaks."""
    proto = SecAggPlus(adversary="active")
    for n in (10, 24):
        p = proto.parameters(n)
        c = math.ceil(n / 10)
        # the old finder's threshold at this degree: t1 = the corrupt neighbours it allowed for
        t1 = next(x for x in range(p.degree + 1) if not _leaks_above(n, p.degree, x + 1, False, -41))
        old_t = max((p.degree + t1) // 2 + 1, 2)
        assert old_t < p.threshold and 2 * old_t <= p.degree + 1 + min(c, p.degree)
        assert _leaks_above(n, p.degree, old_t, True)
