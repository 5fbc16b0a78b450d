"""Signed, atomic checkpoints of a Flower run: the model, the round reached, the ledger and the history.

A directory holds ``model-NNNNNN.npz`` (the arrays, written first) and
``state.json`` (written to a temporary file, fsynced, then renamed over the old
one: the commit point). A crash at any moment leaves the previous checkpoint or
the new one, never a mix. No pickle: arrays load with ``allow_pickle=False``.
``released.json`` is a write-ahead record of DP releases (aggregates decoded) not
yet committed: a crash after a release and before its commit cannot hide it from
the ledger.

Both JSON files are signed with the server's Ed25519 key (the audit key when there is
an audit log): whoever can write the folder but does not hold the key cannot reset the
ledger, forge the record the audit log is completed from, or point ``model`` elsewhere.
``state.json`` binds the model file's SHA-256, a counter that grows with every commit
and resume, and the audit log's head at the commit. The server optimizer's state arrays
follow the model's in the model file (so its hash covers them) and its description is in
``state.json``. See ``protocols/flower.md``, "Resume".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from flwr.app import Array, ArrayRecord

from securefed.audit.keys import KeyLike, load_or_create_key, public_hex
from securefed.audit.log import canonical
from securefed.errors import ConfigurationError

__all__ = ["Checkpoint", "load", "load_all", "load_key", "record_release", "released", "save", "touch"]

#: 3: the server optimizer's description and state arrays (2 had neither).
VERSION = 3
_STATE = "state.json"
_RELEASED = "released.json"
_MODEL = re.compile(r"model-[0-9]{6}\.npz")
#: Larger JSON files are refused before parsing (a huge file is a denial of service, never a checkpoint).
MAX_JSON_BYTES = 256 << 20
#: Domain separation: a checkpoint signature is never an audit entry's, nor the other way round.
_CONTEXT = {_STATE: b"securefed/checkpoint/state/v1\n", _RELEASED: b"securefed/checkpoint/released/v1\n"}

#: ``state.json``'s committed body, as :func:`load` returns it.
Checkpoint = dict


def load_key(directory: str | os.PathLike[str], key: KeyLike | None) -> Ed25519PrivateKey:
    """The key that signs the checkpoints in `directory`: `key` (a key or a PEM file), or ``DIR.key``
    beside the folder, created (0600, with ``DIR.pub``) for a new checkpoint folder.

    Raises ConfigurationError when the folder holds a checkpoint but its key file is missing.
    """
    d = Path(directory).absolute()
    if key is not None:
        return load_or_create_key(d, key)
    private = d.with_name(d.name + ".key")
    if not private.exists() and (d / _STATE).exists():
        raise ConfigurationError(f"the checkpoint in {d} exists but its key {private} does not; pass "
                                 "checkpoint_key= (the key that signed it) or start with an empty folder")
    if private.exists():
        return load_or_create_key(d, private)
    new = Ed25519PrivateKey.generate()
    pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = new.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = private.with_suffix(".pub")
    public.unlink(missing_ok=True)  # never write through a planted link
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, pub)
    finally:
        os.close(fd)
    return new


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigurationError(f"cannot write in {path.parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. a directory planted at the name: the commit fails cleanly
        Path(tmp).unlink(missing_ok=True)
        raise ConfigurationError(f"cannot commit {path}: {e.strerror or e}; the folder was changed under the "
                                 "server (restore the files it wrote)") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _open_regular(path: Path) -> Any:
    """`path` opened for reading if it is a regular file of the folder itself (no link, FIFO or directory:
    one could block the server or read elsewhere); ConfigurationError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigurationError(f"cannot open {path}: {e.strerror}; restore the file the server wrote") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigurationError(f"{path} is not a regular file; restore the file the server wrote")
    return os.fdopen(fd, "rb")


class _HashingWriter:
    """A write-only, unseekable stream over `f` that hashes what passes through it: the digest signed for a
    model file is of the bytes the server wrote, never re-read from a path someone may have swapped."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return int(self.f.write(b))

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.n

    def seekable(self) -> bool:
        return False

    def read(self, *_: Any) -> bytes:  # numpy takes an object with ``read`` for a file
        raise OSError("write only")


def check_files(directory: str | os.PathLike[str]) -> None:
    """ConfigurationError when a model file name in `directory` is not a regular file (a directory planted at
    the next round's name would fail every commit after its round was released)."""
    for path in Path(directory).glob("model-*.npz"):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise ConfigurationError(f"{path} is not a regular file; remove it (the server writes model files)")


def _digest(f: Any) -> str:
    """SHA-256 of the open file `f` from its start; leaves it at its start again."""
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def _write_signed(path: Path, body: Any, key: Ed25519PrivateKey) -> None:
    sig = key.sign(_CONTEXT[path.name] + canonical({"body": body})).hex()
    data = canonical({"body": body, "key": public_hex(key), "sig": sig})
    _write_atomic(path, lambda f: f.write(data))


def _read_signed(path: Path, public: Ed25519PublicKey | None) -> Any:
    """The body of a signed file, its signature checked with `public` (None: unchecked, for tests and reports)."""
    try:
        with _open_regular(path) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ConfigurationError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB: not a file the server wrote")
        doc = json.loads(data)
    except (OSError, ValueError, RecursionError, MemoryError) as e:
        raise ConfigurationError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"body", "key", "sig"} or not isinstance(doc["sig"], str):
        raise ConfigurationError(f"{path} is not a signed securefed checkpoint file (version {VERSION}); "
                                 "start with an empty folder or restore the file this server wrote")
    if public is not None:
        try:
            public.verify(bytes.fromhex(doc["sig"]), _CONTEXT[path.name] + canonical({"body": doc["body"]}))
        except (InvalidSignature, ValueError):
            raise ConfigurationError(
                f"{path} is not signed by this server's checkpoint key ({public_hex(public)[:16]}...): it was "
                "changed or written by someone else; restore the file the server wrote, never edit it") from None
    return doc["body"]


