import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.encoding import pack, packed_size, storage_dtype, unpack
from securefed.errors import ConfigurationError, InvalidInput


def reference_pack(values, width):
    """Independent oracle: one Python int as the little-endian bit stream."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * width)
    return stream.to_bytes(packed_size(len(values), width), "little")


def values_of(width):
    return st.lists(st.integers(0, 2**width - 1), max_size=200).map(
        lambda xs: np.array(xs, dtype=storage_dtype(width))
    )


@pytest.mark.parametrize("width", range(1, 65))
@given(data=st.data())
def test_pack_unpack_round_trip_every_width(width, data):
    v = data.draw(values_of(width))
    packed = pack(v, width)
    assert packed.size == packed_size(v.size, width) == (v.size * width + 7) // 8
    assert bytes(packed) == reference_pack(v, width)
    back = unpack(bytes(packed), width, v.size)
    assert back.dtype == storage_dtype(width)
    np.testing.assert_array_equal(back, v)


@pytest.mark.parametrize("width", [3, 20, 32, 40, 64])
def test_pack_accepts_wider_storage(width):
    v = np.arange(1000, dtype=np.uint64) % (2**min(width, 10))
    np.testing.assert_array_equal(unpack(pack(v, width), width, v.size), v)


def test_value_too_wide_is_rejected():
    with pytest.raises(InvalidInput, match="does not fit in 3 bits"):
        pack(np.array([1, 8], dtype=np.uint32), 3)


@pytest.mark.parametrize("width", [0, 65, -1])
def test_width_outside_1_64_is_a_configuration_error(width):
    with pytest.raises(ConfigurationError):
        pack(np.zeros(3, dtype=np.uint64), width)


@pytest.mark.parametrize("bad", [np.zeros(3, dtype=np.int64), np.zeros(3), np.zeros((2, 2), dtype=np.uint32)])
def test_pack_rejects_signed_float_or_2d(bad):
    with pytest.raises(InvalidInput):
        pack(bad, 8)


def test_unpack_is_strict_about_length_and_padding():
    v = np.array([5, 6, 7], dtype=np.uint32)
    good = bytes(pack(v, 5))  # 15 bits -> 2 bytes, 1 padding bit
    with pytest.raises(InvalidInput):
        unpack(good + b"\x00", 5, 3)
    with pytest.raises(InvalidInput):
        unpack(good[:-1], 5, 3)
    with pytest.raises(InvalidInput, match="padding"):
        unpack(good[:-1] + bytes([good[-1] | 0x80]), 5, 3)
