"""Whether any finite JSON value matches a JSON schema whose `$ref`s recurse.

llguidance compiles a schema such as `{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}`
without a complaint, yet no finite value matches it: every `a` needs another `a`. Generation then stops after a
token or two (`{"`) with finish_reason "stop". `check_terminates` finds such schemas before a request is queued.

The check is a least fixed point over the document's local `$ref` targets: a target is satisfiable once its schema
is, counting only targets already known satisfiable. A schema is satisfiable when its types allow a scalar, or an
object whose required properties are all satisfiable, or an array whose first `minItems` items are; `allOf` needs
every branch, `anyOf`/`oneOf` one. Keywords it does not model (`not`, `if`, `pattern`, remote `$ref`s, ...) count as
satisfiable, so it never refuses a schema that has a finite instance; llguidance reports the unsatisfiable
constraints it knows itself (`minimum` above `maximum`, an empty `enum`, ...).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

MAX_REFS = 1_000  # schemas with more distinct `$ref`s are not checked (the fixed point costs refs x schema size)
SCALAR_TYPES = frozenset({"null", "boolean", "number", "integer", "string"})


def _local_refs(node: Any, found: set[str]) -> None:
    """Every `$ref` string starting with '#' in the document."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _resolve(root: Any, ref: str) -> Any:
    """The subschema a local JSON-pointer `$ref` names; None when it names none (anchors, bad pointers)."""
    pointer = unquote(ref[1:])
    if pointer and not pointer.startswith("/"):
        return None
    node = root
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


class _Satisfiability:
    """The fixed point over one schema document (see the module docstring)."""

    def __init__(self, root: Any, refs: set[str]) -> None:
        self.root = root
        self.known = {ref: False for ref in refs}  # ref -> a finite value is known to match its target

    def solve(self) -> None:
        """Mark every ref target that a finite value matches (the least fixed point)."""
        changed = True
        while changed:
            changed = False
            for ref, satisfiable in self.known.items():
                target = _resolve(self.root, ref)   # None: a target llguidance itself reports
                if not satisfiable and (target is None or self.satisfiable(target)):
                    self.known[ref] = changed = True

    def satisfiable(self, node: Any) -> bool:
        """Whether a finite value matches `node`, given the refs known satisfiable so far."""
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str) and not self.known.get(ref, True):
            return False
        if not all(self.satisfiable(branch) for branch in _list(node.get("allOf"))):
            return False
        for key in ("anyOf", "oneOf"):
            if key in node and not any(self.satisfiable(branch) for branch in _list(node[key])):
                return False
        types = node.get("type")
        if types is None:
            return True
        types = {types} if isinstance(types, str) else set(_list(types))
        return bool(types & SCALAR_TYPES) or ("object" in types and self._object(node)) or (
            "array" in types and self._array(node))

    def _object(self, node: dict) -> bool:
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in _list(node.get("required")):
            if name in properties:
                schema = properties[name]
            elif node.get("patternProperties"):
                continue   # the name may match a pattern: not modeled
            else:
                schema = node.get("additionalProperties", True)
            if not self.satisfiable(schema):
                return False
        return True

    def _array(self, node: dict) -> bool:
        min_items = node.get("minItems", 0)
        if not isinstance(min_items, int) or min_items <= 0:
            return True
        items = node.get("items", True)
        prefix = node.get("prefixItems")
        if isinstance(items, list):   # draft 4-7 tuple form
            prefix, items = items, node.get("additionalItems", True)
        prefix = _list(prefix)
        needed = prefix[:min_items] + ([items] if min_items > len(prefix) else [])
        return all(self.satisfiable(schema) for schema in needed)

    def unsatisfiable_refs(self) -> list[str]:
        """The refs no finite value matches, after `solve`."""
        return sorted(ref for ref, satisfiable in self.known.items() if not satisfiable)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def check_terminates(schema: Any) -> None:
    """ValueError when no finite JSON value matches `schema` because a `$ref` recursion never ends."""
    refs: set[str] = set()
    _local_refs(schema, refs)
    if not refs or len(refs) > MAX_REFS:
        return
    solver = _Satisfiability(schema, refs)
    try:
        solver.solve()
        satisfiable = solver.satisfiable(schema)
    except RecursionError:   # nested deeper than Python recurses: not checked
        return
    if not satisfiable:
        names = ", ".join(repr(ref) for ref in solver.unsatisfiable_refs()[:3])
        raise ValueError(f"no finite JSON value matches this schema: the recursion through {names} never ends "
                         "(a required property or minItems always asks for one more level)")
