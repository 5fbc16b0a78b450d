"""Streaming (protocols/secagg.md, "Streaming and threads"; protocols/base.md, "Lazy inputs").

A client's masked vector is made chunk by chunk and the server adds messages chunk by
chunk, both split over threads: the bytes and the sums must be those of the whole-vector
computation at every chunk size and thread count. Inputs may be made lazily.
"""

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import securefed as sf
from securefed import parallel
from securefed.crypto.masks import mask_aes_key
from securefed.crypto.prg import keystream_into, new_stream
from securefed.crypto.random import RandomSource
from securefed.encoding import FixedPoint
from securefed.encoding import _kernels as encoding_kernels
from securefed.errors import InvalidInput
from securefed.protocols.base import LazyInputs, RoundSpec
from securefed.protocols.secagg import PHASES, packed
from securefed.protocols.secagg.packed import (
    BLOCK,
    GROUP,
    UnpackAdder,
    column_pack,
    column_unpack,
    encoded_source,
    masked_message,
    materialize,
    stored_source,
)

#: (threads, chunk size, column block): small blocks put block and slab boundaries inside small vectors.
SETTINGS = [(1, 64, 128), (2, 64, 256), (3, 192, 128), (2, 1 << 15, BLOCK)]


@contextlib.contextmanager
def split(threads, chunk, block=BLOCK):
    """These settings, and even tiny vectors split over the threads, so that slab boundaries are exercised.
    `block` replaces the layout's block size (a wire constant) to put many blocks in a small vector."""
    before = parallel.MIN_SLAB_WORK, packed.BLOCK
    parallel.MIN_SLAB_WORK, packed.BLOCK = 1, block
    try:
        with parallel.options(threads=threads, chunk_size=chunk):
            yield
    finally:
        parallel.MIN_SLAB_WORK, packed.BLOCK = before


def keystream(key, count, dtype):
    out = np.empty(count, dtype=dtype)
    keystream_into(new_stream(key), out)
    return out


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**20), st.integers(1, 3000))
def test_a_keystream_started_at_an_offset_is_the_continuation_of_the_stream(key, block, size):
    whole = new_stream(key, 0).update(bytes(16 * (block % 64) + size))
    assert new_stream(key, 16 * (block % 64)).update(bytes(size)) == whole[16 * (block % 64):]
    # across the 2^64 boundary of the counter: the carry goes into the high 64 bits
    far = 16 * (2**64 - 1 - block % 3)
    assert new_stream(key, far).update(bytes(64))[16 * (1 + block % 3):] == new_stream(key, 16 * 2**64).update(
        bytes(64 - 16 * (1 + block % 3)))
    with pytest.raises(ValueError):
        new_stream(key, 8)


def reference_masked_vector(x, enc, n, rounding_key, add, sub):
    """The whole-vector computation: encode with uniform i = rounding keystream word i, add every full mask."""
    k = enc.modulus_bits(n)
    dtype = np.uint32 if k <= 32 else np.uint64
    q = np.empty(x.size, dtype=dtype)
    u = keystream(rounding_key, x.size, np.uint32)
    assert encoding_kernels.quantize_into(x, enc.scale, enc.value_range, u, np.uint64((1 << k) - 1), q) == -1
    for keys, sign in ((add, 1), (sub, -1)):
        for key in keys:
            m = keystream(key, x.size, dtype)
            q = q + m if sign > 0 else q - m
    return q & dtype((1 << k) - 1) if k < 8 * np.dtype(dtype).itemsize else q


