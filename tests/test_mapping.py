"""Mapping files -> validated Mapping objects: every rule of SPEC §4, all problems at once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from etl.errors import MappingError
from etl.mapping.fields import parse_lookback
from etl.mapping.parse import load_mappings, mapping_fingerprint, parse_mapping
from etl.mapping.yaml12 import DuplicateKeyError, MappingLoader
from etl.model import Field, Source

EXAMPLES = Path(__file__).resolve().parent.parent / "mappings"
PATH = "mappings/users.yml"
USERS = """\
event_type: user_identify
source: {table: users}
key: id
user_id: id
account_id: workspace_id
traits:
  email: email
  name: name
  created_at: {column: created_at, type: datetime}
"""
ACCOUNTS = """\
event_type: account_identify
source: {table: workspaces}
key: id
user_id: owner_id
account_id: id
traits: {name: name}
"""
# `file: key: problem — fix`, the one shape every message has (STYLE habit 7).
MESSAGE = re.compile(r"^[^:]+: [^:]+: .+ — .+$")


def edited(text: str, old: str, new: str) -> str:
    """`text` with its one occurrence of `old` replaced by `new`."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def problems_of(text: str, path: str = PATH) -> list[str]:
    """The problems parse_mapping reports for `text`."""
    with pytest.raises(MappingError) as caught:
        parse_mapping(text, path=path)
    assert all(MESSAGE.match(problem) for problem in caught.value.problems), caught.value
    return caught.value.problems


def trait(text: str, name: str) -> Field:
    """The Field a mapping text declares for trait `name`."""
    return next(f for f in parse_mapping(text, path=PATH).traits if f.name == name)


