import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.crypto.masks import apply_masks, mask_aes_key, pairwise_signs
from securefed.crypto.prg import CHUNK_BYTES, keystream_into, new_stream


def _reference(size, dtype, add, sub):
    acc = np.zeros(size, dtype=dtype)
    for keys, sign in ((add, 1), (sub, -1)):
        for k in keys:
            full = np.empty(size, dtype=dtype)
            keystream_into(new_stream(mask_aes_key(k)), full)
            acc = acc + full if sign > 0 else acc - full
    return acc


@given(
    st.sampled_from([np.uint32, np.uint64]),
    st.integers(1, 3 * CHUNK_BYTES // 4 + 17),
    st.lists(st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32), max_size=4),
    st.lists(st.binary(min_size=16, max_size=16), max_size=3),
)
def test_chunked_in_place_masking_equals_full_length_keystream_arithmetic(dtype, size, add, sub):
    out = np.zeros(size, dtype=dtype)
    apply_masks(out, add, sub)
    np.testing.assert_array_equal(out, _reference(size, dtype, add, sub))


@given(st.integers(2, 7), st.integers(1, 300))
def test_pairwise_masks_of_a_group_cancel_in_the_sum(n, size):
    keys = {(u, v): bytes([u, v]) * 8 for u in range(n) for v in range(u + 1, n)}
    total = np.zeros(size, dtype=np.uint32)
    for u in range(n):
        peers = [v for v in range(n) if v != u]
        add, sub = pairwise_signs(u, peers, [keys[min(u, v), max(u, v)] for v in peers])
        y = np.full(size, u, dtype=np.uint32)
        apply_masks(y, add, sub)
        total += y
    assert (total == n * (n - 1) // 2).all()


def test_masking_never_allocates_a_full_length_array():
    out = np.zeros(4 * CHUNK_BYTES, dtype=np.uint32)  # 4 MiB
    keys = [bytes([i]) * 16 for i in range(8)]
    tracemalloc.start()
    apply_masks(out, keys[:4], keys[4:])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * CHUNK_BYTES


def test_bad_buffers_and_keys_are_refused():
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.int64), [bytes(16)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(8, dtype=np.uint32)[::2], [bytes(16)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.uint32), [bytes(20)])
    with pytest.raises(ValueError):
        pairwise_signs(1, [1], [bytes(16)])
