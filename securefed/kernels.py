"""Which implementation runs the encoding's and packing's loops: numba's compiled ones, or numpy.

Both give the same bits (``tests/encoding/test_kernels.py``). The compiled loops are several
times faster per value, but a process pays about 2.5 s of CPU to import numba and load its
cached kernels, and a Flower ClientApp is a fresh process for every message: there that load
was most of a node's work in a secure round (``bench/results.md``). So in the default mode
``"auto"`` the loops run in numpy until numba is loaded in the process anyway (the server's
unpacking, the noise samplers, :func:`load`), or until numpy's loops have processed
:data:`COMPILE_AFTER` values in this process: by then numpy's extra time has about paid for the
load, which a long-running process then makes once (the rent-or-buy rule). ``"numba"`` and
``"numpy"`` force one of them; the mode comes from :func:`set_mode` or the environment variable
``SECUREFED_KERNELS``.
"""

from __future__ import annotations

import os
import sys

from securefed.errors import ConfigurationError

__all__ = ["COMPILE_AFTER", "MODES", "compiled", "get_mode", "load", "set_mode"]

#: The modes: "auto" (numpy until numba is loaded or has paid for itself), "numba", "numpy".
MODES = ("auto", "numba", "numpy")
#: In "auto", the values numpy's loops process in a process before it loads numba: at the
#: few ns per value numpy's loops take more (bench/encoding.py), about the cost of the load.
COMPILE_AFTER = 1 << 29

_mode: str | None = None  # None: the environment's, read at first use
_numpy_values = 0


def _checked(mode: object, where: str) -> str:
    if mode not in MODES:
        raise ConfigurationError(f"{where} must be one of {', '.join(MODES)}; got {mode!r}")
    return str(mode)


def set_mode(mode: str | None) -> None:
    """Set the process-wide mode ("auto", "numba" or "numpy"; None: the environment's again)."""
    global _mode
    _mode = None if mode is None else _checked(mode, "the kernel mode")


def get_mode() -> str:
    """The process-wide mode: set_mode's, else ``SECUREFED_KERNELS``'s, else "auto"."""
    if _mode is not None:
        return _mode
    raw = os.environ.get("SECUREFED_KERNELS", "").strip()
    return _checked(raw, "the environment variable SECUREFED_KERNELS") if raw else "auto"


def load() -> None:
    """Load numba now, so that "auto" runs the compiled loops from here on: for a process that
    will encode many values (a benchmark's warm-up, a long-lived client of a large model)."""
    import numba  # noqa: F401


def compiled(values: int) -> bool:
    """Whether a loop over `values` values runs compiled: always in "numba", never in "numpy"; in
    "auto" once numba is loaded in this process, or once numpy's loops have processed
    :data:`COMPILE_AFTER` values here."""
    global _numpy_values
    mode = get_mode()
    if mode == "numba" or (mode == "auto" and "numba" in sys.modules):
        return True
    if mode == "auto" and _numpy_values >= COMPILE_AFTER:
        return True
    _numpy_values += values
    return False
