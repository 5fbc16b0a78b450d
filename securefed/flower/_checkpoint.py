"""Atomic checkpoints of a Flower run: the model, the round reached, the ledger and the history.

A directory holds ``model-NNNNNN.npz`` (the arrays, written first) and
``state.json`` (written to a temporary file, fsynced, then renamed over the old
one: the commit point). A crash at any moment leaves the previous checkpoint or
the new one, never a mix. No pickle: arrays load with ``allow_pickle=False``.
``released.json`` is a write-ahead record of DP releases (aggregates decoded) not
yet committed: a crash after a release and before its commit cannot hide it from
the ledger.
See ``protocols/flower.md``, "Resume".
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from securefed.errors import ConfigurationError

__all__ = ["load", "record_release", "released", "save"]

VERSION = 1
_STATE = "state.json"
_RELEASED = "released.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(
    directory: str | os.PathLike[str],
    *,
    round_index: int,
    arrays: ArrayRecord,
    state: dict[str, Any],
    aggregate: np.ndarray | None = None,
) -> None:
    """Commit round `round_index`: `arrays`, the JSON-able `state` and optionally the round's
    decoded `aggregate` (kept until the audit log has recorded it); older model files are removed after."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = f"model-{round_index:06d}.npz"
    names = list(arrays.keys())
    # Positional arrays (arr_0, arr_1, ...): array names may be anything, even savez's own keywords.
    extra = [] if aggregate is None else [np.asarray(aggregate, dtype="<f8")]
    _write_atomic(d / model, lambda f: np.savez(f, *(arrays[name].numpy() for name in names), *extra))
    body = {"version": VERSION, "round": round_index, "model": model, "names": names,
            "aggregate": aggregate is not None, **state}
    data = json.dumps(body, sort_keys=True, allow_nan=False).encode()
    _write_atomic(d / _STATE, lambda f: f.write(data))
    (d / _RELEASED).unlink(missing_ok=True)  # committed: the ledger in state.json has them now
    for old in d.glob("model-*.npz"):
        if old.name != model:
            old.unlink(missing_ok=True)


def record_release(directory: str | os.PathLike[str], event: dict[str, Any]) -> None:
    """Append the DP `event` of an aggregate just released to the write-ahead record (atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    events = released(d) + [event]
    data = json.dumps(events, sort_keys=True, allow_nan=False).encode()
    _write_atomic(d / _RELEASED, lambda f: f.write(data))


def released(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """DP events recorded ahead of a commit that has not happened (empty after every commit)."""
    path = Path(directory) / _RELEASED
    if not path.exists():
        return []
    try:
        events = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"cannot read {path}: {e}") from e
    if not isinstance(events, list):
        raise ConfigurationError(f"{path} is not a list of events")
    return events


def load(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], ArrayRecord, np.ndarray | None] | None:
    """The last committed ``(state, arrays, aggregate)`` in `directory`, or None when there is none.

    Raises ConfigurationError for a checkpoint this version cannot read.
    """
    d = Path(directory)
    if not (d / _STATE).exists():
        return None
    try:
        state = json.loads((d / _STATE).read_text())
        if state.get("version") != VERSION:
            raise ConfigurationError(f"checkpoint {d} has version {state.get('version')!r}, expected {VERSION}")
        with np.load(d / state["model"], allow_pickle=False) as npz:
            arrays = ArrayRecord()
            for i, name in enumerate(state["names"]):
                arrays[name] = Array(np.ascontiguousarray(npz[f"arr_{i}"]))
            aggregate = npz[f"arr_{len(state['names'])}"] if state["aggregate"] else None
    except (OSError, KeyError, ValueError) as e:
        raise ConfigurationError(f"cannot read the checkpoint in {d}: {e}") from e
    return state, arrays, aggregate
