"""The numpy loops give the compiled loops' bits, and "auto" keeps numba out of a client's process.

A Flower ClientApp is a fresh process per message; loading numba there cost about 2.5 s of
CPU per node and message (bench/results.md), so the client's quantizing and packing run in
numpy until numba is loaded anyway (securefed.kernels). These tests hold the two to the same
output for all inputs, and check the mode switch itself.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed import kernels
from securefed.encoding import _kernels as compiled_loops
from securefed.encoding import _numpy_kernels as numpy_loops
from securefed.encoding import pack, packed_size, storage_dtype, unpack
from securefed.errors import ConfigurationError
from securefed.protocols.secagg import packed

from .test_packing import reference_pack


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch):
    """Pieces of 64 values, so that short vectors cross piece boundaries."""
    monkeypatch.setattr(numpy_loops, "PIECE", 64)


@pytest.fixture
def mode():
    """Sets the kernel mode for one test and restores the environment's afterwards."""
    yield kernels.set_mode
    kernels.set_mode(None)


def _words(values: np.ndarray, width: int) -> np.ndarray:
    return np.empty((values.size * width + 63) // 64, dtype="<u8")


@given(width=st.integers(1, 64), seed=st.integers(0, 2**32 - 1), count=st.integers(0, 400))
def test_pack_and_unpack_words_match_the_compiled_loops(width, seed, count):
    rng = np.random.default_rng(seed)
    top = np.uint64(2**width - 1) if width < 64 else np.uint64(2**64 - 1)
    v = (rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True) & top).astype(storage_dtype(width))
    ours, theirs = _words(v, width), _words(v, width)
    assert numpy_loops.pack_words(v, width, ours) == compiled_loops.pack_words(v, width, theirs) == -1
    np.testing.assert_array_equal(ours, theirs)
    assert ours.view(np.uint8)[: packed_size(count, width)].tobytes() == reference_pack(v, width)
    out = np.empty(count, dtype=storage_dtype(width))
    numpy_loops.unpack_words(theirs, width, count, out)
    np.testing.assert_array_equal(out, v)


@given(width=st.integers(1, 63), count=st.integers(1, 300), data=st.data())
def test_pack_words_reports_the_first_value_too_wide_as_the_compiled_loop_does(width, count, data):
    v = np.zeros(count, dtype=np.uint64)
    bad = data.draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=3))
    v[bad] = np.uint64(1) << np.uint64(width)
    assert numpy_loops.pack_words(v, width, _words(v, width)) == min(bad)
    assert compiled_loops.pack_words(v, width, _words(v, width)) == min(bad)


@given(k=st.integers(1, 64), seed=st.integers(0, 2**32 - 1), count=st.integers(0, 300),
       inv_scale=st.floats(1e-12, 1e3))
def test_decode_matches_the_compiled_loop_at_every_width(k, seed, count, inv_scale):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True).astype(storage_dtype(k))
    ours, theirs = np.empty(count), np.empty(count)
    numpy_loops.decode_into(s, k, inv_scale, ours)
    compiled_loops.decode_into(s, k, inv_scale, theirs)
    np.testing.assert_array_equal(ours, theirs)


@given(value_bits=st.integers(2, 53), extra=st.integers(0, 11), bound=st.floats(1e-3, 1e6),
       seed=st.integers(0, 2**32 - 1), count=st.integers(0, 300), dtype=st.sampled_from([np.float32, np.float64]),
       bad=st.lists(st.tuples(st.integers(0, 299), st.sampled_from([np.nan, np.inf, -np.inf, 2.0, -1.5])),
                    max_size=2))
