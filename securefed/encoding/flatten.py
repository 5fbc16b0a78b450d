"""Model parameters (a torch ``state_dict``, a name->array mapping or a list of arrays) to one flat vector and back.

The flat vector is float64 if any parameter is float64, else float32; every float
dtype in use (float16, bfloat16, float32, float64) converts to it exactly, so
:func:`unflatten` restores every parameter bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from securefed.errors import InvalidInput

__all__ = ["FlatSpec", "ParamSpec", "flatten", "unflatten"]

_NUMPY_FLOATS = {"float16", "float32", "float64"}
_TORCH_FLOATS = {"float16", "bfloat16", "float32", "float64"}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, shape, dtype name, and whether it was a torch tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    torch: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class FlatSpec:
    """How a flat vector splits back into named, shaped, typed parameters."""

    params: tuple[ParamSpec, ...]
    mapping: bool
    flat_dtype: str

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(p.size for p in self.params)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def _is_torch(v: Any) -> bool:
    return type(v).__module__.split(".")[0] == "torch"


def _spec_of(name: str, v: Any) -> ParamSpec:
    if _is_torch(v):
        dtype = str(v.dtype).removeprefix("torch.")
        if dtype not in _TORCH_FLOATS:
            raise InvalidInput(
                f"parameter {name!r} has dtype {dtype}; only float parameters can be flattened "
                "(pass dict(model.named_parameters()) rather than a state_dict with integer buffers)"
            )
        return ParamSpec(name, tuple(int(s) for s in v.shape), dtype, True)
    if isinstance(v, np.ndarray):
        if v.dtype.name not in _NUMPY_FLOATS:
            raise InvalidInput(f"parameter {name!r} has dtype {v.dtype}; only float16/32/64 arrays can be flattened")
        return ParamSpec(name, tuple(int(s) for s in v.shape), v.dtype.name, False)
    raise InvalidInput(f"parameter {name!r} is a {type(v).__name__}; expected a torch tensor or numpy array")


def _items(params: Mapping[str, Any] | Sequence[Any]) -> tuple[list[tuple[str, Any]], bool]:
    if isinstance(params, Mapping):
        return [(str(k), v) for k, v in params.items()], True
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        return [(str(i), v) for i, v in enumerate(params)], False
    raise InvalidInput(f"expected a mapping or a sequence of arrays, got {type(params).__name__}")


def flatten(
    params: Mapping[str, Any] | Sequence[Any], *, out: np.ndarray | None = None
) -> tuple[np.ndarray, FlatSpec]:
    """Concatenate parameters into one 1-D float vector; returns ``(vector, spec)``.

    `out`, when given, must be a 1-D array of the flat dtype and length; it is
    filled in place (no extra full-length copy). Raises InvalidInput for
    non-float parameters or empty input.
    """
    items, mapping = _items(params)
    if not items:
        raise InvalidInput("no parameters to flatten")
    specs = tuple(_spec_of(name, v) for name, v in items)
    flat_dtype = "float64" if any(s.dtype == "float64" for s in specs) else "float32"
    spec = FlatSpec(specs, mapping, flat_dtype)
    if out is None:
        out = np.empty(spec.size, dtype=flat_dtype)
    elif out.ndim != 1 or out.size != spec.size or out.dtype != np.dtype(flat_dtype):
        raise InvalidInput(f"out must be a 1-D {flat_dtype} array of length {spec.size}")
    off = 0
    for (_, v), s in zip(items, specs):
        if s.torch:
            v = v.detach().to("cpu")
            if s.dtype == "bfloat16":  # numpy has no bfloat16; float32 holds it exactly
                v = v.float()
            v = v.numpy()
        out[off : off + s.size] = v.reshape(-1)
        off += s.size
    return out, spec


def unflatten(vector: np.ndarray, spec: FlatSpec) -> dict[str, Any] | list[Any]:
    """Split a flat vector back into parameters with the names, shapes and dtypes in `spec`.

    Returns a dict for a spec made from a mapping, else a list; torch parameters
    come back as CPU tensors. Raises InvalidInput for a vector of the wrong shape.
    """
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.size != spec.size:
        raise InvalidInput(f"expected a 1-D vector of length {spec.size}")
    out: list[Any] = []
    off = 0
    for s in spec.params:
        piece = vector[off : off + s.size].reshape(s.shape)
        off += s.size
        if s.torch:
            import torch

            t = torch.from_numpy(np.array(piece, dtype=np.float64 if s.dtype == "float64" else np.float32))
            out.append(t.to(getattr(torch, s.dtype)))
        else:
            out.append(piece.astype(s.dtype, copy=True))
    if spec.mapping:
        return {s.name: v for s, v in zip(spec.params, out)}
    return out
