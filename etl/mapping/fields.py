"""The values of a mapping file's keys, validated one by one (SPEC §4).

Each `valid_*` function takes the YAML value of one key and returns what the
`Mapping` holds (a `Field`, a `Source`, the key columns, ...), or None after
adding to `Problems` every problem it found, written `file: key: problem —
fix`; `mapping._build` calls them and assembles the Mapping.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import re
import zoneinfo
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from etl.mapping.keys import FIELD, MAPPING, ON_GONE, RELATED, SOURCE, KeySet
from etl.model import (
    REQUIRED_TRAITS,
    TRAIT_TYPES,
    EventType,
    Field,
    FieldKind,
    Related,
    Source,
    TraitType,
)

_T = TypeVar("_T")

# The keys every mapping needs, each with the fix when it is missing.
REQUIRED = MAPPING.required
_FIELD_KINDS: tuple[FieldKind, ...] = ("column", "sql", "const")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# What may come before the SELECT/WITH of a query: space, comments, "(".
_QUERY_PREAMBLE = re.compile(r"(?:\s|--[^\n]*|/\*.*?\*/|\()*", re.DOTALL)
_QUERY_START = re.compile(r"(?:select|with)\b", re.IGNORECASE)
_TRAIT_TYPES: dict[str, TraitType] = {name: name for name in TRAIT_TYPES}


@dataclasses.dataclass
class Problems:
    """The problems found so far in one file; validators append and carry on."""

    path: str
    items: list[str] = dataclasses.field(default_factory=list)

    def add(self, key: str, problem: str, fix: str) -> None:
        self.items.append(f"{self.path}: {key}: {problem} — {fix}")


def parse_lookback(value: object) -> float:
    """Seconds of a `lookback:` value: `30s`, `10m`, `2h`, `1d` or a number of seconds.

    Raises ValueError saying what is wrong with `value`.
    """
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match:
        number, unit = float(match[1]), match[2]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        raise ValueError(f"{describe(value)} is not a duration")
    try:
        seconds = float(number) * _UNIT_SECONDS[unit]
    except OverflowError:  # an integer too big for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{describe(value)} is not a duration of zero or more seconds")
    return seconds


def describe(value: object) -> str:
    """How a YAML value reads in a message: 'text', 12, true, null, a list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "a mapping"
    return f"a {type(value).__name__}"


def suggest(name: str, known: Sequence[str], what: str) -> str:
    """The fix for an unknown name: the closest known one, else all of them."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"{what}: {', '.join(known)}"


def check_keys(data: dict[Any, Any], allowed: KeySet, at: str, problems: Problems) -> None:
    """Report every key of `data` (the mapping at dotted key `at`) that `allowed` lacks.

    Key sets are declared in etl.mapping.keys, which the JSON Schema is built from.
    """
    for key in data:
        if key not in allowed:
            name = str(key)
            dotted = f"{at}.{name}" if at else name
            fix = suggest(name, allowed.names, "allowed keys")
            problems.add(dotted, f"unknown key {name!r}", fix)


def _text(value: object, key: str, problems: Problems, what: str) -> str | None:
    """`value` if it is non-empty text without NUL, else None and a problem.

    Spaces and quotes are fine: identifiers are quoted, never pasted into SQL.
    """
    if value is None:
        problems.add(key, "is null", f"write {what}")
    elif isinstance(value, int | float):  # bool too: YAML read `012`, `1.5`, `true`
        problems.add(key, f"must be {what}, got {describe(value)}", "quote it")
    elif not isinstance(value, str):
        problems.add(key, f"must be {what}, got {describe(value)}", f"write {what}")
    elif not value.strip():
        problems.add(key, "is empty", f"write {what}")
    elif "\0" in value:
        problems.add(key, "contains a NUL character", "remove it")
    else:
        return value
    return None


def optional_text(
    data: dict[Any, Any], name: str, key: str, problems: Problems, what: str
) -> str | None:
    """`data[name]` checked by `_text`; absent or null is None without a problem."""
    return None if data.get(name) is None else _text(data[name], key, problems, what)


def choice(value: object, choices: dict[str, _T], key: str, problems: Problems) -> _T | None:
    """`value` looked up in `choices`, else None and a problem with a suggestion."""
    if isinstance(value, str) and value in choices:
        return choices[value]
    fix = suggest(str(value), list(choices), "use one of")
    problems.add(key, f"unknown value {describe(value)}", fix)
    return None


def _check_value(value: object, key: str, problems: Problems) -> None:
    """Report a `const`/`default` that is not a finite scalar or a list of text."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.add(key, f"is {describe(value)}", "use a finite number: JSON has no NaN/infinity")
    elif isinstance(value, list) and not all(isinstance(item, str) for item in value):
        problems.add(key, "has list items that are not text", "quote every item of the list")
    elif not isinstance(value, str | int | float | list):
        got = describe(value)
        problems.add(
            key,
            f"must be text, a number, true/false or a list of text, got {got}",
            "write a plain value",
        )


