"""A model as a Flower ``ArrayRecord``, seen as one flat float vector (its float arrays, in record order).

Non-float arrays (for example BatchNorm's ``num_batches_tracked``) are not
aggregated: the server keeps its own value.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from securefed.encoding import FlatSpec, flatten, unflatten
from securefed.errors import InvalidInput

__all__ = ["flatten_record", "same_layout", "with_vector"]


def _float_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    out = {}
    for name, array in record.items():
        if np.dtype(array.dtype).kind == "f":
            out[name] = array.numpy()
    return out


def flatten_record(record: ArrayRecord) -> tuple[np.ndarray, FlatSpec]:
    """The float arrays of `record` as one vector (float32 unless one is float64), and how to split it."""
    arrays = _float_arrays(record)
    if not arrays:
        raise InvalidInput("the model has no float arrays to aggregate")
    return flatten(arrays)


def same_layout(a: ArrayRecord, b: ArrayRecord) -> None:
    """Raise InvalidInput unless `a` and `b` hold the same names, dtypes and shapes, in the same order."""
    la = [(k, v.dtype, tuple(v.shape)) for k, v in a.items()]
    lb = [(k, v.dtype, tuple(v.shape)) for k, v in b.items()]
    if la != lb:
        raise InvalidInput("the trained model's arrays differ from the global model's (names, dtypes or shapes)")


def with_vector(record: ArrayRecord, vector: np.ndarray, spec: FlatSpec) -> ArrayRecord:
    """A copy of `record` whose float arrays are replaced by `vector` split along `spec`."""
    parts = unflatten(vector.astype(spec.flat_dtype, copy=False), spec)
    assert isinstance(parts, dict)
    out = ArrayRecord()
    for name, array in record.items():
        out[name] = Array(np.ascontiguousarray(parts[name])) if name in parts else array
    return out