def write(directory: Path, name: str, text: str) -> Path:
    """Write one mapping file into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory / name


# --- the example files users copy --------------------------------------------------


def test_example_mappings_load() -> None:
    """The shipped users.yml and workspaces.yml load, workspaces (an account stream) first."""
    workspaces, users = load_mappings(EXAMPLES)
    assert (workspaces.stream, users.stream) == ("workspaces", "users")
    assert workspaces.source == Source(table="workspaces", where="deleted_at IS NULL")
    assert (workspaces.user_id.value, workspaces.account_id.value) == ("owner_id", "id")
    assert {f.name: (f.kind, f.value, f.type, f.default) for f in workspaces.traits} == {
        "name": ("column", "name", None, None),
        "created_at": ("column", "created_at", "datetime", None),
        "plan_name": ("column", "plan", None, "free"),
        "website": ("sql", "'https://' || domain", None, None),
        "seats": ("column", "seats", "number", None),
        "tags": ("column", "tags", "string_array", None),
        "source_system": ("const", "demo", None, None),
    }
    assert users.event_type == "user_identify"
    assert (users.key, users.cursor, users.account_id.value) == (
        ("id",),
        "updated_at",
        "workspace_id",
    )
    assert [f.name for f in users.traits] == [
        "email",
        "name",
        "created_at",
        "role",
        "is_admin",
        "last_login_at",
    ]
    assert users.path == str(EXAMPLES / "users.yml")


# --- a valid file ------------------------------------------------------------------


def test_minimal_mapping_gets_the_documented_defaults() -> None:
    """Stream name from the file, no cursor, 10-minute lookback, UTC, no optional ids."""
    mapping = parse_mapping(USERS, path=PATH)
    assert mapping.stream == "users"
    assert mapping.path == PATH
    assert mapping.source == Source(table="users")
    assert (mapping.key, mapping.cursor) == (("id",), None)
    assert (mapping.lookback_seconds, mapping.timezone) == (600.0, "UTC")
    assert (mapping.anonymous_id, mapping.url) == (None, None)
    assert mapping.user_id == Field(name="user_id", kind="column", value="id")
    assert [f.name for f in mapping.traits] == ["email", "name", "created_at"]
    assert re.fullmatch(r"[0-9a-f]{64}", mapping.fingerprint)


def test_field_spec_forms() -> None:
    """Every field spec form becomes the Field it says, lists as tuples."""
    text = USERS + (
        "  plan: {column: plan, default: free, omit_null: false}\n"
        "  score: {sql: 'points * 2', type: integer}\n"
        "  tags: {const: [a, b], type: string_array}\n"
        "  note: {column: note, type: text, encoding: Latin1}\n"
    )
    assert trait(text, "plan") == Field("plan", "column", "plan", default="free", omit_null=False)
    assert trait(text, "score") == Field("score", "sql", "points * 2", type="integer")
    assert trait(text, "tags") == Field("tags", "const", ("a", "b"), type="string_array")
    assert trait(text, "note").encoding == "iso8859-1"


def test_optional_ids_and_stream_keys() -> None:
    """stream, cursor, lookback, timezone, anonymous_id and url are read when given."""
    text = USERS + (
        "stream: app-users.v2\ncursor: updated_at\nlookback: 2h\ntimezone: Europe/Berlin\n"
        "anonymous_id: null\nurl: {const: 'https://app.example.com'}\n"
    )
    mapping = parse_mapping(text, path=PATH)
    assert (mapping.stream, mapping.cursor) == ("app-users.v2", "updated_at")
    assert (mapping.lookback_seconds, mapping.timezone) == (7200.0, "Europe/Berlin")
    assert mapping.anonymous_id is None
    assert mapping.url == Field("url", "const", "https://app.example.com")


def test_identifiers_with_quotes_and_spaces_are_kept_verbatim() -> None:
    """Column and table names with spaces and quotes are accepted exactly as written."""
    text = edited(USERS, "source: {table: users}", "source: {table: 'my \"users\"', schema: 'a b'}")
    text = edited(text, "key: id", "key: ['user id', \"it's\"]")
    text = edited(text, "  email: email", "  email: 'E-Mail \"primary\"'")
    mapping = parse_mapping(text, path=PATH)
    assert mapping.source == Source(table='my "users"', schema="a b")
    assert mapping.key == ("user id", "it's")
    assert trait(text, "email").value == 'E-Mail "primary"'


def test_yaml_merge_keys_share_field_specs() -> None:
    """A `<<: *anchor` merge fills in keys, and keys beside it override them."""
    text = USERS + "  a: &ts {column: a, type: datetime}\n  b: {<<: *ts, column: b}\n"
    assert trait(text, "b") == Field("b", "column", "b", type="datetime")


# --- YAML: 1.2 core scalars, duplicate keys, syntax -------------------------------


@pytest.mark.parametrize(
    ("scalar", "value"),
    [
        ("NO", "NO"),
        ("no", "no"),
        ("yes", "yes"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("true", True),
        ("True", True),
        ("FALSE", False),
        ("012", 12),
        ("0o12", 10),
        ("0x1f", 31),
        ("-7", -7),
        ("1_000", "1_000"),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("2024-01-01", "2024-01-01"),
        ("2024-01-01T10:00:00Z", "2024-01-01T10:00:00Z"),
        ("12:30", "12:30"),
        ("~", None),
        ("null", None),
        ("=", "="),
    ],
)
def test_scalars_follow_yaml_1_2_core(scalar: str, value: object) -> None:
    """Plain scalars resolve as YAML 1.2 core says, not as YAML 1.1 would."""
    loaded = yaml.load(f"v: {scalar}", Loader=MappingLoader)  # noqa: S506 - a SafeLoader subclass
    assert loaded == {"v": value}
    assert type(loaded["v"]) is type(value)


def test_yaml_1_1_surprises_reach_the_mapping_as_written() -> None:
    """A country code NO, a zero-padded 012 and a date constant keep their YAML 1.2 meaning."""
    text = USERS + "  country: {const: NO}\n  code: {const: 012}\n  since: {const: 2024-01-01}\n"
    assert trait(text, "country").value == "NO"
    assert trait(text, "code").value == 12
    assert trait(text, "since").value == "2024-01-01"


def test_duplicate_keys_name_the_key_and_both_lines() -> None:
    """Every duplicate key is reported with its dotted path and both line numbers."""
    text = "key: id\n" + USERS.replace("  name: name\n", "  name: name\n  email: mail\n")
    assert problems_of(text) == [
        f"{PATH}: key: duplicate key 'key' on lines 1 and 4 — keep only one of them",
        f"{PATH}: traits.email: duplicate key 'email' on lines 8 and 10 — keep only one of them",
    ]


def test_loader_alone_rejects_duplicate_keys() -> None:
    """yaml.load with MappingLoader raises DuplicateKeyError listing every duplicate."""
    with pytest.raises(DuplicateKeyError) as caught:
        yaml.load("a: 1\nb: {x: 1, x: 2}\na: 3\n", Loader=MappingLoader)  # noqa: S506
    assert [(d.path, d.key, d.first_line, d.second_line) for d in caught.value.duplicates] == [
        (("b",), "x", 2, 2),
        ((), "a", 1, 3),
    ]


def test_syntax_error_gives_line_and_column() -> None:
    """A YAML syntax error is one problem that says where it is."""
    (problem,) = problems_of("event_type: user_identify\ntraits: [email\n")
    assert problem.startswith(
        f"{PATH}: line 3, column 1: while parsing a flow sequence, expected ',' or ']'"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: b\nc: \x07\n", "line 2: character '\\x07' is not allowed in YAML"),
        ("? [a]\n: 1\n", "line 1, column 3: while constructing a mapping, found unhashable key"),
        ("a: *nowhere\n", "line 1, column 4: found undefined alias 'nowhere'"),
        ("a: !!python/object:os.system x\n", "line 1, column 4: could not determine a constructor"),
        ("a: !!int 0b101\n", "line 1, column 4: not an integer: '0b101'"),
        ("a: !!float abc\n", "(yaml): could not convert string to float: 'abc'"),
        (
            "a: 1\n---\nb: 2\n",
            "line 2, column 1: expected a single document in the stream, but found",
        ),
    ],
)
def test_unusable_yaml_is_one_located_problem(text: str, problem: str) -> None:
    """Control characters, bad keys, aliases and tags are reported, never raised raw."""
    (reported,) = problems_of(text)
    assert reported.startswith(f"{PATH}: {problem}"), reported


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- event_type\n- traits\n", "must be a mapping of keys, got a list"),
        ("users\n", "must be a mapping of keys, got 'users'"),
    ],
)
def test_top_level_must_be_a_mapping(text: str, problem: str) -> None:
    """An empty file, a list or a scalar at the top is a problem."""
    (reported,) = problems_of(text)
    assert reported.startswith(f"{PATH}: (top level): {problem} — ")


# --- problems, each with where and how to fix ----------------------------------------


def test_unknown_key_suggests_the_closest_known_key() -> None:
    """A misspelt key gets a did-you-mean; a foreign one gets the allowed list."""
    text = USERS + "cusor: updated_at\nowner: x\n"
    text = edited(text, "source: {table: users}", "source: {tabel: users}")
    text = edited(text, "type: datetime}", "type: datetime, colum: x}")
    found = problems_of(text)
    assert f"{PATH}: cusor: unknown key 'cusor' — did you mean 'cursor'?" in found
    assert f"{PATH}: source.tabel: unknown key 'tabel' — did you mean 'table'?" in found
    assert f"{PATH}: traits.created_at.colum: unknown key 'colum' — did you mean 'column'?" in found
    (owner,) = [p for p in found if ": owner:" in p]
    assert "allowed keys: event_type, source, key" in owner


def test_field_with_two_sources_is_one_problem() -> None:
    """A field with both column and sql says to keep exactly one of column, sql, const."""
    text = edited(USERS, "  email: email", "  email: {column: email, sql: lower(email)}")
    assert problems_of(text) == [
        f"{PATH}: traits.email: has both 'column' and 'sql'"
        " — keep exactly one of column, sql, const"
    ]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("{column: e, sql: e, const: e}", "traits.email: has 'column', 'sql' and 'const'"),
        ("{type: text}", "traits.email: has none of column, sql, const"),
        ("{const: null}", "traits.email.const: is null"),
        ("{const: {a: 1}}", "traits.email.const: must be text, a number, true/false or a list"),
        ("{const: .inf}", "traits.email.const: is inf"),
        ("{column: e, default: [1, 2]}", "traits.email.default: has list items that are not text"),
        ("{column: e, type: datetim}", "traits.email.type: unknown value 'datetim' — did you mean"),
        ("{column: e, type: json}", "traits.email.type: unknown value 'json' — use one of: text"),
        ("{column: e, omit_null: no}", "traits.email.omit_null: must be true or false, got 'no'"),
        ("{column: e, encoding: utf-8}", "traits.email.encoding: only applies to type: text"),
        ("{column: e, type: text, encoding: utf-9}", "unknown text encoding 'utf-9'"),
        ("{column: e, type: text, encoding: rot13}", "unknown text encoding 'rot13'"),
        ("''", "traits.email: is empty"),
        ('"a\\0b"', "traits.email: contains a NUL character"),
        ("{column: 12}", "traits.email.column: must be a column name, got 12 — quote it"),
        ("[email]", "traits.email: must be a column name or a mapping, got a list"),
        ("", "traits.email: must be a column name or a mapping, got null"),
    ],
)
def test_bad_field_specs(spec: str, problem: str) -> None:
    """Each broken field spec is reported at its dotted key."""
    (reported,) = problems_of(edited(USERS, "  email: email", f"  email: {spec}"))
    assert problem in reported


def test_missing_required_traits_are_named() -> None:
    """A user stream without name and created_at says which traits to add."""
    text = edited(USERS, "  name: name\n", "")
    text = edited(text, "  created_at: {column: created_at, type: datetime}\n", "")
    assert problems_of(text) == [
        f"{PATH}: traits: user_identify requires name, created_at, not mapped here"
        " — add e.g. `name: COLUMN` under traits"
    ]
    assert parse_mapping(ACCOUNTS, path="w.yml").traits == (Field("name", "column", "name"),)


def test_missing_top_level_keys_are_all_reported() -> None:
    """A file with only a stream name lists every required key it lacks."""
    found = problems_of("stream: users\n")
    assert [p.split(": ")[1] for p in found] == [
        "event_type",
        "source",
        "key",
        "user_id",
        "account_id",
        "traits",
    ]
    assert all(": is missing — add " in p for p in found)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("users", "source: must be a mapping, got 'users'"),
        ("{where: x > 1}", "source: has neither 'table' nor 'query'"),
        ("{table: users, query: SELECT 1}", "source: has both 'table' and 'query'"),
        ("{query: SELECT 1, schema: public}", "source.schema: only applies to table"),
        ("{query: DELETE FROM users}", "source.query: must start with SELECT or WITH"),
        ("{table: users, where: ''}", "source.where: is empty"),
    ],
)
def test_bad_sources(source: str, problem: str) -> None:
    """Each broken source is reported with what to write instead."""
    (reported,) = problems_of(edited(USERS, "{table: users}", source))
    assert problem in reported


def test_query_may_start_with_comments_and_loses_its_trailing_semicolon() -> None:
    """A WITH query after comments and a parenthesis is accepted; a trailing `;` is dropped."""
    query = "-- active users\n/* v2 */ (WITH a AS (SELECT 1) SELECT * FROM a);"
    block = query.replace("\n", "\n    ")
    text = edited(USERS, "source: {table: users}", f"source:\n  query: |\n    {block}\n")
    mapping = parse_mapping(text, path=PATH)
    assert (
        mapping.source.query == "-- active users\n/* v2 */ (WITH a AS (SELECT 1) SELECT * FROM a)"
    )


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("key", "[]", "key: is an empty list"),
        ("key", "[id, email, id]", "key: lists 'id' more than once"),
        ("key", "[id, 7]", "key.1: must be a column name, got 7"),
        ("key", "null", "key: is null"),
        ("cursor", "[updated_at]", "cursor: must be a column name, got a list"),
        ("stream", "'-users'", "stream: '-users' is not a valid stream name"),
        ("stream", "users/all", "stream: 'users/all' is not a valid stream name"),
        ("event_type", "group_identify", "event_type: unknown value 'group_identify'"),
        ("timezone", "Europe/Berln", "timezone: unknown time zone 'Europe/Berln' — did you mean"),
        ("timezone", "../etc/passwd", "timezone: unknown time zone '../etc/passwd'"),
        ("lookback", "ten minutes", "lookback: 'ten minutes' is not a duration"),
        ("lookback", "-5", "lookback: -5 is not a duration of zero or more seconds"),
        ("lookback", "3w", "lookback: '3w' is not a duration"),
        ("lookback", ".nan", "lookback: nan is not a duration of zero or more seconds"),
        ("lookback", "true", "lookback: true is not a duration"),
        ("user_id", "null", "user_id: must be a column name or a mapping, got null"),
        ("traits", "{}", "traits: is empty"),
        ("traits", "[email]", "traits: must be a mapping, got a list"),
    ],
)
def test_bad_top_level_values(key: str, value: str, problem: str) -> None:
    """Each bad top-level value is reported first, at its key, with a fix."""
    # Drop the key (and its indented lines) from USERS, then set it to `value`.
    text = re.sub(rf"^{key}:.*\n(?:  .*\n)*", "", USERS, flags=re.MULTILINE) + f"{key}: {value}\n"
    found = problems_of(text)
    assert found[0].startswith(f"{PATH}: {problem}"), found


def test_file_name_must_make_a_valid_stream_name() -> None:
    """Without `stream:`, a file name that is no valid stream name is a problem."""
    (problem,) = problems_of(USERS, path="mappings/my users.yml")
    assert "stream: the file name makes the invalid stream name 'my users'" in problem


# --- lookback ---------------------------------------------------------------------

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS)))
def test_lookback_durations_are_number_times_unit(number: int, unit: str) -> None:
    """`<n><unit>` is n times the unit's seconds, spaces around it or not."""
    assert parse_lookback(f"{number}{unit}") == number * UNITS[unit]
    assert parse_lookback(f" {number} {unit} ") == number * UNITS[unit]