def _encoding(value: object, key: str, problems: Problems) -> str | None:
    """The canonical name of a codec that decodes bytes to text, else None and a problem."""
    name = _text(value, key, problems, "a codec name")
    if name is None:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        info = None
    # bytes.decode() refuses codecs such as rot13 or base64 that do not make text.
    if info is None or not info._is_text_encoding:
        problems.add(key, f"unknown text encoding {name!r}", "use a codec such as utf-8 or latin-1")
        return None
    return info.name


def _frozen(value: Any) -> Any:
    """Lists as tuples: a Field is frozen and shared by every stage."""
    return tuple(value) if isinstance(value, list) else value


def valid_field(spec: object, name: str, key: str, problems: Problems) -> Field | None:
    """A field spec -> `Field(name=name, ...)`, else None and its problems.

    A spec is a column name, or a mapping with exactly one of column/sql/const
    and optional type, default, omit_null and encoding.
    """
    if isinstance(spec, str):
        column = _text(spec, key, problems, "a column name")
        return Field(name=name, kind="column", value=column) if column else None
    if not isinstance(spec, dict):
        problems.add(
            key,
            f"must be a column name or a mapping, got {describe(spec)}",
            f"write `{name}: COLUMN` or `{name}: {{column: COLUMN, type: TYPE}}`",
        )
        return None
    before = len(problems.items)
    check_keys(spec, FIELD, key, problems)
    kinds = [kind for kind in _FIELD_KINDS if kind in spec]
    if not kinds:
        problems.add(key, "has none of column, sql, const", "add exactly one of them")
    elif len(kinds) > 1:
        listed = ", ".join(map(repr, kinds[:-1])) + f" and {kinds[-1]!r}"
        has = f"has both {listed}" if len(kinds) == 2 else f"has {listed}"
        problems.add(key, has, "keep exactly one of column, sql, const")
    elif kinds[0] == "const" and spec["const"] is None:
        problems.add(f"{key}.const", "is null", "give a value, or remove the field")
    elif kinds[0] == "const":
        _check_value(spec["const"], f"{key}.const", problems)
    else:
        what = "a column name" if kinds[0] == "column" else "a SQL expression"
        _text(spec[kinds[0]], f"{key}.{kinds[0]}", problems, what)
    trait_type = None
    if "type" in spec:
        trait_type = choice(spec["type"], _TRAIT_TYPES, f"{key}.type", problems)
    if spec.get("default") is not None:
        _check_value(spec["default"], f"{key}.default", problems)
    omit_null = spec.get("omit_null", True)
    if not isinstance(omit_null, bool):
        problems.add(
            f"{key}.omit_null",
            f"must be true or false, got {describe(omit_null)}",
            "write true or false (YAML 1.2 reads yes/no/on/off as text)",
        )
    encoding = None
    if "encoding" in spec:
        encoding = _encoding(spec["encoding"], f"{key}.encoding", problems)
        if trait_type != "text":
            problems.add(
                f"{key}.encoding",
                "only applies to type: text",
                "add type: text, or remove encoding",
            )
    if len(problems.items) > before:
        return None
    return Field(
        name=name,
        kind=kinds[0],
        value=_frozen(spec[kinds[0]]),
        type=trait_type,
        default=_frozen(spec.get("default")),
        omit_null=omit_null,
        encoding=encoding,
    )


def _query(value: object, problems: Problems, at: str = "source.query") -> str | None:
    """A `source.query` that starts with SELECT or WITH, without a trailing `;`."""
    query = _text(value, at, problems, "a SELECT statement")
    if query is None:
        return None
    preamble = _QUERY_PREAMBLE.match(query)
    if not _QUERY_START.match(query, preamble.end() if preamble else 0):
        problems.add(at, "must start with SELECT or WITH", "write one read-only query")
        return None
    # The query runs as a subquery, where a trailing `;` is a syntax error.
    return query.strip().removesuffix(";").rstrip()


def _source_parts(
    value: dict[Any, Any], at: str, allowed: KeySet, problems: Problems
) -> Source | None:
    """The table/query/schema/where of a mapping at dotted key `at` (`source`, `related.0`)."""
    before = len(problems.items)
    check_keys(value, allowed, at, problems)
    if "table" in value and "query" in value:
        problems.add(at, "has both 'table' and 'query'", "keep exactly one of table, query")
    elif "table" not in value and "query" not in value:
        problems.add(at, "has neither 'table' nor 'query'", REQUIRED["source"])
    elif "query" in value and value.get("schema") is not None:
        problems.add(f"{at}.schema", "only applies to table", "name the schema inside the query")
    table = (
        _text(value["table"], f"{at}.table", problems, "a table name") if "table" in value else None
    )
    query = _query(value["query"], problems, f"{at}.query") if "query" in value else None
    schema = optional_text(value, "schema", f"{at}.schema", problems, "a schema name")
    where = optional_text(value, "where", f"{at}.where", problems, "a SQL condition")
    if len(problems.items) > before:
        return None
    return Source(table=table, schema=schema, where=where, query=query)


