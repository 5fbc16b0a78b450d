"""A compiled yes/no check for the subset of JSON Schema the audit schema uses.

``jsonschema`` (the reference, and the source of every error message) spends most of a
verification in per-keyword dispatch: about 7 s for a 1,000-round SecAgg+ log. This
compiles the (``$ref``-free) per-type schemas once into nested closures with the same
semantics as ``jsonschema``'s draft 2020-12 validator for these keywords (bool is not a
number, 1.0 is an integer, const/enum/uniqueItems compare bool apart from 0 and 1).
A keyword outside the subset raises at compile time, so the schema cannot outgrow it
silently. ``tests/audit/test_log.py`` checks agreement with ``jsonschema`` on random entries.
:func:`explain` names the failing fields when ``jsonschema`` is not installed.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["compile_schema", "explain"]

Check = Callable[[Any], bool]

_ANNOTATIONS = {"$schema", "$id", "title", "description"}


def _bounded(cmp: Callable[[Any, Any], bool], bound: Any) -> Check:
    return lambda x: not _is_number(x) or cmp(x, bound)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_TYPES: dict[str, Check] = {
    "null": lambda x: x is None,
    "boolean": lambda x: isinstance(x, bool),
    "integer": lambda x: (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer()),
    "number": _is_number,
    "string": lambda x: isinstance(x, str),
    "array": lambda x: isinstance(x, list),
    "object": lambda x: isinstance(x, dict),
}


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: True and 1 differ; 1 and 1.0 do not."""
    if isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _unique(items: list[Any]) -> bool:
    if all(_is_number(x) for x in items) or all(isinstance(x, str) for x in items):
        return len(set(items)) == len(items)
    return all(not _equal(items[i], items[j]) for i in range(len(items)) for j in range(i))


def compile_schema(schema: Mapping[str, Any]) -> Check:
    """A function ``instance -> bool`` equivalent to validating `schema` (no ``$ref``, ``allOf``, ``if``)."""
    checks: list[Check] = []
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "const", "enum", "pattern", "minimum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
        "minItems", "uniqueItems", "required", "properties", "additionalProperties", "items"}
    if unknown:
        raise ValueError(f"keywords outside the compiled subset: {sorted(unknown)}")
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        tests = [_TYPES[t] for t in types]
        checks.append(tests[0] if len(tests) == 1 else lambda x: any(t(x) for t in tests))
    if "const" in schema:
        const = schema["const"]
        checks.append(lambda x: _equal(x, const))
    if "enum" in schema:
        options = list(schema["enum"])
        checks.append(lambda x: any(_equal(x, o) for o in options))
    if "pattern" in schema:
        search = re.compile(schema["pattern"]).search
        checks.append(lambda x: not isinstance(x, str) or search(x) is not None)
    for key, cmp in (("minimum", operator.ge), ("exclusiveMinimum", operator.gt), ("exclusiveMaximum", operator.lt)):
        if key in schema:
            checks.append(_bounded(cmp, schema[key]))
    if "minLength" in schema:
        n = schema["minLength"]
        checks.append(lambda x: not isinstance(x, str) or len(x) >= n)
    if "minItems" in schema:
        n_items = schema["minItems"]
        checks.append(lambda x: not isinstance(x, list) or len(x) >= n_items)
    if schema.get("uniqueItems"):
        checks.append(lambda x: not isinstance(x, list) or _unique(x))
    if "items" in schema:
        item = compile_schema(schema["items"])

        def items(x: Any) -> bool:
            if isinstance(x, list):
                for v in x:
                    if not item(v):
                        return False
            return True
        checks.append(items)
    if "required" in schema:
        required = list(schema["required"])
        checks.append(lambda x: not isinstance(x, dict) or all(k in x for k in required))
    props = {k: compile_schema(v) for k, v in schema.get("properties", {}).items()}
    extra = schema.get("additionalProperties", True)
    extra_check = None if isinstance(extra, bool) else compile_schema(extra)
    if props or extra is not True:
        def objects(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            for k, v in x.items():
                check = props.get(k)
                if check is not None:
                    if not check(v):
                        return False
                elif extra is False or (extra_check is not None and not extra_check(v)):
                    return False
            return True
        checks.append(objects)
    if len(checks) == 1:
        return checks[0]

    def every(x: Any) -> bool:
        for c in checks:  # a plain loop: all() over a generator is slower on this hot path
            if not c(x):
                return False
        return True
    return every


def explain(schema: Mapping[str, Any], instance: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """Why `instance` fails `schema`: ``(field, rule, found)`` for the innermost failing parts.

    Coarser than ``jsonschema``'s errors (a failing leaf is named with its whole sub-schema), but
    needs nothing outside the package, so a plain install can say which field is wrong.
    Empty when `instance` passes.
    """
    if compile_schema(schema)(instance):
        return []
    here = path or "(entry)"
    out: list[tuple[str, str, Any]] = []
    props = schema.get("properties", {})
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                out.append((_join(path, key), "a required field", "nothing"))
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                out.extend(explain(props[key], value, _join(path, key)))
            elif extra is False:
                out.append((_join(path, key), f"only the fields {sorted(props)}", "an unknown field"))
            elif isinstance(extra, Mapping):
                out.extend(explain(extra, value, _join(path, key)))
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            out.extend(explain(schema["items"], value, _join(path, str(i))))
    if not out:  # the failure is at this level: name the rule it breaks
        rule = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and k not in ("properties", "items")}
        out.append((here, json.dumps(rule, sort_keys=True), instance))
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