@given(
    size=st.integers(1, 2500),
    value_bits=st.sampled_from([2, 9, 16, 27, 40, 53]),
    n=st.integers(1, 40),
    keys=st.integers(0, 4),
    setting=st.sampled_from(SETTINGS),
    seed=st.integers(0, 2**32),
)
def test_masked_message_is_the_whole_vector_computation_at_every_chunk_size_and_thread_count(
        size, value_bits, n, keys, setting, seed):
    enc = FixedPoint(value_range=2.0, value_bits=value_bits)
    k = enc.modulus_bits(n)
    dtype = np.dtype(np.uint32 if k <= 32 else np.uint64)
    x = np.random.default_rng(seed).uniform(-2, 2, size).astype(np.float32 if seed % 2 else np.float64)
    rng = RandomSource(seed)
    rounding = rng.token_bytes(16)
    masks = [mask_aes_key(rng.token_bytes(16 if i % 2 else 32)) for i in range(keys)]
    add, sub = masks[: keys // 2 + 1], masks[keys // 2 + 1:]
    with split(*setting):
        msg = masked_message(encoded_source(x, enc, n, rounding), size, k, dtype, add, sub, prefix=b"hdr")
        stored = materialize(encoded_source(x, enc, n, rounding), size, dtype)
        again = masked_message(stored_source(stored), size, k, dtype, add, sub, prefix=b"")
        want = reference_masked_vector(x, enc, n, rounding, add, sub)
        assert msg[:3] == b"hdr"
        np.testing.assert_array_equal(column_unpack(msg[3:], k, size), want)
        assert column_pack(want, k) == msg[3:] == again
    np.testing.assert_array_equal(stored, reference_masked_vector(x, enc, n, rounding, [], []))


@given(
    width=st.integers(1, 64),
    size=st.integers(1, 2000),
    messages=st.integers(1, 10),
    offset=st.integers(0, 9),
    setting=st.sampled_from(SETTINGS),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_unpack_adder_adds_any_width_read_in_place_at_any_alignment(width, size, messages,
                                                                    offset, setting, seed, data):
    gen = np.random.default_rng(seed)
    dtype = np.uint32 if width <= 32 else np.uint64
    top = (1 << width) - 1
    acc = gen.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True)
    want = acc.copy()
    with split(*setting):
        adder = UnpackAdder(acc, width)
        for i in range(messages):
            v = gen.integers(0, top, size, dtype=np.uint64, endpoint=True).astype(dtype)
            # the body starts at any byte of the message, in bytes (may be held back for a group of
            # GROUP) or in a writeable buffer (added at once: its owner may reuse it)
            raw = bytes(offset) + column_pack(v, width)
            writeable = data.draw(st.booleans(), label=f"writeable {i}")
            body = memoryview(bytearray(raw) if writeable else raw)[offset:]
            adder.check(body)
            held = adder.held_bytes
            adder.add(body)
            if writeable:
                body.obj[:] = bytes(len(body.obj))  # reused by its owner: must not change the sum
            assert adder.held_bytes == held if writeable else adder.held_bytes in (0, held + adder.size)
            assert adder.held_bytes <= (GROUP - 1) * adder.size
            want += v
        adder.flush()
        assert adder.held_bytes == 0
    np.testing.assert_array_equal(acc & top, want & top)  # the sum is the low `width` bits


@pytest.mark.parametrize("count", [1, 3, 4, 6, 9])
def test_unpack_adder_holds_a_message_only_while_its_group_can_fill(count):
    """With `more` (the messages still expected) counting down, every group of GROUP is added in one
    pass and the rest at once: nothing is left held when the last message has been added."""
    width, size = 22, 300
    vs = [np.random.default_rng(i).integers(0, 1 << width, size).astype(np.uint32) for i in range(count)]
    acc = np.zeros(size, dtype=np.uint32)
    adder = UnpackAdder(acc, width)
    for i, v in enumerate(vs):
        adder.add(memoryview(column_pack(v, width)), more=count - 1 - i)
        grouped = i < count - count % GROUP  # (the last count % GROUP cannot fill a group)
        assert adder.held_bytes == ((i + 1) % GROUP * adder.size if grouped else 0)
    assert adder.held_bytes == 0
    np.testing.assert_array_equal(acc & np.uint32((1 << width) - 1), np.sum(vs, axis=0, dtype=np.uint32)
                                  & np.uint32((1 << width) - 1))


def spec_column_pack(values, width, block):
    """The layout as protocols/secagg.md ("Masked vectors") words it, bit by bit with Python integers."""
    f = 32 if width <= 32 else 64
    out = bytearray()
    lo, count = 0, len(values)
    while count - lo >= f:
        size = min(block, (count - lo) // f * f)
        c = size // f
        words = [0] * (width * c)
        for j in range(f):
            for m in range(c):
                x, bit = int(values[lo + j * c + m]), j * width
                for b in range(width):  # bit b of the field is bit j*w + b of column m's stream
                    if x >> b & 1:
                        k, r = divmod(bit + b, f)
                        words[k * c + m] |= 1 << r
        out += b"".join(word.to_bytes(f // 8, "little") for word in words)
        lo += size
    stream = sum(int(v) << (i * width) for i, v in enumerate(values[lo:]))
    return bytes(out) + stream.to_bytes(((count - lo) * width + 7) // 8, "little")


@given(width=st.integers(1, 64), size=st.integers(1, 700), block=st.sampled_from([128, 256]),
       seed=st.integers(0, 2**32))
def test_the_column_layout_is_the_one_the_spec_describes_and_unpacks_strictly(width, size, block, seed):
    dtype = np.uint32 if width <= 32 else np.uint64
    v = np.random.default_rng(seed).integers(0, (1 << width) - 1, size, dtype=np.uint64, endpoint=True).astype(dtype)
    with split(1, 64, block):
        data = column_pack(v, width)
        assert data == spec_column_pack(v, width, block)
        assert len(data) == (size * width + 7) // 8  # exactly the bits of the values, as encoding.pack
        np.testing.assert_array_equal(column_unpack(data, width, size), v)
        with pytest.raises(InvalidInput):
            column_unpack(data + b"\x00", width, size)
        if size * width % 8:  # a padding bit set
            with pytest.raises(InvalidInput):
                column_unpack(data[:-1] + bytes([data[-1] | 0x80]), width, size)


@pytest.mark.parametrize("width", [1, 22, 32, 33, 64])
def test_a_vector_of_several_real_blocks_packs_and_adds_like_the_reference(width):
    size = 2 * BLOCK + 1000 + 7  # two whole blocks, a block of 31 (or 15) columns, a tail
    dtype = np.uint32 if width <= 32 else np.uint64
    v = np.random.default_rng(width).integers(0, (1 << width) - 1, size, dtype=np.uint64, endpoint=True).astype(dtype)
    acc = np.arange(size, dtype=dtype)
    with split(2, 1 << 12):
        msg = masked_message(stored_source(v), size, width, np.dtype(dtype), [], [], prefix=b"h")
        assert msg[1:] == column_pack(v, width)
        adder = UnpackAdder(acc, width)
        for _ in range(GROUP + 1):  # a group of GROUP in one pass, then one held back until flush()
            adder.check(memoryview(msg)[1:])
            adder.add(memoryview(msg)[1:])
        assert adder.held_bytes == adder.size
        adder.flush()
    top = dtype((1 << width) - 1)
    np.testing.assert_array_equal(acc & top, (np.arange(size, dtype=dtype) + (GROUP + 1) * v) & top)


@pytest.mark.parametrize("protocol", [sf.protocols.SecAgg, sf.protocols.SecAggPlus])
@given(n=st.integers(3, 12), size=st.integers(1, 1500), drop=st.integers(0, 2), seed=st.integers(0, 2**32))
def test_a_round_gives_the_same_sum_for_one_and_two_threads_within_the_bound(protocol, n, size,
                                                                            drop, seed):
    proto = protocol(value_range=1.0, value_bits=18)
    xs = [np.random.default_rng(seed + i).uniform(-1, 1, size) for i in range(n)]
    dropouts = {0: "masked_input"} if drop == 1 else {n - 1: "unmasking"} if drop == 2 else {}
    totals = []
    for threads, chunk in ((1, 1 << 15), (2, 64), (2, 128)):
        with split(threads, chunk):
            res = sf.simulate_aggregation(proto, xs, dropouts, seed=seed, record="digest")
        totals.append(res.total)
        digests = [d for d in res.server_view.digests if d[1] == "masked_input"]
        if threads == 1:
            first = digests
        assert digests == first  # the very same masked messages
    for t in totals[1:]:
        np.testing.assert_array_equal(t, totals[0])
    exact = np.sum([x for i, x in enumerate(xs) if i in res.included], axis=0)
    assert np.abs(totals[0] - exact).max() <= proto.error_bound(n)


def test_a_saved_client_carries_the_encoding_the_stream_would_make():
    protocol = sf.protocols.SecAgg()
    n, dim = 4, 300
    spec = RoundSpec(n=n, dim=dim, session_id=bytes(range(32)))
    xs = [np.linspace(-1, 1, dim) * (i + 1) / n for i in range(n)]
    messages = []
    for restore in (False, True):
        server = protocol.server(spec, rng=RandomSource(0))
        clients = {i: protocol.client(spec, i, xs[i], rng=RandomSource(i)) for i in range(n)}
        for phase in PHASES[:3]:
            for u, req in server.requests(phase).items():
                c = clients[u]
                if restore and phase == "masked_input":
                    c = protocol.load_client(c.dump(), rng=RandomSource(99))
                reply = c.handle(phase, req)
                server.receive(phase, u, reply)
                if phase == "masked_input":
                    messages.append(reply)
            server.finish_phase(phase)
    assert messages[:n] == messages[n:]


def test_lazy_inputs_are_made_once_each_in_the_input_phase_and_the_sum_is_the_same():
    xs = [np.random.default_rng(i).uniform(-1, 1, 257) for i in range(6)]
    made = []

    def make(i):
        made.append(i)
        return xs[i]

    for proto in (sf.protocols.SecAggPlus(), sf.protocols.Plain(), sf.protocols.BFV(value_range=1.0)):
        made.clear()
        lazy = sf.simulate_aggregation(proto, LazyInputs(6, 257, make), {2: proto.phases[0]}, seed=5)
        eager = sf.simulate_aggregation(proto, xs, {2: proto.phases[0]}, seed=5)
        assert made == [0, 1, 3, 4, 5]  # client 2 dropped before uploading: its input is never made
        if proto.name != "bfv":  # BFV's ciphertexts take SEAL's own randomness: equal sums, not equal bytes
            np.testing.assert_array_equal(lazy.total, eager.total)
            assert lazy.server_view.digests == eager.server_view.digests
        assert np.abs(lazy.total - np.sum([xs[i] for i in lazy.included], axis=0)).max() <= proto.error_bound(6)
        assert lazy.included == eager.included == (0, 1, 3, 4, 5)
        assert lazy.server_view.messages == [] and len(lazy.server_view.digests) == len(eager.server_view.digests)


def test_lazy_inputs_are_checked_when_used():
    def bad_length(i):
        return np.zeros(5 if i == 3 else 4)

    with pytest.raises(InvalidInput, match="length 4"):
        sf.simulate_aggregation(sf.protocols.SecAgg(), LazyInputs(5, 4, bad_length), seed=1)
    with pytest.raises(InvalidInput, match="outside the declared range"):
        sf.simulate_aggregation(sf.protocols.SecAgg(), LazyInputs(5, 4, lambda i: np.full(4, 2.0)), seed=1)
    with pytest.raises(InvalidInput):
        LazyInputs(0, 4, bad_length)
    with pytest.raises(InvalidInput):
        LazyInputs(3, 4, "not callable")
    inputs = LazyInputs(3, 4, lambda i: np.full(4, float(i)))
    assert len(inputs) == 3 and inputs[-1][0] == 2.0 and [v[0] for v in inputs[1:]] == [1.0, 2.0]
    with pytest.raises(IndexError):
        inputs[3]