def valid_source(value: object, problems: Problems) -> Source | None:
    """`source:` -> Source: exactly one of table/query, a schema only with a table."""
    if not isinstance(value, dict):
        problems.add("source", f"must be a mapping, got {describe(value)}", REQUIRED["source"])
        return None
    return _source_parts(value, "source", SOURCE, problems)


def valid_key(value: object, problems: Problems, at: str = "key") -> tuple[str, ...] | None:
    """`key:` (or the key at dotted `at`) -> the columns that identify a record,
    else None and a problem."""
    if value == []:
        problems.add(at, "is an empty list", "name at least one column")
        return None
    items = value if isinstance(value, list) else [value]
    keys = [f"{at}.{index}" for index in range(len(items))] if isinstance(value, list) else [at]
    names = [
        _text(item, where, problems, "a column name")
        for item, where in zip(items, keys, strict=True)
    ]
    repeated = sorted({name for name in names if name and names.count(name) > 1})
    for name in repeated:
        problems.add(at, f"lists {name!r} more than once", "list each column once")
    valid = [name for name in names if name]
    return tuple(valid) if len(valid) == len(items) and not repeated else None


def valid_lookback(value: object, problems: Problems) -> float | None:
    """`lookback:` in seconds, else None and a problem."""
    try:
        return parse_lookback(value)
    except ValueError as exc:
        problems.add("lookback", str(exc), "write 30s, 10m, 2h, 1d or a number of seconds")
        return None


def valid_timezone(value: object, problems: Problems) -> str | None:
    """`timezone:` if the IANA database knows it, else None and a problem."""
    name = _text(value, "timezone", problems, "a time zone name such as UTC or Europe/Berlin")
    if name is None:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "use an IANA name such as Europe/Berlin"
        problems.add("timezone", f"unknown time zone {name!r}", fix)
        return None
    return name


def valid_stream(data: dict[Any, Any], path: str, problems: Problems) -> str | None:
    """The stream name: `stream:`, else the file name without its extension."""
    name = data.get("stream", Path(path).stem)
    if isinstance(name, str) and _STREAM_NAME.fullmatch(name):
        return name
    rule = "letters, digits and _ . - (not starting with . or -)"
    if "stream" in data:
        problems.add("stream", f"{describe(name)} is not a valid stream name", f"use {rule}")
    else:
        problems.add(
            "stream",
            f"the file name makes the invalid stream name {name!r}",
            f"rename the file, or add stream: NAME using {rule}",
        )
    return None


def valid_traits_like(value: object, key: str, problems: Problems) -> tuple[Field, ...]:
    """`traits:` (or a track stream's `properties:`) -> Fields in file order."""
    if not isinstance(value, dict) or not value:
        got = f"must be a mapping, got {describe(value)}" if value else "is empty"
        problems.add(key, got, f"map {key} names to columns, e.g. `name: COLUMN`")
        value = {}
    fields = []
    for name, spec in value.items():
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            what = "trait" if key == "traits" else "property"
            problems.add(f"{key}.{name}", f"{describe(name)} is not a {what} name", "quote it")
        elif field := valid_field(spec, name, f"{key}.{name}", problems):
            fields.append(field)
    return tuple(fields)


def valid_traits(
    value: object, event_type: EventType | None, problems: Problems
) -> tuple[Field, ...]:
    """`traits:` -> Fields in file order; also reports unmapped required traits."""
    fields = valid_traits_like(value, "traits", problems)
    if not isinstance(value, dict):
        value = {}
    missing = (
        [name for name in REQUIRED_TRAITS[event_type] if name not in value] if event_type else []
    )
    if missing:
        names = ", ".join(missing)
        problems.add(
            "traits",
            f"{event_type} requires {names}, not mapped here",
            f"add e.g. `{missing[0]}: COLUMN` under traits",
        )
    return fields


# --- SPEC §9: related tables, full reads, gone records ----------------------------

# Fields of the event that are not traits: on_gone may not set them.
ID_FIELDS = ("user_id", "account_id", "anonymous_id", "url")
_RELATED_EXAMPLE = "e.g. `- {table: memberships, key: user_id, cursor: updated_at}`"


