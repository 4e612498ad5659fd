"""The mapping format as a JSON Schema (draft 2020-12), for editors (SPEC §11).

Built from the key sets in etl.mapping.keys, which the validator reads too, so
a key the validator accepts is in the schema and a key it refuses is not. The
schema checks shape (keys, types, enums, exactly one of column/sql/const);
only `etl validate` checks what needs the database or the file name.
"""

from __future__ import annotations

from typing import Any

import orjson

from etl.mapping.keys import MAPPING, TRACK_ONLY, TRACK_REQUIRED, KeySet, Schema
from etl.model import EVENT_TYPES, REQUIRED_TRAITS

# The file name `etl init` writes the schema to, next to the mapping files.
SCHEMA_FILE = "mapping.schema.json"
SCHEMA_ID = "https://hyperengage.io/etl/mapping.schema.json"


def mapping_schema() -> dict[str, Any]:
    """The JSON Schema of one mapping file."""
    definitions: dict[str, Any] = {}
    root = _object(MAPPING, definitions)
    # The keys each kind requires (SPEC §4, §10): checked by the branch of the kind.
    root["required"] = [name for name in root["required"] if name in TRACK_REQUIRED]
    identify = [name for name in MAPPING.required if name not in TRACK_REQUIRED]
    track_only: dict[str, Any] = dict.fromkeys(TRACK_ONLY, False)
    root["allOf"] = [
        {
            "if": {"properties": {"kind": {"const": "track"}}, "required": ["kind"]},
            "then": {
                "required": [n for n in TRACK_REQUIRED if n not in root["required"]],
                "properties": {
                    "traits": False,
                    "event_type": {"not": {"enum": list(EVENT_TYPES)}},
                },
            },
            "else": {
                "required": identify,
                "properties": {"event_type": {"enum": list(EVENT_TYPES)}, **track_only},
            },
        },
        # SPEC §2: traits the API requires per event type; the validator checks the same table.
        *(
            {
                "if": {
                    "properties": {"event_type": {"const": event_type}},
                    "required": ["event_type"],
                },
                "then": {"properties": {"traits": {"required": list(required)}}},
            }
            for event_type, required in REQUIRED_TRAITS.items()
        ),
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "etl mapping file",
        **root,
        "$defs": dict(sorted(definitions.items())),
    }


def mapping_schema_text() -> str:
    """The schema as the indented JSON text `etl schema mapping` prints and `etl init` writes."""
    return orjson.dumps(mapping_schema(), option=orjson.OPT_INDENT_2).decode() + "\n"


def _object(key_set: KeySet, definitions: dict[str, Any]) -> dict[str, Any]:
    """A key set as a closed JSON Schema object."""
    schema: dict[str, Any] = {
        "description": key_set.doc,
        "type": "object",
        "properties": {
            key.name: {**_resolve(key.value, definitions), "description": key.doc}
            for key in key_set.keys
        },
        "additionalProperties": False,
    }
    if key_set.required:
        schema["required"] = list(key_set.required)
    if key_set.rules:
        schema.update(_resolve(key_set.rules, definitions))
    return schema


def _resolve(value: Schema | KeySet, definitions: dict[str, Any]) -> dict[str, Any]:
    """A schema fragment with every KeySet in it replaced by a $ref to its definition."""
    if isinstance(value, KeySet):
        if value.name not in definitions:
            definitions[value.name] = {}  # placeholder: a key set may refer to itself
            definitions[value.name] = _object(value, definitions)
        return {"$ref": f"#/$defs/{value.name}"}
    return {name: _resolve_any(item, definitions) for name, item in value.items()}


def _resolve_any(item: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(item, KeySet | dict):
        return _resolve(item, definitions)
    if isinstance(item, list):
        return [_resolve_any(element, definitions) for element in item]
    return item
