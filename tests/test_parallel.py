"""securefed.parallel: settings, slab splitting, and running slabs on threads."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed import parallel


@given(st.integers(0, 10**6), st.integers(1, 5), st.integers(1, 64), st.sampled_from([None, 64, 1 << 15]))
def test_slabs_cover_the_range_in_order_on_aligned_boundaries(size, threads, work, align):
    with parallel.options(threads=threads):
        slabs = parallel.slabs(size, work) if align is None else parallel.slabs(size, work, align=align)
    assert len(slabs) <= threads
    assert [b for s in slabs for b in s] == sorted(b for s in slabs for b in s)
    covered = [i for lo, hi in slabs for i in (lo, hi)]
    if size:
        assert covered[0] == 0 and covered[-1] == size
        assert all(hi > lo for lo, hi in slabs)
        assert all(slabs[i][1] == slabs[i + 1][0] for i in range(len(slabs) - 1))
        assert all(lo % (align or parallel.ALIGN) == 0 for lo, _ in slabs)
    else:
        assert slabs == []


def test_small_work_stays_on_one_thread_and_large_work_is_split():
    with parallel.options(threads=2):
        assert len(parallel.slabs(1000)) == 1
        assert len(parallel.slabs(parallel.MIN_SLAB_WORK)) == 1
        assert len(parallel.slabs(2 * parallel.MIN_SLAB_WORK)) == 2
        assert len(parallel.slabs(parallel.MIN_SLAB_WORK, work_per_element=4)) == 2
    with parallel.options(threads=1):
        assert len(parallel.slabs(10 * parallel.MIN_SLAB_WORK)) == 1


def test_run_slabs_uses_other_threads_sees_the_callers_options_and_raises_the_lowest_slabs_error():
    seen = {}

    def work(lo, hi):
        seen[lo] = (threading.get_ident(), parallel.get_chunk_size())
        return hi - lo

    with parallel.options(threads=3, chunk_size=128):
        assert parallel.run_slabs(work, [(0, 5), (5, 9), (9, 10)]) == [5, 4, 1]
    assert seen[0][0] == threading.get_ident()
    assert {c for _, c in seen.values()} == {128}
    assert len({t for t, _ in seen.values()}) > 1

    def fails(lo, hi):
        if lo >= 5:
            raise ValueError(f"slab {lo}")
        return lo

    with pytest.raises(ValueError, match="slab 5"):
        parallel.run_slabs(fails, [(0, 5), (5, 9), (9, 10)])


def test_options_are_scoped_and_checked():
    before = (parallel.get_threads(), parallel.get_chunk_size())
    with parallel.options(threads=7, chunk_size=64):
        assert (parallel.get_threads(), parallel.get_chunk_size()) == (7, 64)
        with parallel.options(threads=1):
            assert (parallel.get_threads(), parallel.get_chunk_size()) == (1, 64)
    assert (parallel.get_threads(), parallel.get_chunk_size()) == before
    for bad in ({"threads": 0}, {"threads": 1.5}, {"threads": True}, {"chunk_size": 100}, {"chunk_size": 0}):
        with pytest.raises(ValueError), parallel.options(**bad):
            pass
        with pytest.raises(ValueError):
            parallel.configure(**bad)


def test_a_slab_that_splits_its_own_work_runs_it_inline():
    def inner(lo, hi):
        return threading.current_thread().name

    def outer(lo, hi):
        return parallel.run_slabs(inner, [(lo, lo + 1), (lo + 1, hi)])

    with parallel.options(threads=2):
        names = parallel.run_slabs(outer, [(0, 2), (2, 4)])
    assert len({n for pair in names for n in pair}) == 2  # the caller, and one pool thread running both of its
    assert names[1][0] == names[1][1]
