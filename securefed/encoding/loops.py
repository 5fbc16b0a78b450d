"""The encoding's inner loops for a call over `values` values: numba's or numpy's (:mod:`securefed.kernels`)."""

from __future__ import annotations

from types import ModuleType

from securefed import kernels

__all__ = ["loops"]


def loops(values: int) -> ModuleType:
    """The module of compiled loops, or of numpy's with the same names and bits; numba loads on first use."""
    if kernels.compiled(values):
        from securefed.encoding import _kernels as k
    else:
        from securefed.encoding import _numpy_kernels as k  # type: ignore[no-redef]
    return k
