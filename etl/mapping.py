"""Mapping files -> validated `Mapping` objects (SPEC §4).

Each `*.yml` / `*.yaml` file in the mappings directory declares one stream.
Every problem in every file is collected and raised once as a `MappingError`,
each written `file: key: problem — fix`, so one `etl validate` shows them all.

Files are read with `MappingLoader` (etl.yaml12): PyYAML's safe loader with
YAML 1.2 core scalars (`NO`, `on` and `2024-01-01` stay text, `012` is 12)
that rejects duplicate keys.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import hashlib
import json
import math
import re
import zoneinfo
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from etl.errors import MappingError
from etl.model import (
    EVENT_TYPES,
    REQUIRED_TRAITS,
    TRAIT_TYPES,
    EventType,
    Field,
    FieldKind,
    Mapping,
    Source,
    TraitType,
)
from etl.yaml12 import DuplicateKey, DuplicateKeyError, MappingLoader

# The public API, with the YAML loader names that moved to etl.yaml12.
__all__ = [
    "DEFAULT_LOOKBACK_SECONDS",
    "DuplicateKey",
    "DuplicateKeyError",
    "MappingLoader",
    "load_mappings",
    "mapping_fingerprint",
    "parse_lookback",
    "parse_mapping",
]

DEFAULT_LOOKBACK_SECONDS = 600.0
_T = TypeVar("_T")

# --- Validation: every check appends to `_Problems` and carries on ------------

_REQUIRED = {
    "event_type": "add event_type: user_identify or event_type: account_identify",
    "source": 'add source: {table: NAME} or source: {query: "SELECT ..."}',
    "key": "add key: COLUMN (or a list of columns) that identifies one record",
    "user_id": "add user_id: COLUMN holding the user id (account streams: the owner's)",
    "account_id": "add account_id: COLUMN holding the account id",
    "traits": "add traits: mapping trait names to columns",
}
_TOP_KEYS = (*_REQUIRED, "stream", "cursor", "lookback", "timezone", "anonymous_id", "url")
_SOURCE_KEYS = ("table", "schema", "where", "query")
_FIELD_KINDS: tuple[FieldKind, ...] = ("column", "sql", "const")
_FIELD_KEYS = (*_FIELD_KINDS, "type", "default", "omit_null", "encoding")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# What may come before the SELECT/WITH of a query: space, comments, "(".
_QUERY_PREAMBLE = re.compile(r"(?:\s|--[^\n]*|/\*.*?\*/|\()*", re.DOTALL)
_QUERY_START = re.compile(r"(?:select|with)\b", re.IGNORECASE)
_EVENT_TYPES: dict[str, EventType] = {name: name for name in EVENT_TYPES}
_TRAIT_TYPES: dict[str, TraitType] = {name: name for name in TRAIT_TYPES}


@dataclasses.dataclass
class _Problems:
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
        raise ValueError(f"{_describe(value)} is not a duration")
    try:
        seconds = float(number) * _UNIT_SECONDS[unit]
    except OverflowError:  # an integer too big for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{_describe(value)} is not a duration of zero or more seconds")
    return seconds


def mapping_fingerprint(mapping: Mapping) -> str:
    """sha256 of the mapping's definition; a change forces a full diff (SPEC §5).

    Built from the validated objects, so whitespace, comments, quoting and
    trait order (nothing sent depends on it) leave it unchanged; `path` is
    left out so that moving the mappings directory is not a change.
    """
    definition = dataclasses.asdict(mapping)
    del definition["path"], definition["fingerprint"]
    definition["traits"] = sorted(definition["traits"], key=lambda trait: trait["name"])
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _describe(value: object) -> str:
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


def _suggest(name: str, known: Sequence[str], what: str) -> str:
    """The fix for an unknown name: the closest known one, else all of them."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"{what}: {', '.join(known)}"


def _check_keys(data: dict[Any, Any], allowed: Sequence[str], at: str, problems: _Problems) -> None:
    """Report every key of `data` (the mapping at dotted key `at`) that is not allowed."""
    for key in data:
        if key not in allowed:
            name = str(key)
            dotted = f"{at}.{name}" if at else name
            problems.add(dotted, f"unknown key {name!r}", _suggest(name, allowed, "allowed keys"))


def _text(value: object, key: str, problems: _Problems, what: str) -> str | None:
    """`value` if it is non-empty text without NUL, else None and a problem.

    Spaces and quotes are fine: identifiers are quoted, never pasted into SQL.
    """
    if value is None:
        problems.add(key, "is null", f"write {what}")
    elif isinstance(value, int | float):  # bool too: YAML read `012`, `1.5`, `true`
        problems.add(key, f"must be {what}, got {_describe(value)}", "quote it")
    elif not isinstance(value, str):
        problems.add(key, f"must be {what}, got {_describe(value)}", f"write {what}")
    elif not value.strip():
        problems.add(key, "is empty", f"write {what}")
    elif "\0" in value:
        problems.add(key, "contains a NUL character", "remove it")
    else:
        return value
    return None