@given(st.floats(min_value=0, max_value=1e15) | st.integers(min_value=0, max_value=10**15))
def test_lookback_numbers_are_seconds(seconds: float) -> None:
    """A non-negative number is that many seconds."""
    assert parse_lookback(seconds) == seconds


@given(st.text() | st.floats() | st.integers() | st.booleans() | st.none() | st.lists(st.text()))
def test_lookback_is_seconds_or_a_clear_error(value: object) -> None:
    """Any value parses to finite non-negative seconds or raises ValueError naming it."""
    seconds, reason = None, ""
    try:
        seconds = parse_lookback(value)
    except ValueError as exc:
        reason = str(exc)
    if seconds is None:
        assert "is not a duration" in reason
    else:
        assert math.isfinite(seconds)
        assert seconds >= 0


# --- fingerprint ------------------------------------------------------------------

REFORMATTED = """\
# the same mapping, written differently
"event_type": 'user_identify'
source:
  table: "users"     # a comment
key: [id]
account_id: {column: workspace_id}
user_id:   id
traits:
  created_at:
    column: created_at
    type: datetime
  name: {column: name, omit_null: true}
  email: "email"
"""


def test_fingerprint_ignores_formatting_comments_order_and_path() -> None:
    """Quoting, flow or block style, comments, key order and path leave the fingerprint alone."""
    original = parse_mapping(USERS, path=PATH)
    reformatted = parse_mapping(REFORMATTED, path="elsewhere/users.yml")
    assert reformatted.fingerprint == original.fingerprint
    assert mapping_fingerprint(original) == original.fingerprint


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("  email: email", "  email: mail"),
        ("  email: email", "  email: {column: email, type: text}"),
        ("  email: email", "  email: {column: email, omit_null: false}"),
        ("  email: email", "  email: {column: email, default: none}"),
        ("  email: email", "  email: {sql: email}"),
        ("  email: email", "  email: email\n  role: role"),
        ("type: datetime}", "type: date}"),
        ("{table: users}", "{table: users, where: active}"),
        ("{table: users}", "{table: users, schema: app}"),
        ("key: id", "key: [id, workspace_id]"),
        ("key: id", "key: id\ncursor: updated_at"),
        ("key: id", "key: id\nlookback: 1h"),
        ("key: id", "key: id\ntimezone: Europe/Paris"),
        ("key: id", "key: id\nurl: page"),
        ("user_id: id", "user_id: uid"),
    ],
)
def test_fingerprint_changes_with_the_definition(old: str, new: str) -> None:
    """Any change to a trait, source, key, cursor or option changes the fingerprint."""
    original = parse_mapping(USERS, path=PATH)
    changed = parse_mapping(edited(USERS, old, new), path=PATH)
    assert changed.fingerprint != original.fingerprint