def valid_related(
    value: object,
    stream_key: tuple[str, ...] | None,
    default_lookback: float,
    problems: Problems,
) -> tuple[Related, ...]:
    """`related:` -> the tables whose changes re-send records of this stream.

    Each entry is a table or query (with `schema`/`where` as in `source`), the
    `key` naming the stream's key columns in that table (same number, same
    order), its own `cursor` (required) and `lookback` (default: the stream's).
    """
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        got = f"must be a list, got {describe(value)}" if value != [] else "is an empty list"
        problems.add("related", got, f"list the tables, {_RELATED_EXAMPLE}, or remove related")
        return ()
    entries = []
    for index, item in enumerate(value):
        at = f"related.{index}"
        if not isinstance(item, dict):
            problems.add(
                at, f"must be a mapping, got {describe(item)}", f"write {_RELATED_EXAMPLE}"
            )
            continue
        before = len(problems.items)
        source = _source_parts(item, at, RELATED, problems)
        key = None
        if "key" not in item:
            problems.add(at, "has no key", RELATED.required["key"])
        else:
            key = valid_key(item["key"], problems, f"{at}.key")
        if key is not None and stream_key is not None and len(key) != len(stream_key):
            problems.add(
                f"{at}.key",
                f"has {len(key)} column(s), the stream's key has {len(stream_key)} "
                f"({', '.join(stream_key)})",
                f"list {len(stream_key)} column(s), in the order of the stream's key",
            )
        cursor = None
        if item.get("cursor") is None:
            problems.add(
                f"{at}.cursor",
                "is missing" if "cursor" not in item else "is null",
                RELATED.required["cursor"],
            )
        else:
            cursor = _text(item["cursor"], f"{at}.cursor", problems, "a column name")
        lookback: float | None = default_lookback
        if "lookback" in item:
            try:
                lookback = parse_lookback(item["lookback"])
            except ValueError as exc:
                problems.add(
                    f"{at}.lookback", str(exc), "write 30s, 10m, 2h, 1d or a number of seconds"
                )
        if len(problems.items) > before or source is None or key is None or cursor is None:
            continue
        entries.append(
            Related(source=source, key=key, cursor=cursor, lookback_seconds=lookback or 0.0)
        )
    labels = [entry.label for entry in entries]
    for label in sorted({label for label in labels if labels.count(label) > 1}):
        problems.add("related", f"lists {label} more than once", "keep one entry per table")
    return tuple(entries)


def valid_full_every(value: object, default: float | None, problems: Problems) -> float | None:
    """`full_every:` in seconds; `never` turns periodic full reads off (None)."""
    if value == "never":
        return None
    try:
        seconds = parse_lookback(value)
    except ValueError as exc:
        problems.add(
            "full_every",
            str(exc),
            "write a duration such as 12h, 1d or 7d, or never to turn it off",
        )
        return default
    if seconds <= 0:
        problems.add(
            "full_every", f"{describe(value)} is not a positive duration", "write 1d, 7d, or never"
        )
    return seconds


def valid_on_gone(
    value: object, event_type: EventType | None, problems: Problems
) -> tuple[tuple[str, Any], ...]:
    """`on_gone: {traits: {...}}` -> the (trait, value) pairs merged into a gone record.

    Values are constants (the row is gone: no column to read). They may not
    set the event's ids or a trait the event type requires, which must keep
    the values last sent.
    """
    if value is None:
        return ()
    example = ON_GONE.required["traits"]
    if not isinstance(value, dict):
        problems.add("on_gone", f"must be a mapping, got {describe(value)}", example)
        return ()
    check_keys(value, ON_GONE, "on_gone", problems)
    for name in ID_FIELDS:
        if name in value:
            problems.add(
                f"on_gone.{name}",
                "sets an id: a gone record keeps the ids it was last sent with",
                "remove it; put traits under on_gone.traits",
            )
    traits = value.get("traits")
    if not isinstance(traits, dict) or not traits:
        got = "is missing" if traits is None else f"must be a mapping, got {describe(traits)}"
        if traits == {}:
            got = "is empty"
        problems.add("on_gone.traits", got, example)
        return ()
    required = REQUIRED_TRAITS[event_type] if event_type else ()
    pairs = []
    for name, trait_value in traits.items():
        at = f"on_gone.traits.{name}"
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            problems.add(at, f"{describe(name)} is not a trait name", "quote it")
        elif name in ID_FIELDS:
            problems.add(
                at,
                f"{name!r} is an id, not a trait: a gone record keeps its last-sent ids",
                "use another trait name, e.g. deleted: true",
            )
        elif name in required:
            problems.add(
                at,
                f"sets {name!r}, which {event_type} requires: a gone record keeps its last-sent "
                f"{name}",
                "use another trait name, e.g. deleted: true",
            )
        elif trait_value is None:
            problems.add(at, "is null", "give a value such as true or 'deleted'")
        else:
            before = len(problems.items)
            _check_value(trait_value, at, problems)
            if len(problems.items) == before:
                pairs.append((name, _frozen(trait_value)))
    return tuple(sorted(pairs))