def _optional_text(
    data: dict[Any, Any], name: str, key: str, problems: _Problems, what: str
) -> str | None:
    """`data[name]` checked by `_text`; absent or null is None without a problem."""
    return None if data.get(name) is None else _text(data[name], key, problems, what)


def _choice(value: object, choices: dict[str, _T], key: str, problems: _Problems) -> _T | None:
    """`value` looked up in `choices`, else None and a problem with a suggestion."""
    if isinstance(value, str) and value in choices:
        return choices[value]
    fix = _suggest(str(value), list(choices), "use one of")
    problems.add(key, f"unknown value {_describe(value)}", fix)
    return None


def _check_value(value: object, key: str, problems: _Problems) -> None:
    """Report a `const`/`default` that is not a finite scalar or a list of text."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.add(key, f"is {_describe(value)}", "use a finite number: JSON has no NaN/infinity")
    elif isinstance(value, list) and not all(isinstance(item, str) for item in value):
        problems.add(key, "has list items that are not text", "quote every item of the list")
    elif not isinstance(value, str | int | float | list):
        got = _describe(value)
        problems.add(
            key,
            f"must be text, a number, true/false or a list of text, got {got}",
            "write a plain value",
        )


def _encoding(value: object, key: str, problems: _Problems) -> str | None:
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


def _field(spec: object, name: str, key: str, problems: _Problems) -> Field | None:
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
            f"must be a column name or a mapping, got {_describe(spec)}",
            f"write `{name}: COLUMN` or `{name}: {{column: COLUMN, type: TYPE}}`",
        )
        return None
    before = len(problems.items)
    _check_keys(spec, _FIELD_KEYS, key, problems)
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
        trait_type = _choice(spec["type"], _TRAIT_TYPES, f"{key}.type", problems)
    if spec.get("default") is not None:
        _check_value(spec["default"], f"{key}.default", problems)
    omit_null = spec.get("omit_null", True)
    if not isinstance(omit_null, bool):
        problems.add(
            f"{key}.omit_null",
            f"must be true or false, got {_describe(omit_null)}",
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


def _query(value: object, problems: _Problems) -> str | None:
    """A `source.query` that starts with SELECT or WITH, without a trailing `;`."""
    query = _text(value, "source.query", problems, "a SELECT statement")
    if query is None:
        return None
    preamble = _QUERY_PREAMBLE.match(query)
    if not _QUERY_START.match(query, preamble.end() if preamble else 0):
        problems.add("source.query", "must start with SELECT or WITH", "write one read-only query")
        return None
    # The query runs as a subquery, where a trailing `;` is a syntax error.
    return query.strip().removesuffix(";").rstrip()


def _source(value: object, problems: _Problems) -> Source | None:
    """`source:` -> Source: exactly one of table/query, a schema only with a table."""
    if not isinstance(value, dict):
        problems.add("source", f"must be a mapping, got {_describe(value)}", _REQUIRED["source"])
        return None
    before = len(problems.items)
    _check_keys(value, _SOURCE_KEYS, "source", problems)
    if "table" in value and "query" in value:
        problems.add("source", "has both 'table' and 'query'", "keep exactly one of table, query")
    elif "table" not in value and "query" not in value:
        problems.add("source", "has neither 'table' nor 'query'", _REQUIRED["source"])
    elif "query" in value and value.get("schema") is not None:
        problems.add("source.schema", "only applies to table", "name the schema inside the query")
    table = (
        _text(value["table"], "source.table", problems, "a table name")
        if "table" in value
        else None
    )
    query = _query(value["query"], problems) if "query" in value else None
    schema = _optional_text(value, "schema", "source.schema", problems, "a schema name")
    where = _optional_text(value, "where", "source.where", problems, "a SQL condition")
    if len(problems.items) > before:
        return None
    return Source(table=table, schema=schema, where=where, query=query)


def _key(value: object, problems: _Problems) -> tuple[str, ...] | None:
    """`key:` -> the columns that identify a record, else None and a problem."""
    if value == []:
        problems.add("key", "is an empty list", "name at least one column")
        return None
    items = value if isinstance(value, list) else [value]
    keys = [f"key.{index}" for index in range(len(items))] if isinstance(value, list) else ["key"]
    names = [
        _text(item, at, problems, "a column name") for item, at in zip(items, keys, strict=True)
    ]
    repeated = sorted({name for name in names if name and names.count(name) > 1})
    for name in repeated:
        problems.add("key", f"lists {name!r} more than once", "list each column once")
    valid = [name for name in names if name]
    return tuple(valid) if len(valid) == len(items) and not repeated else None


def _lookback(value: object, problems: _Problems) -> float | None:
    """`lookback:` in seconds, else None and a problem."""
    try:
        return parse_lookback(value)
    except ValueError as exc:
        problems.add("lookback", str(exc), "write 30s, 10m, 2h, 1d or a number of seconds")
        return None


def _timezone(value: object, problems: _Problems) -> str | None:
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


def _stream(data: dict[Any, Any], path: str, problems: _Problems) -> str | None:
    """The stream name: `stream:`, else the file name without its extension."""
    name = data.get("stream", Path(path).stem)
    if isinstance(name, str) and _STREAM_NAME.fullmatch(name):
        return name
    rule = "letters, digits and _ . - (not starting with . or -)"
    if "stream" in data:
        problems.add("stream", f"{_describe(name)} is not a valid stream name", f"use {rule}")
    else:
        problems.add(
            "stream",
            f"the file name makes the invalid stream name {name!r}",
            f"rename the file, or add stream: NAME using {rule}",
        )
    return None


def _traits(value: object, event_type: EventType | None, problems: _Problems) -> tuple[Field, ...]:
    """`traits:` -> Fields in file order; also reports unmapped required traits."""
    if not isinstance(value, dict) or not value:
        got = f"must be a mapping, got {_describe(value)}" if value else "is empty"
        problems.add("traits", got, "map trait names to columns, e.g. `name: COLUMN`")
        value = {}
    fields = []
    for name, spec in value.items():
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            problems.add(f"traits.{name}", f"{_describe(name)} is not a trait name", "quote it")
        elif field := _field(spec, name, f"traits.{name}", problems):
            fields.append(field)
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
    return tuple(fields)


def _build(data: dict[Any, Any], problems: _Problems) -> Mapping | None:
    """A file's top-level mapping -> Mapping, or None when `problems` got any."""
    _check_keys(data, _TOP_KEYS, "", problems)
    for name, fix in _REQUIRED.items():
        if name not in data:
            problems.add(name, "is missing", fix)
    stream = _stream(data, problems.path, problems)
    event_type = None
    if "event_type" in data:
        event_type = _choice(data["event_type"], _EVENT_TYPES, "event_type", problems)
    source = _source(data["source"], problems) if "source" in data else None
    key = _key(data["key"], problems) if "key" in data else None
    # No cursor (or null): every sync reads all rows and diffs them.
    cursor = _optional_text(data, "cursor", "cursor", problems, "a column name")
    lookback = _lookback(data.get("lookback", DEFAULT_LOOKBACK_SECONDS), problems)
    timezone = _timezone(data.get("timezone", "UTC"), problems)
    # user_id/account_id must not be null (_field reports it); the others may.
    ids = {
        name: _field(data[name], name, name, problems)
        for name in ("user_id", "account_id", "anonymous_id", "url")
        if name in data and (data[name] is not None or name in _REQUIRED)
    }
    user_id, account_id = ids.get("user_id"), ids.get("account_id")
    traits = _traits(data["traits"], event_type, problems) if "traits" in data else ()
    # A None below always came with a problem; the checks narrow the types.
    if (
        problems.items
        or stream is None
        or event_type is None
        or source is None
        or key is None
        or lookback is None
        or timezone is None
        or user_id is None
        or account_id is None
    ):
        return None
    mapping = Mapping(
        stream=stream,
        path=problems.path,
        event_type=event_type,
        source=source,
        key=key,
        cursor=cursor,
        user_id=user_id,
        account_id=account_id,
        traits=traits,
        anonymous_id=ids.get("anonymous_id"),
        url=ids.get("url"),
        lookback_seconds=lookback,
        timezone=timezone,
    )
    return dataclasses.replace(mapping, fingerprint=mapping_fingerprint(mapping))


