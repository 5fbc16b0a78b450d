"""Encoding: model parameters to flat vectors, reals to modular integers, integers to packed bytes.

See ``protocols/encoding.md`` for the formats and ``proofs/encoding.md`` for the bounds.
"""

from securefed.encoding.fixedpoint import (
    FixedPoint,
    IntegerEncoder,
    check_finite,
    check_positive_count,
    check_sum,
    check_vector,
    decode_error_bound,
    modulus_bits,
)
from securefed.encoding.flatten import FlatSpec, ParamSpec, flatten, unflatten
from securefed.encoding.packing import pack, packed_size, storage_dtype, unpack

__all__ = [
    "FixedPoint",
    "FlatSpec",
    "IntegerEncoder",
    "ParamSpec",
    "check_finite",
    "check_positive_count",
    "check_sum",
    "check_vector",
    "decode_error_bound",
    "flatten",
    "modulus_bits",
    "pack",
    "packed_size",
    "storage_dtype",
    "unflatten",
    "unpack",
]
