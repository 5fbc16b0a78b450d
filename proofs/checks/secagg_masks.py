"""Lemma 1 (mask cancellation) of proofs/secagg.md, checked with z3 on bit-vectors.

For every graph on n <= 5 clients that SecAgg / SecAgg+ can use (complete, and the
Harary graphs H(n, k) for even k < n - 1) and every dropout pattern U3 <= U2 <= [n]
(U2: shared keys; U3: masked input arrived), the server's unmasked sum

    sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - sum_{v in U2 minus U3} sum_{u in U3, u~v} +-PRG(s_uv)

equals sum_{u in U3} x_u for ALL values of the inputs and masks, modulo 2^w with
w = 32 and w = 64 (the implementation's word sizes; reducing modulo any 2^k, k <= w,
afterwards preserves the equality). A mutated server (sign rule flipped for one
dropped peer) is refuted, so the check can fail.
"""

from __future__ import annotations

import itertools

import z3


def _graphs(n: int) -> list[tuple[str, set[frozenset[int]]]]:
    out = [("complete", {frozenset(e) for e in itertools.combinations(range(n), 2)})]
    for k in range(2, n - 1, 2):  # ring order 0..n-1: every ring order is a relabelling of this one
        edges = {frozenset((u, (u + j) % n)) for u in range(n) for j in range(1, k // 2 + 1)}
        out.append((f"harary-{k}", edges))
    return out


def _unmasked_sum(n, edges, u2, u3, w, *, flip=None):
    x = [z3.BitVec(f"x{u}", w) for u in range(n)]
    m = [z3.BitVec(f"m{u}", w) for u in range(n)]
    s = {e: z3.BitVec("s" + "_".join(map(str, sorted(e))), w) for e in edges}
    zero = z3.BitVecVal(0, w)

    def y(u):  # the client's masked input: its peers are the neighbours whose shares it received (U2)
        acc = x[u] + m[u]
        for v in u2:
            e = frozenset((u, v))
            if v != u and e in edges:
                acc = acc + s[e] if v > u else acc - s[e]
        return acc

    total = zero
    for u in u3:
        total = total + y(u) - m[u]
    for v in set(u2) - set(u3):  # dropped after sharing: remove the masks it left in survivors' inputs
        for u in u3:
            e = frozenset((u, v))
            if e in edges:
                plus = v > u if (u, v) != flip else v < u
                total = total - s[e] if plus else total + s[e]
    expected = zero
    for u in u3:
        expected = expected + x[u]
    return total, expected


def _proved(claim) -> bool:
    solver = z3.Solver()
    solver.add(z3.Not(claim))
    return solver.check() == z3.unsat


def check_mask_cancellation_every_dropout_set(max_n: int = 5, widths=(32, 64)) -> int:
    """Prove the identity for every graph and dropout pattern; returns how many cases were proved."""
    proved = 0
    for n in range(2, max_n + 1):
        for _, edges in _graphs(n):
            for w in widths:
                for pattern in itertools.product((0, 1, 2), repeat=n):  # 0: dropped before sharing, 1: after
                    u2 = [u for u in range(n) if pattern[u] >= 1]
                    u3 = [u for u in range(n) if pattern[u] == 2]
                    total, expected = _unmasked_sum(n, edges, u2, u3, w)
                    assert _proved(total == expected), (n, sorted(edges), u2, u3, w)
                    proved += 1
    return proved


def check_a_wrong_sign_rule_is_refuted() -> None:
    """The check is not vacuous: flipping the sign for one dropped neighbour gives a counterexample."""
    n = 4
    edges = {frozenset(e) for e in itertools.combinations(range(n), 2)}
    total, expected = _unmasked_sum(n, edges, [0, 1, 2, 3], [0, 1, 2], 32, flip=(1, 3))
    assert not _proved(total == expected)


if __name__ == "__main__":
    print(f"mask cancellation proved in {check_mask_cancellation_every_dropout_set()} cases")
    check_a_wrong_sign_rule_is_refuted()
    print("mutated sign rule refuted")
