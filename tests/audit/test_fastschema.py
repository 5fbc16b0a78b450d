"""The compiled schema check agrees with jsonschema on random schemas of its subset and random values."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from securefed.audit._fastschema import compile_schema

KEYS = st.sampled_from(["a", "b", "c"])
scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.0, 1.0, -1.5, 2.5])
           | st.sampled_from(["", "a", "0f", "zz", "0f0f"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=10)
TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]


KEYWORDS = {
    "type": st.sampled_from(TYPES) | st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True),
    "const": scalars,
    "enum": st.lists(scalars, min_size=1, max_size=3),
    "pattern": st.sampled_from(["^[0-9a-f]{2}$", "^a", "f"]),
    "minimum": st.integers(-2, 2),
    "exclusiveMinimum": st.integers(-2, 2),
    "exclusiveMaximum": st.integers(-2, 2),
    "minLength": st.integers(0, 3),
    "minItems": st.integers(0, 3),
    "uniqueItems": st.booleans(),
    "required": st.lists(KEYS, max_size=2, unique=True),
    "description": st.just("annotation"),
}


def schemas():
    """Schemas of one to three keywords of the subset, nested through items/properties/additionalProperties."""
    def some(strategies):
        return st.lists(st.sampled_from(sorted(strategies)), min_size=1, max_size=3, unique=True).flatmap(
            lambda keys: st.fixed_dictionaries({k: strategies[k] for k in keys}))

    return st.recursive(some(KEYWORDS), lambda inner: some({
        **KEYWORDS, "items": inner, "properties": st.dictionaries(KEYS, inner, max_size=2),
        "additionalProperties": st.booleans() | inner,
    }), max_leaves=6)


#: Values at the edges of the keywords, tried against every generated schema.
BATTERY = [None, True, False, 0, 1, -1, 2, -3, 1.0, 2.0, 0.5, -1.5, "", "a", "0f", "zz", "fa",
           [], [1], [1, True], [1, 1.0], [1, 1], [True, False], ["a", "a"], [[1], [1.0]], [{"a": 1}, {"a": True}],
           {}, {"a": 1}, {"a": True}, {"a": "x", "b": 1}, {"c": None}, {"a": [1, 2], "b": {"a": 1}}]


@given(schemas(), st.lists(values, max_size=8))
def test_compiled_check_agrees_with_jsonschema(schema, instances):
    check = compile_schema(schema)
    reference = Draft202012Validator(schema)
    for x in BATTERY + instances:
        assert check(x) == reference.is_valid(x), (schema, x)


SINGLE = ([{"type": t} for t in TYPES] + [{"type": ["integer", "string"]}, {"type": ["null", "object"]}]
          + [{"const": v} for v in BATTERY] + [{"enum": [v, "a"]} for v in BATTERY]
          + [{k: b} for k in ("minimum", "exclusiveMinimum", "exclusiveMaximum") for b in (-1, 0, 1, 1.5)]
          + [{"minLength": k} for k in (0, 1, 2)] + [{"minItems": k} for k in (0, 1, 2)]
          + [{"uniqueItems": True}, {"uniqueItems": False}, {"required": ["a"]}, {"required": ["a", "b"]},
             {"pattern": "^[0-9a-f]{2}$"}, {"pattern": "a"}, {"items": {"type": "integer"}},
             {"properties": {"a": {"type": "integer"}}}, {"additionalProperties": False},
             {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}])


@pytest.mark.parametrize("schema", SINGLE, ids=str)
def test_each_keyword_alone_agrees_with_jsonschema_on_edge_values(schema):
    check, reference = compile_schema(schema), Draft202012Validator(schema)
    assert [check(x) for x in BATTERY] == [reference.is_valid(x) for x in BATTERY]


@pytest.mark.parametrize("schema, x, ok", [
    ({"type": "integer"}, True, False), ({"type": "integer"}, 2.0, True), ({"type": "number"}, False, False),
    ({"const": 1}, True, False), ({"enum": [0]}, False, False), ({"const": 1}, 1.0, True),
    ({"uniqueItems": True}, [1, True], True), ({"uniqueItems": True}, [1, 1.0], False),
    ({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, {"a": "x", "b": 1}, False),
    ({"minimum": 0}, "negative? no: a string", True),
])
def test_json_schema_corner_cases(schema, x, ok):
    assert compile_schema(schema)(x) is ok
    assert Draft202012Validator(schema).is_valid(x) is ok


def test_keywords_outside_the_subset_are_refused():
    with pytest.raises(ValueError, match="oneOf"):
        compile_schema({"oneOf": [{"type": "null"}]})
    with pytest.raises(ValueError, match=r"\$ref"):
        compile_schema({"items": {"$ref": "#/$defs/x"}})