# --- the mappings directory -------------------------------------------------------


def test_problems_of_several_files_are_reported_together(tmp_path: Path) -> None:
    """One MappingError lists every problem of every file, each prefixed with its path."""
    write(tmp_path, "a.yml", edited(USERS, "key: id", "key: []"))
    write(tmp_path, "b.yaml", ACCOUNTS + "lookback: soon\ntimezone: Mars/Base\n")
    write(tmp_path, "c.yml", "traits: [\n")
    write(tmp_path, "ok.yml", USERS)
    with pytest.raises(MappingError) as caught:
        load_mappings(tmp_path)
    assert [p.split(" — ")[0] for p in caught.value.problems] == [
        f"{tmp_path}/a.yml: key: is an empty list",
        f"{tmp_path}/b.yaml: lookback: 'soon' is not a duration",
        f"{tmp_path}/b.yaml: timezone: unknown time zone 'Mars/Base'",
        f"{tmp_path}/c.yml: line 2, column 1: while parsing a flow node,"
        " expected the node content, but found '<stream end>'",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_same_stream_in_two_files_names_both(tmp_path: Path) -> None:
    """Two files declaring one stream name is a problem naming both files."""
    write(tmp_path, "users.yml", USERS)
    write(tmp_path, "users2.yml", USERS + "stream: users\n")
    with pytest.raises(MappingError) as caught:
        load_mappings(tmp_path)
    assert caught.value.problems == [
        f"{tmp_path}/users2.yml: stream: 'users' is also declared in {tmp_path}/users.yml"
        " — give each file its own stream name"
    ]


def test_accounts_come_first_then_users_each_by_name(tmp_path: Path) -> None:
    """Account streams come before user streams, and each group is sorted by stream name."""
    for name, text in [("zeta", USERS), ("omega", ACCOUNTS), ("alpha", USERS), ("beta", ACCOUNTS)]:
        write(tmp_path, f"{name}.yml", text)
    assert [m.stream for m in load_mappings(tmp_path)] == ["beta", "omega", "alpha", "zeta"]


def test_streams_filter_keeps_only_the_named_streams(tmp_path: Path) -> None:
    """`streams` keeps the named streams; an empty filter keeps them all."""
    write(tmp_path, "users.yml", USERS)
    write(tmp_path, "workspaces.yml", ACCOUNTS)
    write(tmp_path, "admins.yml", USERS)
    assert [m.stream for m in load_mappings(tmp_path, streams=["users"])] == ["users"]
    assert [m.stream for m in load_mappings(tmp_path, streams=[])] == [
        "workspaces",
        "admins",
        "users",
    ]


def test_unknown_stream_in_filter_lists_the_known_ones(tmp_path: Path) -> None:
    """An unknown stream name suggests the closest known one, or lists them all."""
    write(tmp_path, "users.yml", USERS)
    write(tmp_path, "workspaces.yml", ACCOUNTS)
    with pytest.raises(MappingError) as caught:
        load_mappings(tmp_path, streams=["user", "billing"])
    assert caught.value.problems == [
        f"{tmp_path}: --stream: unknown stream 'user' — did you mean 'users'?",
        f"{tmp_path}: --stream: unknown stream 'billing' — known streams: users, workspaces",
    ]


def test_filter_knows_the_stream_of_a_broken_file(tmp_path: Path) -> None:
    """Asking for a stream whose file is broken reports that file's problem, no unknown stream."""
    write(tmp_path, "users.yml", USERS + "lookback: soon\n")
    with pytest.raises(MappingError) as caught:
        load_mappings(tmp_path, streams=["users"])
    (problem,) = caught.value.problems
    assert problem.startswith(f"{tmp_path}/users.yml: lookback:")


def test_only_visible_yaml_files_are_read(tmp_path: Path) -> None:
    """Hidden files, other extensions and directories in the mappings dir are ignored."""
    write(tmp_path, "users.yml", USERS)
    write(tmp_path, ".#users.yml", "not: [yaml")
    write(tmp_path, "README.md", "# notes")
    write(tmp_path, "users.yml.bak", "broken: [")
    (tmp_path / "old.yml").mkdir()
    assert [m.stream for m in load_mappings(tmp_path)] == ["users"]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp / "missing", "mappings directory does not exist"),
        (lambda tmp: write(tmp, "users.yml", USERS), "is not a directory"),
        (lambda tmp: tmp, "no mapping files (*.yml, *.yaml)"),
    ],
)
def test_directory_problems_say_how_to_point_elsewhere(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    """A missing path, a file or an empty directory says to use --mappings DIR or ETL_MAPPINGS."""
    directory = make(tmp_path)
    with pytest.raises(MappingError) as caught:
        load_mappings(directory)
    (reported,) = caught.value.problems
    assert reported.startswith(f"{directory}: {problem} — ")
    assert "--mappings DIR or set ETL_MAPPINGS" in reported


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported with the byte offset, alongside other files."""
    (tmp_path / "users.yml").write_bytes(USERS.encode() + b"  bad: caf\xe9\n")
    write(tmp_path, "workspaces.yml", ACCOUNTS)
    with pytest.raises(MappingError) as caught:
        load_mappings(tmp_path)
    assert caught.value.problems == [
        f"{tmp_path}/users.yml: byte {len(USERS) + len('  bad: caf')}: not UTF-8 text"
        " — save the file as UTF-8"
    ]


# --- related, full_every, on_gone (SPEC §9) ----------------------------------------

RELATED = """\
related:
  - table: memberships
    key: user_id
    cursor: updated_at
  - query: "SELECT m.user_id, w.updated_at FROM memberships m JOIN workspaces w ON w.id = m.ws"
    key: user_id
    cursor: updated_at
    lookback: 1h
full_every: 1d
on_gone:
  traits: {deleted: true, status: gone, tags: [a, b]}
"""


def test_related_full_every_and_on_gone_are_parsed() -> None:
    """Each related entry keeps its source, key, cursor and lookback (default: the stream's)."""
    mapping = parse_mapping(USERS + "lookback: 5m\n" + RELATED, path=PATH)
    table, query = mapping.related
    assert (table.source, table.key, table.cursor) == (
        Source(table="memberships"),
        ("user_id",),
        "updated_at",
    )
    assert (table.lookback_seconds, query.lookback_seconds) == (300.0, 3600.0)
    assert query.source.query is not None
    assert query.source.query.startswith("SELECT m.user_id")
    assert table.label == "memberships(user_id)@updated_at"
    assert query.label.startswith("query:")
    assert mapping.full_every_seconds == 86400.0
    assert mapping.on_gone == (("deleted", True), ("status", "gone"), ("tags", ("a", "b")))


def test_full_every_defaults_to_a_week_and_never_turns_it_off() -> None:
    """Without full_every a stream reads fully once a week; `never` means no periodic full read."""
    assert parse_mapping(USERS, path=PATH).full_every_seconds == 7 * 86400.0
    assert parse_mapping(USERS + "full_every: never\n", path=PATH).full_every_seconds is None
    assert (parse_mapping(USERS, path=PATH).related, parse_mapping(USERS, path=PATH).on_gone) == (
        (),
        (),
    )


def test_fingerprint_changes_with_related_but_not_with_full_every_or_on_gone() -> None:
    """Adding a related table re-maps the stream (SPEC §9); the full-read clock and the
    gone traits change no payload, so they leave the fingerprint (and the state) alone."""
    plain = parse_mapping(USERS, path=PATH).fingerprint
    gone = USERS + "full_every: 1d\non_gone: {traits: {deleted: true}}\n"
    assert parse_mapping(gone, path=PATH).fingerprint == plain
    assert parse_mapping(USERS + RELATED, path=PATH).fingerprint != plain


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            "related: {table: memberships}\n",
            "related: must be a list, got a mapping — list the tables",
        ),
        ("related: []\n", "related: is an empty list"),
        ("related: [memberships]\n", "related.0: must be a mapping, got 'memberships'"),
        (
            "related: [{key: user_id, cursor: updated_at}]\n",
            "related.0: has neither 'table' nor 'query'",
        ),
        (
            "related: [{table: m, key: [user_id, ws], cursor: updated_at}]\n",
            "related.0.key: has 2 column(s), the stream's key has 1 (id)",
        ),
        ("related: [{table: m, cursor: updated_at}]\n", "related.0: has no key — add key:"),
        ("related: [{table: m, key: user_id}]\n", "related.0.cursor: is missing"),
        (
            "related: [{table: m, key: user_id, cursor: u, lookback: soon}]\n",
            "related.0.lookback: 'soon' is not a duration",
        ),
        (
            "related: [{table: m, key: user_id, cursor: u, wher: x}]\n",
            "related.0.wher: unknown key 'wher' — did you mean 'where'?",
        ),
        (
            "related: [{table: m, key: user_id, cursor: u}, {table: m, key: user_id, cursor: u}]\n",
            "related: lists m(user_id)@u more than once",
        ),
        ("full_every: 0\n", "full_every: 0 is not a positive duration"),
        ("full_every: null\n", "full_every: null is not a duration"),
        ("on_gone: true\n", "on_gone: must be a mapping, got true"),
        ("on_gone: {traits: {}}\n", "on_gone.traits: is empty"),
        ("on_gone: {deleted: true}\n", "on_gone.deleted: unknown key 'deleted'"),
        (
            "on_gone: {account_id: x, traits: {deleted: true}}\n",
            "on_gone.account_id: sets an id",
        ),
        ("on_gone: {traits: {email: gone}}\n", "on_gone.traits.email: sets 'email', which"),
        ("on_gone: {traits: {deleted: null}}\n", "on_gone.traits.deleted: is null"),
        ("on_gone: {traits: {deleted: {a: 1}}}\n", "on_gone.traits.deleted: must be text"),
    ],
)
def test_bad_related_full_every_and_on_gone_are_mapping_errors(extra: str, problem: str) -> None:
    """Each bad related/full_every/on_gone value is one `file: key: problem — fix`."""
    found = problems_of(USERS + extra)
    assert any(f"{PATH}: {problem}" in line for line in found), found


def test_on_gone_may_not_set_an_account_streams_name() -> None:
    """account_identify requires only `name`: on_gone may set anything else, not that."""
    assert parse_mapping(ACCOUNTS + "on_gone: {traits: {email: x}}\n", path=PATH).on_gone
    assert (
        "on_gone.traits.name: sets 'name'"
        in problems_of(ACCOUNTS + "on_gone: {traits: {name: x}}\n")[0]
    )
