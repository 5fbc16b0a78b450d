"""The log format: canonical JSON, the line reader, and the schema kept in step with spec and code."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.audit.log import canonical, fast_check, iter_lines, json_safe, schema, validator
from securefed.errors import AbortReason
from securefed.protocols import DropReason

ROOT = Path(__file__).resolve().parents[2]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_is_a_fixed_point_and_ascii(obj):
    line = canonical(obj)
    assert canonical(json.loads(line)) == line
    assert line.isascii() and b"\n" not in line

    def sorted_pairs(pairs):
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys)
        return dict(pairs)

    assert json.loads(line, object_pairs_hook=sorted_pairs) == json.loads(line)


def test_canonical_refuses_nan():
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_json_safe_turns_nonfinite_into_null_and_tuples_into_lists():
    import numpy as np

    assert json_safe({"a": (1, np.float32(0.5)), "b": float("inf"), 3: np.int64(2)}) == {
        "a": [1, 0.5], "b": None, "3": 2}


@given(st.lists(st.binary(min_size=1, max_size=8).filter(lambda b: b"\n" not in b), min_size=1, max_size=5),
       st.booleans())
def test_iter_lines_numbers_lines_and_flags_a_torn_tail(lines, torn):
    data = b"".join(line + b"\n" for line in lines)
    if torn:
        data = data[:-1]
    got = list(iter_lines(data))
    assert [line for _, line, _ in got] == lines
    assert [n for n, _, _ in got] == list(range(1, len(lines) + 1))
    assert [c for _, _, c in got] == [True] * (len(lines) - 1) + [not torn]


def test_schema_file_is_the_schema_in_the_spec():
    spec = (ROOT / "protocols" / "audit.md").read_text()
    block = re.search(r"<!-- schema -->\s*```json\n(.*?)```", spec, re.DOTALL)
    assert block, "protocols/audit.md must embed the schema after <!-- schema -->"
    assert json.loads(block.group(1)) == schema()


def test_schema_enums_are_the_library_enums():
    defs = schema()["$defs"]
    assert defs["round"]["properties"]["dropped"]["items"]["properties"]["reason"]["enum"] == [
        r.value for r in DropReason]
    assert defs["round_aborted"]["properties"]["reason"]["enum"] == [r.value for r in AbortReason]


def test_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(schema())
    assert not validator().is_valid({"v": 1})


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def replacement(old):
    """Mostly a value of the old one's type (so that range, pattern and enum rules are what is tested)."""
    same = {str: st.text(alphabet="0123456789abcdefgTZ:-. _", max_size=130) | st.sampled_from(
                ["round", "resume", "run_end", "upload", "rdp", "0" * 64, "a" * 128, "2026-01-01T00:00:00Z"]),
            int: st.integers(-2, 3) | st.integers(), float: st.floats(-1, 2, allow_nan=False), bool: st.booleans()}
    return st.one_of(same.get(type(old), st.nothing()), json_values)


@given(st.data())
def test_per_type_and_compiled_checks_accept_exactly_what_the_schema_accepts(dp_log, data):
    import copy

    from tests.audit.helpers import lines_of

    entry = copy.deepcopy(data.draw(st.sampled_from(lines_of(dp_log.read_bytes()))))
    for _ in range(data.draw(st.integers(0, 3))):
        path = data.draw(st.sampled_from(list(paths(entry))[1:]))
        parent = entry
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(replacement(parent[path[-1]]))
    whole = validator().is_valid(entry)
    kinds = [k for k in ("run_start", "resume", "round", "round_aborted", "run_end") if entry.get("type") == k]
    for kind in kinds:
        assert validator(kind).is_valid(entry) == whole
        assert fast_check(kind)(entry) == whole
    if not kinds:
        assert not whole
