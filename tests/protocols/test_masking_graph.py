import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.errors import ConfigurationError
from securefed.protocols.secagg.graph import MaskingGraph


@given(st.integers(4, 80).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, (n - 2) // 2).map(lambda h: 2 * h))),
       st.binary(min_size=32, max_size=32))
def test_random_harary_graph_is_symmetric_k_regular_and_derived_from_the_seed(n_k, seed):
    n, k = n_k
    g = MaskingGraph.harary(n, k, seed)
    nbrs = [g.neighbors(u) for u in range(n)]
    assert not g.complete and all(a.size == k and u not in a for u, a in enumerate(nbrs))
    assert all((np.diff(a) > 0).all() for a in nbrs)
    for u in range(n):
        for v in range(n):
            assert g.are_neighbors(u, v) == (v in nbrs[u]) == (u in nbrs[v])
    assert MaskingGraph.harary(n, k, seed).neighbors(0).tolist() == nbrs[0].tolist()
    closed = g.closed_neighborhood(3 % n)
    assert closed.size == k + 1 and (3 % n) in closed


def test_every_ring_order_is_equally_likely():
    """H(5, 2) is a 5-cycle; the 12 distinct cycles on 5 labelled clients appear uniformly."""
    from scipy.stats import chi2

    counts = Counter()
    for i in range(2400):
        g = MaskingGraph.harary(5, 2, i.to_bytes(32, "big"))
        counts[frozenset((u, v) for u in range(5) for v in g.neighbors(u).tolist() if u < v)] += 1
    assert len(counts) == 12
    stat = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert stat < chi2.isf(1e-4, 11)
    assert MaskingGraph.harary(40, 6, bytes(32)).neighbors(0).tolist() != MaskingGraph.harary(
        40, 6, b"\x01" * 32).neighbors(0).tolist()


def test_complete_graph_and_degenerate_degrees():
    g = MaskingGraph.complete_graph(4)
    assert g.complete and g.degree == 3 and g.neighbors(2).tolist() == [0, 1, 3]
    assert MaskingGraph.harary(5, 4, bytes(32)).complete
    for bad in (3, -2):
        with pytest.raises(ConfigurationError):
            MaskingGraph.harary(10, bad, bytes(32))
    with pytest.raises(ValueError):
        g.neighbors(4)


@pytest.mark.parametrize("n,k", [(n, k) for n in range(4, 12) for k in range(2, n - 1, 2)])
def test_harary_graphs_stay_connected_after_removing_fewer_than_k_clients_exhaustive(n, k):
    g = MaskingGraph.harary(n, k, bytes(32))
    for removed in itertools.combinations(range(n), k - 1):
        rest = set(range(n)) - set(removed)
        start = next(iter(rest))
        seen, todo = {start}, [start]
        while todo:
            for v in g.neighbors(todo.pop()).tolist():
                if v in rest and v not in seen:
                    seen.add(v)
                    todo.append(v)
        assert seen == rest
