"""The Trainer's argument checks: nonsense is refused at construction, not later inside torch.

Numbers are refused when they are bools, NaN, infinite or out of range (a bool is an int
to Python, so ``batch_size=True`` would otherwise train with batches of one); numpy
scalars are accepted and stored as Python numbers (they reach the audit log's JSON).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from securefed.errors import ConfigurationError, InvalidInput

#: ``seed`` is hashed as 8 bytes (big-endian), so it lies in [0, 2**64).
SEED_LIMIT = 2**64


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, minimum: int) -> int:
    """`value` as an int in [`minimum`, sys.maxsize]; ConfigurationError for anything else (bools included).

    Above sys.maxsize no count can be used (range, len, torch's samplers refuse it)."""
    if not _is_int(value) or not minimum <= value <= sys.maxsize:
        raise ConfigurationError(f"{name} must be an integer >= {minimum} (at most sys.maxsize), got {value!r}")
    return int(value)


def real(name: str, value: Any, *, low: float, low_open: bool = True, high: float | None = None) -> float:
    """`value` as a finite float in (low, high) (``[low, ...`` when not `low_open`); ConfigurationError else."""
    x = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        with contextlib.suppress(OverflowError):  # an int beyond float's range
            x = float(value)
    if not (math.isfinite(x) and (x > low if low_open else x >= low) and (high is None or x < high)):
        span = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise ConfigurationError(f"{name} must be a finite number in {span}, got {value!r}")
    return x


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def optional_callable(name: str, value: Any, shape: str) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be None or a function {shape}, got {type(value).__name__}")


def _is_dataset(value: Any) -> bool:
    if not hasattr(value, "__len__") or not hasattr(value, "__getitem__") or isinstance(value, (str, bytes)):
        return False
    try:  # a 0-d array has __len__ and raises; a dataset's example is an (input, target) pair
        return len(value) == 0 or _is_pair(value[0])
    except Exception:  # noqa: BLE001 -- whatever indexing raises, this is not a dataset we can train on
        return False


def _is_pair(example: Any) -> bool:
    return isinstance(example, (tuple, list)) and len(example) == 2


def datasets(value: Any) -> list[Any]:
    """The participants' datasets as a list; InvalidInput unless a non-empty sequence of non-empty datasets."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidInput(f"datasets must be a list of torch Datasets, one per participant, got "
                           f"{type(value).__name__}")
    out = list(value)
    if not out:
        raise InvalidInput("datasets must hold one dataset per participant; got an empty list")
    bad = [i for i, d in enumerate(out) if not _is_dataset(d)]
    if bad:
        raise InvalidInput(f"datasets[{bad[0]}] (of type {type(out[bad[0]]).__name__}) is not a dataset: give objects "
                           "with __len__ and __getitem__ whose examples are (input, target) pairs, e.g. torch "
                           "TensorDatasets")
    empty = [i for i, d in enumerate(out) if len(d) == 0]
    if empty:
        raise InvalidInput(f"every participant needs at least one example; datasets {empty} are empty")
    return out


def eval_dataset(value: Any) -> Any:
    if value is not None and (not _is_dataset(value) or len(value) == 0):
        raise InvalidInput("eval_dataset must be None or a non-empty dataset (an object with __len__ and "
                           f"__getitem__ giving (input, target) pairs), got {type(value).__name__}"
                           + (" of length 0" if _is_dataset(value) else ""))
    return value


def seed(value: Any) -> int | None:
    """None, or the seed as an int in [0, 2**64)."""
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ConfigurationError(f"seed must be None or an integer in [0, 2**64), got {value!r}; "
                                 "pick a non-negative integer")
    return int(value)


def audit(audit_log: Any, audit_key: Any) -> None:
    """The audit arguments' types (the path itself is checked when the log is opened)."""
    if audit_log is None:
        if audit_key is not None:
            raise ConfigurationError("audit_key is given without audit_log; pass audit_log=PATH to write a log")
        return
    if not isinstance(audit_log, (str, os.PathLike)) or isinstance(os.fspath(audit_log), bytes):
        raise ConfigurationError(f"audit_log must be a path (str or os.PathLike), got {type(audit_log).__name__}")
    if "\x00" in os.fspath(audit_log):  # the OS refuses it (ValueError: embedded null byte)
        raise ConfigurationError(f"audit_log {os.fspath(audit_log)!r} holds a NUL character: give a file path")


def dropouts(drops: Any, round: int, population: int) -> Mapping[int, Any]:
    """What a dropout schedule returned, checked: a mapping from participants (0..population-1) to phases."""
    if not isinstance(drops, Mapping):
        raise ConfigurationError(
            f"dropouts(round, participants) must return a dict {{participant: phase}}, got {type(drops).__name__} "
            f"in round {round}; return {{}} for a round without dropouts")
    outside = [p for p in drops if not _is_int(p) or not 0 <= p < population]
    if outside:
        raise ConfigurationError(
            f"dropouts(round, participants) named {outside} in round {round}: not participants "
            f"(the population is 0..{population - 1})")
    return {int(p): phase for p, phase in drops.items()}


def protocol(value: Any, base: type) -> None:
    if value is not None and not isinstance(value, base):
        hint = f"; pass an instance, e.g. {value.__name__}()" if isinstance(value, type) else ""
        raise ConfigurationError(f"protocol must be an aggregation protocol (securefed.protocols), got "
                                 f"{type(value).__name__}{hint}")

