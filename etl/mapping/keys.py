"""Every key a mapping file accepts, declared once (SPEC §4, §11).

The validator (`etl.mapping.fields.check_keys`, `etl.mapping.parse`) takes its
allowed and required keys from the `KeySet`s here, and `etl.mapping.schema`
turns the same `KeySet`s into the JSON Schema that `etl schema mapping` prints,
so the two cannot drift. A new mapping key goes here, with the JSON Schema of
its value and one line of documentation; `tests/test_schema.py` checks that the
validator and the schema agree.

A value's schema is plain JSON Schema, except that a `KeySet` may stand where a
schema is expected: it becomes a `$ref` to that key set's definition.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from etl.model import STREAM_KINDS, TRAIT_TYPES

# A JSON Schema fragment, possibly holding KeySets (see the module docstring).
Schema = dict[str, Any]


@dataclass(frozen=True)
class Key:
    """One key of a YAML mapping: its name, the schema of its value, what it is for,
    and, if it must be present, the fix to show when it is missing."""

    name: str
    value: Schema | KeySet
    doc: str
    missing_fix: str | None = None

    @property
    def required(self) -> bool:
        return self.missing_fix is not None


@dataclass(frozen=True)
class KeySet:
    """The keys one YAML mapping (the file, `source:`, a value source, ...) accepts.

    `rules` are extra JSON Schema constraints on the whole mapping (e.g. exactly
    one of column/sql/const) that the validator checks in code.
    """

    name: str
    doc: str
    keys: tuple[Key, ...]
    rules: Schema | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    @property
    def required(self) -> dict[str, str]:
        """Required key -> the fix when it is missing."""
        return {key.name: key.missing_fix for key in self.keys if key.missing_fix is not None}

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


_TEXT: Schema = {"type": "string", "minLength": 1}
_OPTIONAL_TEXT: Schema = {"oneOf": [_TEXT, {"type": "null"}]}
_DURATION: Schema = {
    "description": "30s, 10m, 2h, 1d, or a number of seconds",
    "oneOf": [
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[smhd]?\s*$"},
        {"type": "number", "minimum": 0},
    ],
}
_PLAIN_VALUE: Schema = {
    "oneOf": [
        {"type": ["string", "number", "boolean"]},
        {"type": "array", "items": {"type": "string"}},
    ]
}

FIELD = KeySet(
    name="field",
    doc="A value source: exactly one of column, sql, const, and optional type, default, "
    "omit_null, encoding.",
    keys=(
        Key("column", _TEXT, "a column of the source (quoted for you)"),
        Key("sql", _TEXT, "an SQL expression the database evaluates"),
        Key("const", _PLAIN_VALUE, "the same value on every record"),
        Key("type", {"enum": list(TRAIT_TYPES)}, "the value's type; inferred otherwise"),
        Key("default", {"oneOf": [*_PLAIN_VALUE["oneOf"], {"type": "null"}]}, "used when NULL"),
        Key("omit_null", {"type": "boolean"}, "default true: a NULL value is left out"),
        Key("encoding", _TEXT, "with type: text, the codec that decodes binary columns"),
    ),
    rules={
        "oneOf": [{"required": ["column"]}, {"required": ["sql"]}, {"required": ["const"]}],
        "dependentSchemas": {
            "encoding": {"properties": {"type": {"const": "text"}}, "required": ["type"]},
            "const": {"properties": {"const": {"not": {"type": "null"}}}},
        },
    },
)

# A column name, or a value source mapping.
_VALUE: Schema = {"oneOf": [_TEXT, FIELD]}
_OPTIONAL_VALUE: Schema = {"oneOf": [_TEXT, FIELD, {"type": "null"}]}

SOURCE = KeySet(
    name="source",
    doc="Where rows come from: exactly one of table (with optional schema) or query.",
    keys=(
        Key("table", _TEXT, "a table name (quoted for you)"),
        Key("schema", _OPTIONAL_TEXT, "the table's schema"),
        Key("where", _OPTIONAL_TEXT, "a raw SQL filter, run read-only"),
        Key("query", _TEXT, "any SELECT/WITH query; it is wrapped as a subquery"),
    ),
    rules={
        "oneOf": [{"required": ["table"]}, {"required": ["query"]}],
    },
)

RELATED = KeySet(
    name="related",
    doc="A table (or query) whose changes re-send records of this stream (SPEC §9): "
    "read incrementally for keys only, by its own cursor.",
    keys=(
        Key("table", _TEXT, "a table holding this stream's key (e.g. memberships)"),
        Key("schema", _OPTIONAL_TEXT, "the table's schema"),
        Key("where", _OPTIONAL_TEXT, "a raw SQL filter on the related rows"),
        Key("query", _TEXT, "or a SELECT returning the key and cursor columns"),
        Key(
            "key",
            {
                "oneOf": [
                    _TEXT,
                    {"type": "array", "items": _TEXT, "minItems": 1, "uniqueItems": True},
                ]
            },
            "the column(s) holding this stream's key, as many and in the same order as `key`",
            missing_fix="add key: the column(s) holding this stream's key, e.g. user_id",
        ),
        Key(
            "cursor",
            _TEXT,
            "the related rows' own updated_at-like column; it gets its own watermark",
            missing_fix="add cursor: the column that moves when a row changes, e.g. updated_at",
        ),
        Key("lookback", _DURATION, "its own re-read window; default: the stream's lookback"),
    ),
    rules={
        "oneOf": [{"required": ["table"]}, {"required": ["query"]}],
    },
)

ON_GONE = KeySet(
    name="on_gone",
    doc="What to send, once, for a record sent before and now gone (SPEC §9).",
    keys=(
        Key(
            "traits",
            {"type": "object", "minProperties": 1, "additionalProperties": _PLAIN_VALUE},
            "traits merged into the last-sent payload; constants, not ids or required traits",
            missing_fix="write on_gone: {traits: {deleted: true}}",
        ),
    ),
)

MAPPING = KeySet(
    name="mapping",
    doc="One etl mapping file: one stream of identify events (SPEC §4), or of track events "
    "with `kind: track` (SPEC §10).",
    keys=(
        Key(
            "event_type",
            # narrowed by kind in etl.mapping.schema: identify names, or a track event's name
            {"oneOf": [_TEXT, FIELD]},
            "user_identify or account_identify; for kind: track the event's name, or "
            "{column: ...} / {sql: ...} for a name per row",
            missing_fix="add event_type: user_identify or event_type: account_identify",
        ),
        Key(
            "source",
            SOURCE,
            "where rows come from",
            missing_fix='add source: {table: NAME} or source: {query: "SELECT ..."}',
        ),
        Key(
            "key",
            {
                "oneOf": [
                    _TEXT,
                    {"type": "array", "items": _TEXT, "minItems": 1, "uniqueItems": True},
                ]
            },
            "column, or list of columns, unique per record",
            missing_fix="add key: COLUMN (or a list of columns) that identifies one record",
        ),
        Key(
            "user_id",
            _VALUE,
            "the user id (account streams: the owner/creator user id)",
            missing_fix="add user_id: COLUMN holding the user id (account streams: the owner's)",
        ),
        Key(
            "account_id",
            _VALUE,
            "the account (workspace) id",
            missing_fix="add account_id: COLUMN holding the account id",
        ),
        Key(
            "traits",
            {"type": "object", "minProperties": 1, "additionalProperties": _VALUE},
            "trait name -> value source",
            missing_fix="add traits: mapping trait names to columns",
        ),
        Key(
            "stream",
            {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"},
            "the stream name; default: the file name without extension",
        ),
        Key(
            "cursor",
            _OPTIONAL_TEXT,
            "updated_at-like timestamp or integer column; without it every sync diffs every row",
        ),
        Key("lookback", _DURATION, "re-read window below the watermark, default 10m"),
        Key("timezone", _TEXT, "IANA zone of naive timestamps, default UTC"),
        Key("anonymous_id", _OPTIONAL_VALUE, "sent as an empty string when absent"),
        Key("url", _OPTIONAL_VALUE, "omitted when absent"),
        Key(
            "related",
            {"type": "array", "items": RELATED, "minItems": 1},
            "tables whose changes re-send records of this stream",
        ),
        Key(
            "full_every",
            {"oneOf": [_DURATION, {"const": "never"}]},
            "a sync becomes a full read when the last one is older than this; default 7d",
        ),
        Key("on_gone", ON_GONE, "sent once for a record sent before and now gone"),
        Key(
            "kind",
            {"enum": list(STREAM_KINDS)},
            "identify (the default) or track: one event per row of an append-only table",
        ),
        Key("timestamp", _VALUE, "kind: track: when the event happened, sent as utc_time"),
        Key(
            "properties",
            {"type": "object", "additionalProperties": _VALUE},
            "kind: track: property name -> value source, the rules of traits",
        ),
    ),
)

# What a track stream needs instead of MAPPING.required (SPEC §10), each with its fix;
# `traits` it may not have (it has `properties`).
TRACK_REQUIRED: dict[str, str] = {
    "event_type": "add event_type: NAME (e.g. invoice_paid), "
    "or {column: COLUMN} for a name per row",
    "source": MAPPING.required["source"],
    "key": "add key: COLUMN (or a list of columns) that identifies one event",
    "cursor": "add cursor: COLUMN that is set when the row is written and never moves "
    "(a creation time or a growing id)",
    "timestamp": "add timestamp: COLUMN holding when the event happened (sent as utc_time)",
    "user_id": "add user_id: COLUMN holding the id of the user who did it",
    "account_id": "add account_id: COLUMN holding the account (workspace) id",
}
# The keys only a track stream may have.
TRACK_ONLY = ("timestamp", "properties")

# Every key set, for the schema's definitions and the agreement test.
KEY_SETS: tuple[KeySet, ...] = (MAPPING, SOURCE, FIELD, RELATED, ON_GONE)
