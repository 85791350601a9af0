"""Varied JSON schemas for structured-output tests: every kind of field constrained decoding must honour, each
bounded (lengths, ranges, item counts) so that a random model's document ends within a few hundred tokens."""

from __future__ import annotations

import random

_FIELDS = [
    lambda r: {"type": "string", "maxLength": r.randint(1, 12)},
    lambda r: {"type": "string", "minLength": 2, "maxLength": 6},
    lambda r: {"type": "integer", "minimum": -r.randint(0, 50), "maximum": r.randint(0, 1000)},
    lambda r: {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},  # bounded decimals
    lambda r: {"type": "boolean"},
    lambda r: {"enum": r.sample(["red", "green", "blue", "cat", "dog", 7, None, True], r.randint(1, 4))},
    lambda r: {"const": "fixed"},
    lambda r: {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    lambda r: {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    lambda r: {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
    lambda r: {"type": "string", "pattern": "^[a-z]{1,8}$"},
    lambda r: {"type": "string", "enum": ["2024-01-01", "1999-12-31"]},
]


def schema(seed: int, depth: int = 0) -> dict:
    """An object schema with 1-4 properties of varied kinds, some required, maybe a nested object."""
    r = random.Random(seed)
    props = {}
    for i in range(r.randint(1, 4)):
        if depth == 0 and r.random() < 0.2:
            props[f"obj{i}"] = schema(seed * 31 + i, depth + 1)
        else:
            props[f"f{i}"] = r.choice(_FIELDS)(r)
    required = [k for k in props if r.random() < 0.7] or [next(iter(props))]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