def _load_yaml(text: str) -> tuple[Any, tuple[DuplicateKey, ...]]:
    """The document in `text` and its duplicate keys (which do not stop loading)."""
    loader = MappingLoader(text)
    loader.reject_duplicates = False
    try:
        return loader.get_single_data(), loader.duplicate_keys
    finally:
        loader.dispose()


def _read_yaml(text: str, problems: _Problems) -> dict[Any, Any] | None:
    """The file's top-level mapping, else None; bad syntax and duplicate keys are problems."""
    try:
        data, duplicates = _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        problems.add(
            where,
            problem or "invalid YAML",
            # a tab pasted from an editor is the commonest way to get here
            "indent with spaces: YAML does not allow tabs there"
            if "'\\t'" in problem
            else "fix the YAML there (check indentation; quote values containing ': ' or ' #')",
        )
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problems.add(
            f"line {line}",
            f"character {chr(exc.character)!r} is not allowed in YAML",
            "remove it, or write it as an escape such as \\t inside double quotes",
        )
        return None
    except (yaml.YAMLError, ValueError) as exc:  # e.g. an explicit `!!float abc`
        problems.add("(yaml)", str(exc), "fix the YAML")
        return None
    for dup in duplicates:
        problems.add(
            ".".join((*dup.path, dup.key)),
            f"duplicate key {dup.key!r} on lines {dup.first_line} and {dup.second_line}",
            "keep only one of them",
        )
    if not isinstance(data, dict):
        problem = f"must be a mapping of keys, got {_describe(data)}" if data else "is empty"
        problems.add("(top level)", problem, "start from the example in mappings/users.yml")
        return None
    return data


