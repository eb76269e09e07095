"""Hypothesis strategies for request bodies generated from an app's OpenAPI document.

``operations(openapi)`` lists (method, path, body schema); ``body_strategy(schema, components)`` draws bodies
that follow the schema most of the time and break it some of the time (wrong types, missing required
fields, unknown fields, out-of-range numbers, non-object bodies), as a schema-driven fuzzer does.
:data:`hostile_fragments` are raw JSON values an attacker sends - lone surrogates, huge arrays, deep nesting -
for :func:`with_fragment` to splice into a drawn body.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from attention_backends import DECODE_METHODS, PREFILL_METHODS

METHOD_NAMES = sorted(set(PREFILL_METHODS) | set(DECODE_METHODS))

# Text with a lone surrogate (U+D800..U+DFFF; one not in a high+low pair): valid JSON as a \uXXXX escape,
# invalid Unicode.
_unicode = st.text(st.characters(codec="utf-8"), max_size=6)
surrogate_text = st.builds(lambda a, s, b: a + s + b, _unicode, st.characters(min_codepoint=0xD800,
                           max_codepoint=0xDFFF), _unicode)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), surrogate_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)

# Strings that exercise the sparse grammar (valid and not).
pattern_strings = st.one_of(
    st.sampled_from(METHOD_NAMES),
    st.builds(lambda m, r: f"{m}:{r}", st.sampled_from(METHOD_NAMES),
              st.one_of(st.integers(-2, 200).map(str), st.sampled_from(["nan", "inf", "1e309", "abc", "", "1.5"]))),
    st.builds(lambda a, b: f"{a}+{b}", st.sampled_from(METHOD_NAMES), st.sampled_from(METHOD_NAMES)),
    st.text(alphabet="abcdeqstuv_:+.0123456789", max_size=20),
)


def _param_values() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(-5, 5000), st.floats(-1, 2, allow_nan=False), st.booleans(),
                     st.sampled_from([8, 16, 32, 64, 128]), st.just("x"))


def _phase_object(methods: list[str]) -> st.SearchStrategy[Any]:
    def build(m: str) -> st.SearchStrategy[Any]:
        info = PREFILL_METHODS.get(m) or DECODE_METHODS.get(m)
        names = [p.name for p in info.params] + ["bogus"] if info else ["bogus"]
        return st.fixed_dictionaries(
            {"method": st.just(m)},
            optional={
                "compression_ratio": st.one_of(st.floats(0, 50, allow_nan=False), st.integers(-1, 50)),
                "params": st.dictionaries(st.sampled_from(names), _param_values(), max_size=3),
            },
        )

    return st.sampled_from(methods).flatmap(build)


pattern_objects = st.fixed_dictionaries(
    {}, optional={"prefill": _phase_object(METHOD_NAMES), "decode": _phase_object(METHOD_NAMES)}
)


def operations(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    ops = []
    for path, item in openapi["paths"].items():
        if "{" in path:
            continue
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ops.append((method.upper(), path, body))
    return ops


class SchemaStrategies:
    def __init__(self, components: dict[str, Any], overrides: dict[str, st.SearchStrategy[Any]] | None = None):
        self.defs = components.get("schemas", {})
        self.overrides = overrides or {}

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.defs[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def valid(self, schema: dict[str, Any], name: str = "", depth: int = 0) -> st.SearchStrategy[Any]:
        """Values following ``schema`` (approximately: enough to get past validation often)."""
        if name in self.overrides:
            return self.overrides[name]
        schema = self.resolve(schema)
        if depth > 5:
            return st.none()
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.valid(s, name, depth + 1) for s in schema[key]])
        if "allOf" in schema:
            return self.valid(schema["allOf"][0], name, depth + 1)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        t = schema.get("type")
        if isinstance(t, list):
            return st.one_of([self.valid({**schema, "type": x}, name, depth + 1) for x in t])
        if t == "string":
            examples = schema.get("examples") or []
            base = st.one_of(st.text(max_size=24), st.text(max_size=24), surrogate_text)
            return st.one_of(st.sampled_from(examples), base) if examples else base
        if t == "integer":
            lo = schema.get("minimum", schema.get("exclusiveMinimum", -(2**40)))
            hi = schema.get("maximum", schema.get("exclusiveMaximum", 2**40))
            if "exclusiveMinimum" in schema:
                lo += 1
            if "exclusiveMaximum" in schema:
                hi -= 1
            return st.integers(int(lo), int(hi))
        if t == "number":
            lo = schema.get("minimum", schema.get("exclusiveMinimum"))
            hi = schema.get("maximum", schema.get("exclusiveMaximum"))
            return st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                             exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema)
        if t == "boolean":
            return st.booleans()
        if t == "null":
            return st.none()
        if t == "array":
            items = schema.get("items", {})
            return st.lists(self.valid(items, name, depth + 1), min_size=schema.get("minItems", 0),
                            max_size=max(schema.get("minItems", 0), min(schema.get("maxItems", 3), 3)))
        if t == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if not props:
                return st.dictionaries(st.text(max_size=8), json_values, max_size=3)
            required = set(schema.get("required", []))
            return st.fixed_dictionaries(
                {k: self.valid(v, k, depth + 1) for k, v in props.items() if k in required},
                optional={k: self.valid(v, k, depth + 1) for k, v in props.items() if k not in required},
            )
        return json_values

    def body(self, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """Mostly schema-following bodies, sometimes broken ones."""
        resolved = self.resolve(schema)
        props = list(resolved.get("properties", {}))
        good = self.valid(schema)

        def break_field(d: Any, field: str, value: Any) -> Any:
            if isinstance(d, dict):
                d = dict(d)
                d[field] = value
            return d

        def drop_field(d: Any, field: str) -> Any:
            if isinstance(d, dict):
                d = {k: v for k, v in d.items() if k != field}
            return d

        broken = st.one_of(
            st.tuples(good, st.sampled_from(props or ["x"]), json_values).map(lambda t: break_field(*t)),
            st.tuples(good, st.sampled_from(props or ["x"])).map(lambda t: drop_field(*t)),
            st.tuples(good, st.text(max_size=10), json_values).map(lambda t: break_field(*t)),
            json_values,
        )
        return st.one_of(good, good, good, broken)


# Raw JSON values (text) too large or too deep to build as Python objects on the client.
hostile_fragments = st.one_of(
    surrogate_text.map(json.dumps),
    st.builds(lambda n, v: "[" + ",".join([v] * n) + "]", st.integers(10_000, 300_000),
              st.sampled_from(["0", '"a"', "[]", "{}", '[1,2]', '{"role":"user","content":"x"}'])),
    st.builds(lambda d, o, c: o * d + c * d, st.integers(100, 100_000), st.just("["), st.just("]")),
    st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(100, 50_000)),
    st.builds(lambda n: json.dumps("x" * n), st.integers(50_000, 1_000_000)),
)


def with_fragment(body: Any, field: str, fragment: str) -> bytes:
    """``body`` (a JSON object, or anything else, replaced by ``{}``) with ``field`` set to the raw ``fragment``."""
    base = {k: v for k, v in body.items() if k != field} if isinstance(body, dict) else {}
    head = json.dumps(base)[:-1]
    return (head + (", " if base else "") + json.dumps(field) + ": " + fragment + "}").encode()