def test_quantize_matches_the_compiled_loop(value_bits, extra, bound, seed, count, dtype, bad):
    rng = np.random.default_rng(seed)
    k = min(64, value_bits + extra)
    scale = (2 ** (value_bits - 1) - 1) / bound
    x = rng.uniform(-bound, bound, count).astype(dtype)
    x[rng.random(count) < 0.05] = dtype(bound)  # the edges are inside
    for i, v in bad:  # NaN, Inf, or a value outside [-bound, bound]
        if i < count:
            x[i] = v * bound if np.isfinite(v) else v
    u = rng.integers(0, 2**32, count, dtype=np.uint32)
    mask = np.uint64(2**k - 1)
    ours, theirs = np.empty(count, storage_dtype(k)), np.empty(count, storage_dtype(k))
    found = numpy_loops.quantize_into(x, scale, bound, u, mask, ours)
    assert found == compiled_loops.quantize_into(x, scale, bound, u, mask, theirs)
    assert found == numpy_loops.first_outside(x, bound) == compiled_loops.first_outside(x, bound)
    if found < 0:
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_rounds_down_where_the_uniform_equals_the_fraction_in_both_loops(dtype):
    """P(round up) = ceil(frac 2^32) / 2^32 needs '>' at a tie: dyadic inputs make every fraction exact."""
    scale = 2.0**15 - 1  # value_range 1, 16 bits
    x = (np.arange(-1024, 1025) / 1024).astype(dtype)
    v = x.astype(np.float64) * scale
    frac = (v - np.floor(v)) * 2.0**32  # an integer: at most 10 fractional bits
    assert np.all(frac == np.round(frac))
    u = frac.astype(np.uint32)  # the uniform equals the fraction: a tie everywhere
    mask = np.uint64(2**20 - 1)
    ours, theirs = np.empty(x.size, np.uint32), np.empty(x.size, np.uint32)
    assert numpy_loops.quantize_into(x, scale, 1.0, u, mask, ours) == -1
    assert compiled_loops.quantize_into(x, scale, 1.0, u, mask, theirs) == -1
    expected = (np.floor(v).astype(np.int64).view(np.uint64) & mask).astype(np.uint32)  # down at every tie
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(theirs, expected)


@given(width=st.integers(1, 64), size=st.sampled_from([1, 31, 32, 33, 1000, packed.BLOCK, packed.BLOCK + 4097]),
       seed=st.integers(0, 2**32 - 1), keys=st.integers(0, 3))
def test_masked_messages_are_the_same_bytes_in_either_mode(width, size, seed, keys):
    rng = np.random.default_rng(seed)
    dtype = storage_dtype(width)
    values = rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True).astype(dtype)
    mask_keys = [rng.bytes(16) for _ in range(keys)]
    out = []
    try:
        for m in ("numpy", "numba"):
            kernels.set_mode(m)
            out.append(packed.masked_message(packed.stored_source(values), size, width, dtype, mask_keys[:1],
                                             mask_keys[1:], b"prefix"))
    finally:
        kernels.set_mode(None)
    assert out[0] == out[1]
    # and the bytes are the layout's reference when nothing masks them
    if not keys:
        assert out[0] == b"prefix" + packed.column_pack(values & dtype.type(2**width - 1), width)


def test_pack_and_unpack_run_in_numpy_mode(mode):
    mode("numpy")
    v = np.arange(1000, dtype=np.uint32) % 2**19
    assert unpack(pack(v, 19), 19, v.size).tolist() == v.tolist()


def test_the_mode_is_checked(mode, monkeypatch):
    with pytest.raises(ConfigurationError, match="auto, numba, numpy"):
        kernels.set_mode("fast")
    monkeypatch.setenv("SECUREFED_KERNELS", "gpu")
    with pytest.raises(ConfigurationError, match="SECUREFED_KERNELS"):
        kernels.get_mode()
    monkeypatch.setenv("SECUREFED_KERNELS", "numpy")
    assert kernels.get_mode() == "numpy" and not kernels.compiled(10**12)
    mode("numba")
    assert kernels.get_mode() == "numba" and kernels.compiled(1)


def test_auto_compiles_once_numba_is_loaded_or_numpy_has_paid_for_it(mode, monkeypatch):
    mode("auto")
    kernels.load()
    assert kernels.compiled(1)
    monkeypatch.delitem(sys.modules, "numba")  # as in a fresh process
    monkeypatch.setattr(kernels, "_numpy_values", 0)
    assert not kernels.compiled(kernels.COMPILE_AFTER - 1)
    assert not kernels.compiled(1)  # the count reaches COMPILE_AFTER with this call ...
    assert kernels.compiled(1)  # ... and the next one runs compiled


def test_a_clients_masked_input_does_not_load_numba_in_a_fresh_process():
    """What a Flower ClientApp does with its update: check, quantize, mask and pack (SecAgg+)."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import securefed as sf
        from securefed.crypto.random import RandomSource
        from securefed.protocols.secagg import packed

        enc = sf.encoding.FixedPoint(value_range=1.0, value_bits=16)
        x = np.random.default_rng(0).uniform(-1, 1, 100_003).astype(np.float32)
        enc.check(x)
        k = enc.modulus_bits(20)
        source = packed.encoded_source(x, enc, 20, RandomSource().token_bytes(16))
        msg = packed.masked_message(source, x.size, k, np.dtype(np.uint32), [b"a" * 16], [b"b" * 16], b"")
        assert len(msg) == (x.size * k + 7) // 8
        print("numba" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SECUREFED_KERNELS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