@dataclasses.dataclass(frozen=True)
class _Parsed:
    """One file's outcome: its stream name (best effort, for the checks between
    files) and its Mapping, or the problems that stopped it."""

    path: str
    stream: str
    mapping: Mapping | None
    problems: tuple[str, ...]


def _parse(text: str, path: str) -> _Parsed:
    """One file's text -> its outcome."""
    problems = _Problems(path)
    data = _read_yaml(text, problems)
    mapping = _build(data, problems) if data is not None else None
    declared = data.get("stream") if data is not None else None
    stream = declared if isinstance(declared, str) else Path(path).stem
    return _Parsed(path, stream, mapping, tuple(problems.items))


def parse_mapping(text: str, *, path: str) -> Mapping:
    """One mapping file's content -> Mapping; raises MappingError with all its problems.

    `path` says where the text came from: it starts every message and is kept
    as `Mapping.path`.
    """
    parsed = _parse(text, path)
    if parsed.mapping is None:
        raise MappingError(list(parsed.problems))
    return parsed.mapping


# --- The mappings directory -----------------------------------------------------

_DIRECTORY_FIX = "pass --mappings DIR or set ETL_MAPPINGS"


def load_mappings(directory: Path, *, streams: Sequence[str] | None = None) -> list[Mapping]:
    """Every mapping in `directory`: account streams first, then user streams, each by name.

    `streams` (None or empty: all) keeps only those streams. Raises MappingError
    with every problem of every file, those between files (one stream name in
    two files) and unknown names in `streams`.
    """
    files, problems = _mapping_files(directory)
    parsed = [_parse_file(file, str(directory / file.name)) for file in files]
    problems += [problem for outcome in parsed for problem in outcome.problems]
    problems += _clashes(parsed)
    known = sorted({outcome.stream for outcome in parsed})
    for name in streams or ():
        if files and name not in known:
            fix = _suggest(name, known, "known streams")
            problems.append(f"{directory}: --stream: unknown stream {name!r} — {fix}")
    if problems:
        raise MappingError(problems)
    chosen = [o.mapping for o in parsed if o.mapping and (not streams or o.stream in streams)]
    # Accounts first: a user event may name an account the API should already know.
    return sorted(
        chosen, key=lambda mapping: (mapping.event_type != "account_identify", mapping.stream)
    )


def _mapping_files(directory: Path) -> tuple[list[Path], list[str]]:
    """The mapping files in `directory`, sorted by name, or why there are none."""
    fix = f"point at the directory holding one .yml file per stream: {_DIRECTORY_FIX}"
    if not directory.exists():
        return [], [f"{directory}: mappings directory does not exist — {fix}"]
    if not directory.is_dir():
        return [], [f"{directory}: is not a directory — {fix}"]
    try:
        # Hidden files are editor leftovers (`.#users.yml`), not streams.
        files = sorted(
            path
            for path in directory.iterdir()
            if path.suffix in (".yml", ".yaml") and not path.name.startswith(".") and path.is_file()
        )
    except OSError as exc:
        return [], [f"{directory}: cannot list the directory ({exc.strerror}) — {fix}"]
    if not files:
        return [], [f"{directory}: no mapping files (*.yml, *.yaml) — add one, or {_DIRECTORY_FIX}"]
    return files, []


def _parse_file(file: Path, path: str) -> _Parsed:
    """One mapping file -> its outcome; an unreadable file is a problem too."""
    try:
        return _parse(file.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as exc:
        problem = f"{path}: byte {exc.start}: not UTF-8 text — save the file as UTF-8"
    except OSError as exc:
        problem = f"{path}: cannot read the file ({exc.strerror}) — check its permissions"
    return _Parsed(path, file.stem, None, (problem,))


def _clashes(parsed: list[_Parsed]) -> list[str]:
    """A problem for every file that declares a stream an earlier file declared."""
    first: dict[str, str] = {}
    problems = []
    for outcome in parsed:
        if outcome.stream in first:
            problems.append(
                f"{outcome.path}: stream: {outcome.stream!r} is also declared in "
                f"{first[outcome.stream]} — give each file its own stream name"
            )
        first.setdefault(outcome.stream, outcome.path)
    return problems
