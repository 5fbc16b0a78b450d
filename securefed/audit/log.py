"""The audit log's format: canonical JSON lines, the hash chain, the signed bytes and the schema.

One entry per line, each line the canonical JSON of one object (sorted keys, no
spaces, ASCII only, no NaN), ended by ``\\n``. An entry's hash is SHA-256 of its
line without the newline; the next entry carries it in ``prev``. ``sig`` is an
Ed25519 signature over ``SIGNING_CONTEXT`` followed by the canonical JSON of the
entry without ``sig``. See ``protocols/audit.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "KINDS",
    "MAX_DEPTH",
    "SIGNING_CONTEXT",
    "canonical",
    "conforms",
    "entry_hash",
    "entry_schema",
    "fast_check",
    "iter_lines",
    "json_safe",
    "nesting_depth",
    "parse_line",
    "read_entries",
    "schema",
    "schema_errors",
    "signed_bytes",
    "validator",
]

#: The ``v`` field of every entry.
FORMAT_VERSION = 1
#: ``prev`` of the first entry.
GENESIS = "0" * 64
#: Domain separation: an audit signature can never be mistaken for any other Ed25519 signature.
SIGNING_CONTEXT = b"securefed/audit/v1\n"
#: The entry types, in the order a session uses them.
KINDS = ("run_start", "resume", "release", "round", "round_aborted", "round_skipped", "run_end")
#: The deepest nesting of arrays and objects a line may have (the writer's entries have 5 levels).
#: A deeper line is not an entry; the cap keeps parsing and checking far from Python's recursion limit.
MAX_DEPTH = 64
_TOO_DEEP = f"arrays and objects nested deeper than {MAX_DEPTH} levels"


def nesting_depth(obj: Any) -> int:
    """How deeply the mappings and lists (or tuples) of `obj` nest, 0 for a scalar; iterative, so any depth
    is safe; stops counting once past MAX_DEPTH."""
    deepest, stack = 0, [(obj, 1)]
    while stack and deepest <= MAX_DEPTH:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, (list, tuple)) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children if isinstance(c, (Mapping, list, tuple)))
    return deepest


def parse_line(line: bytes, **loads_options: Any) -> Any:
    """``json.loads(line, **loads_options)``, refusing (ValueError) a line nested deeper than MAX_DEPTH."""
    try:
        obj = json.loads(line, **loads_options)
    except RecursionError:  # the C parser stops near Python's recursion limit; nothing deeper is an entry
        raise ValueError(_TOO_DEEP) from None
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and nesting_depth(obj) > MAX_DEPTH:  # count: cheap bound
        raise ValueError(_TOO_DEEP)
    return obj


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte string that represents `obj` in the log (raises ValueError for NaN/Inf, or nesting
    deeper than MAX_DEPTH: the writer never writes a line the verifier refuses)."""
    if nesting_depth(obj) > MAX_DEPTH:
        raise ValueError(_TOO_DEEP)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signed_bytes(entry: Mapping[str, Any]) -> bytes:
    """What the audit key signs for `entry`: the context and the entry without ``sig``."""
    return SIGNING_CONTEXT + canonical({k: v for k, v in entry.items() if k != "sig"})


def entry_hash(line: bytes) -> str:
    """SHA-256 (hex) of one line of the log, without its newline: the next entry's ``prev``."""
    return hashlib.sha256(line).hexdigest()


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists, numpy scalars as Python numbers and non-finite floats as None.

    For free-form fields (configuration, metrics) that must survive canonical JSON.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """``(entry_number, line, complete)`` for each line of `data`; entries count from 1.

    ``complete`` is False only for a last line without its newline (a torn write).
    """
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            yield number, data[start:], False
            return
        yield number, data[start:end], True
        start, number = end + 1, number + 1


def read_entries(data: bytes) -> list[dict[str, Any]]:
    """The entries of a log that parse as JSON objects, in order (for reports: no checks)."""
    out = []
    for _, line, complete in iter_lines(data):
        if not complete:
            break
        try:
            obj = parse_line(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one entry, ``securefed/audit/schema.json``."""
    text = resources.files("securefed.audit").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def validator(kind: str | None = None) -> Any:
    """A ``jsonschema`` validator of :func:`schema`, or of :func:`entry_schema` for `kind`
    (``jsonschema`` is installed with ``securefed[audit]``; writing and verifying do not need
    it: they use :func:`fast_check`, :func:`conforms` and :func:`schema_errors`)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema() if kind is None else entry_schema(kind))


@functools.cache
def fast_check(kind: str) -> Callable[[Any], bool]:
    """``entry -> bool``: whether :func:`entry_schema` for `kind` accepts it, compiled (about 10x
    faster than ``jsonschema``, and checked against it by the tests)."""
    from securefed.audit._fastschema import compile_schema

    return compile_schema(entry_schema(kind))


def conforms(entry: Any) -> bool:
    """Whether :func:`schema` accepts `entry`, by the compiled check (no ``jsonschema`` needed)."""
    kind = entry.get("type") if isinstance(entry, dict) else None
    return isinstance(kind, str) and kind in KINDS and fast_check(kind)(entry)


def schema_errors(entry: Any, limit: int = 5) -> list[tuple[str, str, Any]]:
    """Why :func:`schema` rejects `entry`: up to `limit` ``(field, rule, found)``; empty if it accepts.

    ``jsonschema`` (the reference, ``securefed[audit]``) decides and words the errors when it is
    installed; without it the compiled check decides and :func:`securefed.audit._fastschema.explain`
    names the fields.
    """
    try:
        full = validator()
    except ImportError:
        if conforms(entry):
            return []
        from securefed.audit._fastschema import explain

        kind = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(kind, str) and kind in KINDS:
            return explain(entry_schema(kind), entry)[:limit]
        envelope = entry_schema("run_start")  # the envelope's rules, with any type and any body
        envelope["properties"].update(type=schema()["properties"]["type"], body={"type": "object"})
        return explain(envelope, entry)[:limit]
    errors = sorted(full.iter_errors(entry), key=lambda e: list(map(str, e.absolute_path)))
    return [(".".join(str(p) for p in e.absolute_path) or "(entry)", f"{e.validator} {_brief(e.validator_value)}",
             e.instance) for e in errors[:limit]]


def _brief(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def entry_schema(kind: str) -> dict[str, Any]:
    """What :func:`schema` requires of an entry of type `kind`, without ``if``/``then`` and with
    every ``$ref`` inlined (the schema has no recursion): same accepted entries of that type."""
    full = schema()
    defs = full["$defs"]
    envelope = _inline({k: v for k, v in full.items() if k not in ("allOf", "$defs")}, defs)
    envelope["properties"]["type"] = {"const": kind}
    envelope["properties"]["body"] = _inline(defs[kind], defs)
    return envelope


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node