def save(
    directory: str | os.PathLike[str],
    *,
    key: Ed25519PrivateKey,
    round_index: int,
    counter: int,
    arrays: ArrayRecord,
    state: Mapping[str, Any],
    optimizer: tuple[Mapping[str, Any], Mapping[str, np.ndarray]],
    audit_head: Mapping[str, Any] | None = None,
    aggregate: np.ndarray | None = None,
) -> None:
    """Commit round `round_index`: `arrays`, the JSON-able `state`, the server `optimizer` as
    ``(describe(), state_dict())`` and optionally the round's decoded `aggregate` (kept until the audit log
    has recorded it), signed with `key`; `counter` (greater than the last one) and `audit_head`
    (``{"seq", "sha256"}`` of the log's last entry) are bound to it. Older model files are removed after."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = f"model-{round_index:06d}.npz"
    names = list(arrays.keys())
    # Positional arrays (arr_0, arr_1, ...): array names may be anything, even savez's own keywords.
    # Then the optimizer's state arrays, then the aggregate: all covered by the model file's hash.
    config, opt_state = optimizer
    opt_names = list(opt_state)
    extra = [np.asarray(opt_state[k], dtype="<f8") for k in opt_names]
    extra += [] if aggregate is None else [np.asarray(aggregate, dtype="<f8")]
    hashing: list[_HashingWriter] = []

    def write(f: Any) -> None:
        hashing.append(w := _HashingWriter(f))
        np.savez(w, *(arrays[name].numpy() for name in names), *extra)

    _write_atomic(d / model, write)
    body = {**state, "version": VERSION, "round": round_index, "counter": counter, "model": model,
            "model_sha256": hashing[0].h.hexdigest(), "names": names, "aggregate": aggregate is not None,
            "optimizer": {"config": dict(config), "arrays": opt_names},
            "audit_head": None if audit_head is None else dict(audit_head)}
    _write_signed(d / _STATE, body, key)
    (d / _RELEASED).unlink(missing_ok=True)  # committed: the ledger in state.json has them now
    for old in d.glob("model-*.npz"):
        if old.name != model:
            old.unlink(missing_ok=True)


def touch(directory: str | os.PathLike[str], state: Mapping[str, Any], *, key: Ed25519PrivateKey,
          counter: int) -> None:
    """Rewrite the committed `state` (as :func:`load` returned it) with a new `counter` (a resume), signed."""
    _write_signed(Path(directory) / _STATE, {**state, "counter": counter}, key)


def record_release(directory: str | os.PathLike[str], event: Mapping[str, Any], *, key: Ed25519PrivateKey,
                   round_index: int) -> None:
    """Append the DP `event` of an aggregate just released to the write-ahead record (atomically, signed),
    tied to the committed round `round_index` it follows (0: none)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    events = released(d, key.public_key(), round_index=round_index) + [dict(event)]
    _write_signed(d / _RELEASED, {"round": round_index, "events": events}, key)


def released(directory: str | os.PathLike[str], public: Ed25519PublicKey | None, *,
             round_index: int) -> list[dict[str, Any]]:
    """DP events recorded ahead of a commit that has not happened (empty after every commit).

    Raises ConfigurationError for a record not signed by `public` or not following committed round `round_index`.
    """
    path = Path(directory) / _RELEASED
    if not path.is_symlink() and not path.exists():
        return []
    body = _read_signed(path, public)
    if not isinstance(body, dict) or set(body) != {"round", "events"} or not isinstance(body["events"], list) \
            or not all(isinstance(e, dict) for e in body["events"]):
        raise ConfigurationError(f"{path} is not a list of DP events")
    if isinstance(body["round"], int) and body["round"] < round_index:
        return []  # a commit after these releases took them into its ledger; the crash came before the unlink
    if body["round"] != round_index:
        raise ConfigurationError(f"{path} follows round {body['round']!r}, not the checkpoint's round {round_index}: "
                                 "it belongs to another state of the run; restore the files the server wrote")
    return list(body["events"])


