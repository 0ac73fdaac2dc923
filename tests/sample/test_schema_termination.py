"""`check_terminates`: JSON schemas whose `$ref` recursion leaves no finite value are refused, no other."""

from __future__ import annotations

import pytest

from mistralrs.sample.schema_termination import check_terminates

NODE = {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}
ENDLESS = {
    "required self": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "$defs": {"$defs": {"node": NODE}, "$ref": "#/$defs/node"},
    "definitions": {"definitions": {"x": {"type": "object", "properties": {"y": {"$ref": "#/definitions/x"}},
                                          "required": ["y"]}}, "$ref": "#/definitions/x"},
    "non-empty array": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    "prefixItems": {"type": "array", "prefixItems": [{"$ref": "#"}], "minItems": 1},
    "mutual": {"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                         "b": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 2}},
               "$ref": "#/$defs/a"},
    "every branch": {"anyOf": [{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
                               {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]},
    "allOf": {"allOf": [{"type": "object"}, {"$ref": "#/$defs/node"}], "$defs": {"node": NODE}},
    "escaped pointer": {"$defs": {"a/b": {"type": "object", "properties": {"c": {"$ref": "#/$defs/a~1b"}},
                                          "required": ["c"]}}, "$ref": "#/$defs/a~1b"},
}
FINITE = {
    "optional self": {"type": "object", "properties": {"a": {"$ref": "#"}}},
    "a base case": {"anyOf": [{"type": "null"}, ENDLESS["required self"] | {"properties": {"a": {"$ref": "#"}}}]},
    "nullable": {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "untyped": {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "tree": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
             "required": ["children"]},
    "linked list": {"$defs": {"node": {"type": "object", "properties": {"next": {
        "anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"]}}, "$ref": "#/$defs/node"},
    "pattern properties": {"type": "object", "patternProperties": {"^a": {"type": "string"}},
                           "properties": {"b": {"$ref": "#"}}, "required": ["a1"]},
    "remote ref": {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}, "required": ["a"]},
    "no refs": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
}


@pytest.mark.parametrize("name", ENDLESS)
def test_endless_recursions_are_refused(name):
    with pytest.raises(ValueError, match="no finite JSON value matches this schema: the recursion through '#"):
        check_terminates(ENDLESS[name])


@pytest.mark.parametrize("name", FINITE)
def test_schemas_with_finite_values_pass(name):
    check_terminates(FINITE[name])
