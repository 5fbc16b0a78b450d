import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto.random import RandomSource, derive_key


def test_seeded_sources_are_reproducible_and_children_independent():
    a, b = RandomSource(42), RandomSource(42)
    assert a.token_bytes(32) == b.token_bytes(32)
    assert a.child("x").token_bytes(16) == b.child("x").token_bytes(16)
    assert a.child("x").token_bytes(16) != a.child("y").token_bytes(16)
    assert RandomSource(41).token_bytes(16) != RandomSource(42).token_bytes(16)


def test_unseeded_sources_differ():
    assert RandomSource().token_bytes(32) != RandomSource().token_bytes(32)
    assert not RandomSource().seeded and RandomSource(b"s").seeded


def test_stream_continues_across_calls():
    a, b = RandomSource(1), RandomSource(1)
    assert a.token_bytes(10) + a.token_bytes(22) == b.token_bytes(32)


def test_fill_bytes_look_uniform():
    # chi-square over 256 byte values, 2^20 bytes; df=255, 99.99% quantile ~ 347.
    buf = RandomSource(3).fill(np.empty(1 << 20, dtype=np.uint8))
    counts = np.bincount(buf, minlength=256)
    expected = buf.size / 256
    assert ((counts - expected) ** 2 / expected).sum() < 347


@given(bound=st.integers(1, 2**63), size=st.integers(0, 300))
def test_integers_below_stay_below(bound, size):
    v = RandomSource(bound).integers_below(bound, size)
    assert v.size == size and (v < np.uint64(bound)).all()


def test_integers_below_are_uniform_for_a_non_power_of_two():
    v = RandomSource(9).integers_below(6, 60_000)
    counts = np.bincount(v.astype(np.int64), minlength=6)
    assert ((counts - 10_000) ** 2 / 10_000).sum() < 25  # df=5, far beyond the 99.99% quantile (~25.7)


def test_bad_arguments():
    with pytest.raises(TypeError):
        RandomSource(-1)
    with pytest.raises(ValueError):
        RandomSource(0).integers_below(0, 3)
    assert len(derive_key(b"k", "label", 16)) == 16


def _draw_in_child(rng: RandomSource, how: str) -> bytes:
    """Fork; the child draws 32 bytes from `rng` (directly or through a child source) and sends them back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            src = rng.child("after-fork") if how == "child" else rng
            os.write(w, src.token_bytes(32) if how != "fill" else src.fill(np.empty(4, np.uint64)).tobytes())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert len(out) == 32
    return out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("how", ["token", "child", "fill"])
def test_forked_processes_draw_different_keys(how):
    parent = RandomSource()
    parent.token_bytes(7)  # a stream already in use when the process forks
    a, b = _draw_in_child(parent, how), _draw_in_child(parent, how)
    mine = parent.child("after-fork").token_bytes(32) if how == "child" else parent.token_bytes(32)
    assert len({a, b, mine}) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_seeded_source_stays_reproducible_across_fork():
    assert _draw_in_child(RandomSource(5), "token") == RandomSource(5).token_bytes(32)