def load(directory: str | os.PathLike[str], public: Ed25519PublicKey | None = None,
         ) -> tuple[Checkpoint, ArrayRecord, np.ndarray | None] | None:
    """The last committed ``(state, arrays, aggregate)`` in `directory`, or None when there is none.

    `public`: the key that must have signed it (None reads it unchecked: tests and inspection only).
    Raises ConfigurationError for a checkpoint that is not signed by `public`, malformed, or that this
    version cannot read.
    """
    loaded = load_all(directory, public)
    return None if loaded is None else loaded[:3]


def load_all(directory: str | os.PathLike[str], public: Ed25519PublicKey | None = None,
             ) -> tuple[Checkpoint, ArrayRecord, np.ndarray | None, dict[str, np.ndarray]] | None:
    """:func:`load` plus the server optimizer's state arrays by name (its ``state_dict()``); the
    optimizer's description is ``state["optimizer"]["config"]``."""
    d = Path(directory)
    if not (d / _STATE).is_symlink() and not (d / _STATE).exists():
        return None
    state = _read_signed(d / _STATE, public)
    _check_state(state, d)
    path = d / state["model"]
    with _open_regular(path) as f:  # hashed and loaded through one descriptor: no swap in between
        if _digest(f) != state["model_sha256"]:
            raise ConfigurationError(f"{path} is not the model file the checkpoint committed (SHA-256 differs)")
        return state, *_arrays(f, path, state)


def _arrays(f: Any, path: Path, state: Mapping[str, Any]) -> tuple[ArrayRecord, np.ndarray | None,
                                                                   dict[str, np.ndarray]]:
    try:
        with np.load(f, allow_pickle=False) as npz:
            arrays = ArrayRecord()
            for i, name in enumerate(state["names"]):
                arrays[name] = Array(np.ascontiguousarray(npz[f"arr_{i}"]))
            first = len(state["names"])
            opt_names = state["optimizer"]["arrays"]
            opt_state = {k: npz[f"arr_{first + i}"] for i, k in enumerate(opt_names)}
            aggregate = npz[f"arr_{first + len(opt_names)}"] if state["aggregate"] else None
    except (OSError, KeyError, ValueError) as e:
        raise ConfigurationError(f"cannot read the checkpoint's model {path}: {e}") from e
    return arrays, aggregate, opt_state


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_state(state: Any, d: Path) -> None:
    """ConfigurationError unless `state` has the fields and types a committed checkpoint has."""
    def bad(what: str) -> ConfigurationError:
        return ConfigurationError(f"the checkpoint in {d} is malformed: {what}; restore the file the server wrote")

    if not isinstance(state, dict):
        raise bad("state.json is not an object")
    if state.get("version") != VERSION:
        raise ConfigurationError(f"checkpoint {d} has version {state.get('version')!r}, expected {VERSION}")
    if not _is_int(state.get("round"), 1) or not _is_int(state.get("counter"), 1):
        raise bad("round and counter must be positive integers")
    if not isinstance(state.get("model"), str) or not _MODEL.fullmatch(state["model"]) or \
            state["model"] != f"model-{state['round']:06d}.npz":
        raise bad(f"model must be the plain file name model-{state['round']:06d}.npz, got {state.get('model')!r}")
    if not isinstance(state.get("model_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", state["model_sha256"]):
        raise bad("model_sha256 must be 64 hex digits")
    if not isinstance(state.get("names"), list) or not all(isinstance(n, str) for n in state["names"]):
        raise bad("names must be a list of strings")
    if not isinstance(state.get("aggregate"), bool):
        raise bad("aggregate must be true or false")
    opt = state.get("optimizer")
    if not (isinstance(opt, dict) and set(opt) == {"config", "arrays"} and isinstance(opt["config"], dict)
            and isinstance(opt["arrays"], list) and all(isinstance(n, str) for n in opt["arrays"])):
        raise bad("optimizer must be {config: object, arrays: list of names}")
    head = state.get("audit_head")
    if head is not None and not (isinstance(head, dict) and set(head) == {"seq", "sha256"} and
                                 _is_int(head["seq"], 1) and isinstance(head["sha256"], str) and
                                 re.fullmatch(r"[0-9a-f]{64}", head["sha256"])):
        raise bad("audit_head must be null or {seq >= 1, sha256: 64 hex digits}")
    cooldown = state.get("cooldown")
    if not isinstance(cooldown, dict) or not all(k.isdigit() and _is_int(v) for k, v in cooldown.items()):
        raise bad("cooldown must map node ids to round numbers")
    for field in ("history", "ledger"):
        if not isinstance(state.get(field), list) or not all(isinstance(x, dict) for x in state[field]):
            raise bad(f"{field} must be a list of objects")
    if len(state["history"]) != state["round"]:
        raise bad(f"the history has {len(state['history'])} rounds, the checkpoint is at round {state['round']}")
    for event in state["ledger"]:
        if not all(not isinstance(v, float) or math.isfinite(v) for v in event.values()):
            raise bad("a ledger event holds a non-finite number")
    if state.get("audit") is not None and not isinstance(state["audit"], dict):
        raise bad("audit must be null or an object")
