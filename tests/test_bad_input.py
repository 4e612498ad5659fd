"""Hardening against bad input and hostile environments: a catalogue.

Each case feeds the real `etl` (the CLI in-process, or a process of its own
where a signal must reach it) messy data or a broken environment, and asserts
the exit code (SPEC §3), the message (what, where, the fix) and that no record
is lost or wrongly marked as sent. Sources are real SQLite and PostgreSQL
databases; the API is the real local receiver, or a one-trick HTTP server on
127.0.0.1. docs/troubleshooting.md lists the messages and what to do.

Mapping files: exit 2 before the source is opened, no state created.
   1  a key given twice       traits.email: duplicate key 'email' on lines N and N+1
   2  an unknown key          traits.created_at.colum: unknown key — did you mean 'column'?
   3  YAML 1.1 surprises      NO, 012, 2024-01-01 are sent as "NO", 12, "2024-01-01" (exit 0)
   4  no mappings directory   mappings directory does not exist — … --mappings DIR
   5  no *.yml in it          no mapping files (*.yml, *.yaml)
   6  a list at top level     (top level): must be a mapping of keys, got a list
   7  column and sql          traits.name: has both 'column' and 'sql'
   8  user_id not mapped      user_id: is missing — add user_id: COLUMN
   9  email not mapped        traits: user_identify requires email, not mapped here
  10  an unknown type         traits.is_admin.type: unknown value 'bool' — did you mean 'boolean'?
  11  a tab in the YAML       line N, column 1: … found character '\t' — indent with spaces
  12  a key column twice      key: lists 'id' more than once
  13  a query, not a SELECT   source.query: must start with SELECT or WITH
  14  one stream, two files   stream: 'users' is also declared in …/users-old.yml
  15  a Latin-1 file          byte 4: not UTF-8 text — save the file as UTF-8
  16  --stream with a typo    --stream: unknown stream 'user' — did you mean 'users'?
  17  SQL-like identifiers    table `app users"; DROP TABLE users; --`, column
  18    (SQLite, PostgreSQL)    `na"me; DROP TABLE users; --`: quoted, read, `users` survives
  19  a failing where:        exit 2 before anything is sent (every stream's queries are
  20  a failing sql:            prepared first): source.where: '…' fails in the database;
                                `validate --check-source` exits 2 with that same line

Source data: the bad row is listed invalid with its reason (output, `etl runs`),
never sent, never marked as sent; the other rows go out; exit 3.
  21  NULL email              required trait 'email' is missing or empty
  22  empty email             idem
  23  NULL part of a name     required trait 'name' is missing or empty (a `sql:` concatenation)
  24  NULL account id         account_id is missing or empty
  25  empty user id           user_id is missing or empty
  26  emoji, other scripts    sent unchanged
  27  a NUL character         email: text contains a NUL character
  28  invalid UTF-8 (SQLite)  name: text is not valid UTF-8 (the read used to abort)
  29  100 KB of text          event is 100,… bytes, over the 32 KB limit — drop or trim big traits
  30  a BLOB                  role: binary value — map it with type: text and an encoding
  31  years 1 and 9999        sent as 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z
  32  text in a timestamp     created_at: 'yesterday' is not an ISO-8601 datetime
  33  a query repeating a key and returning a NULL key, page size 1: `duplicate key: … make
        `key` unique` and `key column is NULL`; no row lost at a page boundary (all were)
  34  a column dropped        exit 2 before sending: traits.role: no column 'role' (columns: …)
        since the last run      — fix the column name; state kept, no run started
  35  a column renamed (PG)   exit 2: the same, listing the columns there are
  36  a table dropped         exit 2: source.table: no table 'workspaces' (was a traceback)
  37  a row dated 2100        sent; the watermark stays at the database's clock
  38  a mixed-type cursor     exit 1: cursor: updated_at holds integers and also str values
  39-57  PostgreSQL, one sync over hostile rows: numeric NaN and float ±Infinity (is not a
        finite number); 1e30 and 2^53+1 (beyond 2^53 … map it as type: text); bytea; nested
        jsonb (flatten it with sql:); jsonb arrays (mixed scalars sent as text, nested or
        null elements invalid); text[]; timestamp ±infinity and date infinity (has no
        ISO-8601 form — … CASE WHEN isfinite(col) THEN col END; psycopg used to abort the
        read); years 1 and 9999; emoji; ±infinity cursors at page boundaries. Each fix the
        message advises, applied in a second mapping, delivers the row.

Environment
  58-60  no token, API key or workspace key: exit 2 naming the variable; nothing read
  61  http:// off loopback    exit 2: would send the token in clear text … use https://
  62  no --token-file         exit 2: --token-file …: cannot read it (No such file or directory)
  63  source port closed      exit 1: source postgresql+psycopg://etl:***@…: cannot connect
  64  a malformed source URL  exit 2: --source: invalid literal for int() … (was a traceback)
  65  a typo in a SQLite path exit 1: no such file (SQLite used to create it, empty)
  66  a refused role (PG)     exit 1: role "…" is not permitted to log in; password shown as ***
  67  endpoint port closed    batch.retry per attempt; exit 1: gave up after 3 attempt(s)
  68  state under a file      exit 1: cannot create the file (File exists: /etc/passwd)
  69  state is a directory    exit 1: cannot open it: unable to open database file
  70  state is not SQLite     exit 1: file is not a database — … move a corrupted file aside
  71  a torn state file       exit 1: database disk image is malformed
  72  another tool's tables   exit 1: table etl_runs is not etl's (no column …) (it used to
                                send, then fail to record)
  73  state from a newer etl  exit 1: written by a newer etl (schema 2, this etl knows 1)
  74  the lock is held        exit 4 naming pid, host, command and start
  75  disk full mid-run       exit 1: database or disk is full — check the disk; the next run
                                delivers every record under the same event ids
  76  SIGTERM mid-run         exit 1: stopped by a signal (now within a page); state marks
                                nothing unreceived as sent; the next run delivers the rest

Answers from the API: exit 1, nothing marked as sent, the token nowhere.
  77  HTML 200                HTTP 200 with a non-JSON body (text/html) … proxy or login page
  78  empty 200               HTTP 200 with an empty body
  79  200 {"message": …}      HTTP 200 but the API refused the batch: workspace is suspended
  80  302                     HTTP 302 redirect to nowhere, not followed
  81  a body that never ends  read timeouts, then gave up after 3 attempt(s)
  82  503 forever             gave up after 3 attempt(s) … last answer: HTTP 503
  83  a 401 echoing the token HTTP 401: the token is wrong or missing — check HYPERENGAGE_TOKEN;
                                the token in no log line, JSON or console
  84  a 400 for one record    that one rejected and kept (`etl state show`), the rest sent; exit 3

Property
  85  random rows of any SQLite scalar in a real table, one `etl sync --page-size 3`:
      exit 0 or 3, never 1; each row received or listed invalid with a reason. (The pure
      form: tests/test_transform.py::test_any_row_becomes_a_valid_event_or_an_invalid_record.)

Related tables, full reads, gone records (SPEC §9): exit 2, nothing read or sent.
  86  a related key of the wrong arity   related.0.key: has 2 column(s), the stream's key has 1
  87  a related table without cursor     related.0.cursor: is missing — add cursor: …
  88  an on_gone trait that sets an id   on_gone.traits.user_id: 'user_id' is an id, not a trait
  89  an on_gone required trait          on_gone.traits.name: sets 'name', which user_identify
                                           requires: a gone record keeps its last-sent name
  90  a full_every that is no duration   full_every: 'weekly' is not a duration — write 12h, 1d…
  91  a name of two empty strings        required trait 'name' is only whitespace (' ') (SQLite
                                           rows, with 21-32)
  92  a related table or column missing validate/sync/diff exit 2: related.0.key: no column 'owner'
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from conftest import PG_ADMIN_URL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    REPO,
    TOKEN,
    cli_env,
    copy_mappings,
    run_cli,
    seed,
    user_id,
    user_row,
    users,
)

import etl.api
import etl.delivery.load
from etl.receiver.faults import FaultPlan
from etl.receiver.server import RunningReceiver, start_receiver
from etl.state.schema import SCHEMA_VERSION
from etl.state.store import RunRecord, StateStore

HERE = Path(__file__).resolve().parent
CLOSED_PORT = 9  # discard: nothing listens on it on 127.0.0.1
# Where a source URL proves that nothing was read: connecting to it fails (exit 1).
UNREADABLE_SOURCE = f"postgresql+psycopg://etl:s3cret-pw@127.0.0.1:{CLOSED_PORT}/app"


# ---------------------------------------------------------------- helpers


@dataclasses.dataclass
class Scene:
    """A SQLite source seeded with the demo schema, the example mappings, the real
    receiver, and the environment a scheduled `etl sync` would have."""

    tmp: Path
    source_url: str
    receiver: RunningReceiver
    env: dict[str, str]

    @property
    def mappings(self) -> Path:
        return self.tmp / "mappings"

    @property
    def state_file(self) -> Path:
        return self.tmp / "state.db"

    def run(self, *args: str, **env: str) -> Result:
        return run_cli(list(args), {**self.env, **env})

    def execute(self, *statements: Any) -> None:
        execute(self.source_url, *statements)

    def sent(self, event_type: str = "user_identify") -> dict[str, dict[str, Any]]:
        """The last event received per user (or account) id."""
        field = "user_id" if event_type == "user_identify" else "account_id"
        return {e[field]: e for e in self.receiver.events() if e["event_type"] == event_type}


def execute(url: str, *statements: Any) -> None:
    """Run statements (SQL text or SQLAlchemy) on `url` in one transaction."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                if isinstance(statement, str):
                    conn.exec_driver_sql(statement)
                else:
                    conn.execute(statement)
    finally:
        engine.dispose()


@pytest.fixture
def scene(tmp_path: Path, sqlite_url: str, receiver: RunningReceiver) -> Scene:
    seed(sqlite_url, n_workspaces=3, n_users=6)
    copy_mappings(tmp_path / "mappings")
    return Scene(tmp_path, sqlite_url, receiver, cli_env(tmp_path, sqlite_url, receiver.url))


def state_of(state_url: str) -> dict[str, Any]:
    """What the state store holds: per stream its watermark and sent keys; the runs."""
    store = StateStore(state_url, readonly=True)
    try:
        streams = {s.stream: s for s in store.summary()}
        return {
            "watermarks": {name: s.watermark for name, s in streams.items()},
            "keys": {name: set(store.sent_keys(name)) for name in streams},
            "runs": store.runs(),
            "rejected": store.rejected(),
        }
    finally:
        store.close()


def invalid_of(run: RunRecord, stream: str) -> dict[str, str]:
    """The invalid records a run listed for a stream: key -> reason."""
    listed = next(s for s in run.streams if s["stream"] == stream)["invalid_records"]
    return dict(listed)


def log_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry budget of 3 attempts, 0.5 s read timeouts and tiny backoffs (the
    defaults, 8 attempts and 30 s timeouts, are for production)."""
    original = etl.api.delivery_settings

    def delivery_settings(**kwargs: Any) -> Any:
        settings = original(**kwargs)
        return dataclasses.replace(
            settings, max_attempts=3, timeout_seconds=0.5, max_retry_seconds=10.0
        )

    monkeypatch.setattr(etl.api, "delivery_settings", delivery_settings)
    monkeypatch.setattr(etl.delivery.load, "BACKOFF_BASE", 0.01)


Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@contextlib.contextmanager
def answering(respond: Respond) -> Iterator[str]:
    """A one-trick HTTP server on 127.0.0.1 that answers every POST with `respond`;
    yields its event endpoint. `respond` gets an event set when the server stops."""
    stopping = threading.Event()
    posts: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            respond(self, stopping)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/api/v1/s2s/event"
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def reply(status: int, body: bytes, content_type: str = "application/json") -> Respond:
    def respond(handler: BaseHTTPRequestHandler, _stopping: threading.Event) -> None:
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def write_mapping(scene: Scene, name: str, text: str) -> Path:
    path = scene.mappings / name
    path.write_text(text)
    return path


def users_yml() -> str:
    return (REPO / "mappings" / "users.yml").read_text()


# ================================================================ mapping files


def _duplicate_key(text: str) -> str:
    return text.replace("  email: email\n", "  email: email\n  email: mail\n")


def line_of(text: str, needle: str) -> int:
    """The 1-based line number of the first line of `text` containing `needle`."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def _mapping_cases() -> list[Any]:
    """(id, how to break users.yml, what stderr must say)."""
    base = users_yml()
    first = line_of(base, "  email: email")
    tabbed = base.replace("  role: role\n", "  role: role\n\trank: role\n")
    return [
        pytest.param(
            _duplicate_key(base),
            [
                f"users.yml: traits.email: duplicate key 'email' on lines {first} and {first + 1}",
                "keep only one of them",
            ],
            id="01-duplicate-key",
        ),
        pytest.param(
            base.replace("{column: created_at, type: datetime}", "{colum: created_at}"),
            ["users.yml: traits.created_at.colum: unknown key 'colum'", "did you mean 'column'?"],
            id="02-unknown-key",
        ),
        pytest.param(
            "- event_type: user_identify\n- source: {table: users}\n",
            ["users.yml: (top level): must be a mapping of keys, got a list", "mappings/users.yml"],
            id="06-top-level-list",
        ),
        pytest.param(
            base.replace(
                "name: {sql: \"first_name || ' ' || last_name\"}",
                "name: {column: last_name, sql: \"first_name || ' ' || last_name\"}",
            ),
            ["users.yml: traits.name: has both 'column' and 'sql'", "keep exactly one of column"],
            id="07-column-and-sql",
        ),
        pytest.param(
            base.replace("user_id: id\n", ""),
            ["users.yml: user_id: is missing — add user_id: COLUMN"],
            id="08-no-user-id",
        ),
        pytest.param(
            base.replace("  email: email\n", ""),
            ["users.yml: traits: user_identify requires email, not mapped here", "`email: COLUMN`"],
            id="09-required-trait-unmapped",
        ),
        pytest.param(
            base.replace("{column: is_admin, type: boolean}", "{column: is_admin, type: bool}"),
            ["users.yml: traits.is_admin.type: unknown value 'bool'", "did you mean 'boolean'?"],
            id="10-unknown-type",
        ),
        pytest.param(
            tabbed,
            [
                f"users.yml: line {line_of(tabbed, 'rank')}, column 1: while scanning",
                "found character '\\t' that cannot start any token",
                "indent with spaces: YAML does not allow tabs there",
            ],
            id="11-tab-in-yaml",
        ),
        pytest.param(
            base.replace("key: id", "key: [id, id]"),
            ["users.yml: key: lists 'id' more than once — list each column once"],
            id="12-key-listed-twice",
        ),
        pytest.param(
            base.replace("source:\n  table: users", 'source:\n  query: "DELETE FROM users"'),
            ["users.yml: source.query: must start with SELECT or WITH"],
            id="13-query-not-a-select",
        ),
        pytest.param(
            base + "related:\n  - {table: memberships, key: [user_id, workspace_id], "
            "cursor: updated_at}\n",
            [
                "users.yml: related.0.key: has 2 column(s), the stream's key has 1 (id)",
                "list 1 column(s), in the order of the stream's key",
            ],
            id="86-related-key-arity",
        ),
        pytest.param(
            base + "related:\n  - {table: memberships, key: user_id}\n",
            ["users.yml: related.0.cursor: is missing — add cursor: the column that moves"],
            id="87-related-without-cursor",
        ),
        pytest.param(
            base + "on_gone:\n  traits: {deleted: true, user_id: gone}\n",
            ["users.yml: on_gone.traits.user_id: 'user_id' is an id, not a trait"],
            id="88-on-gone-sets-an-id",
        ),
        pytest.param(
            base + "on_gone:\n  traits: {deleted: true, name: Deleted user}\n",
            [
                "users.yml: on_gone.traits.name: sets 'name', which user_identify requires",
                "use another trait name, e.g. deleted: true",
            ],
            id="89-on-gone-sets-a-required-trait",
        ),
        pytest.param(
            base + "full_every: weekly\n",
            [
                "users.yml: full_every: 'weekly' is not a duration",
                "write a duration such as 12h, 1d or 7d, or never to turn it off",
            ],
            id="90-full-every-not-a-duration",
        ),
    ]


@pytest.mark.parametrize(("text", "words"), _mapping_cases())
def test_a_broken_mapping_file_exits_2_naming_file_key_and_fix_before_reading(
    scene: Scene, text: str, words: list[str]
) -> None:
    """1-2, 6-13, 86-90. A mapping mistake stops `sync` with exit 2 and `file: key: problem — fix`;
    the source is never opened (its URL leads nowhere) and no state is created."""
    write_mapping(scene, "users.yml", text)
    result = scene.run("sync", ETL_SOURCE_URL=UNREADABLE_SOURCE)
    assert result.exit_code == 2, result.stderr
    for phrase in words:
        assert phrase in result.stderr
    assert "s3cret-pw" not in result.stderr
    assert not scene.state_file.exists()
    assert scene.receiver.requests() == []


def test_yaml_1_1_surprises_are_sent_as_written(scene: Scene) -> None:
    """3. `NO` (Norway), `012` and an unquoted date are read as YAML 1.2: the text
    "NO", the number 12 and the text "2024-01-01", not false, 10 and a date."""
    text = (
        users_yml() + "  country: {const: NO}\n  tier: {const: 012}\n  since: {const: 2024-01-01}\n"
    )
    write_mapping(scene, "users.yml", text)
    result = scene.run("sync")
    assert result.exit_code == 0, result.stderr
    traits = scene.sent()[user_id(1)]["traits"]
    assert (traits["country"], traits["tier"], traits["since"]) == ("NO", 12, "2024-01-01")


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        pytest.param("missing", "mappings directory does not exist", id="04-no-directory"),
        pytest.param("empty", "no mapping files (*.yml, *.yaml)", id="05-empty-directory"),
    ],
)
def test_a_missing_or_empty_mappings_directory_exits_2(
    scene: Scene, layout: str, words: str
) -> None:
    """4-5. No mappings directory, or one without *.yml: exit 2, saying how to point elsewhere."""
    target = scene.tmp / "nowhere" if layout == "missing" else scene.tmp / "empty"
    if layout == "empty":
        target.mkdir()
        (target / "README.txt").write_text("mappings go here")
    result = scene.run("sync", ETL_MAPPINGS=str(target))
    assert result.exit_code == 2
    assert f"{target}: {words}" in result.stderr
    assert "--mappings DIR or set ETL_MAPPINGS" in result.stderr
    assert not scene.state_file.exists()


def test_two_files_declaring_one_stream_exit_2_naming_both(scene: Scene) -> None:
    """14. A copy of users.yml left beside it (same `stream:`) would send every user
    twice: exit 2 naming both files."""
    write_mapping(scene, "users-old.yml", "stream: users\n" + users_yml())
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "users.yml: stream: 'users' is also declared in" in result.stderr
    assert "users-old.yml" in result.stderr
    assert "give each file its own stream name" in result.stderr


def test_a_mapping_file_that_is_not_utf8_exits_2_with_the_byte(scene: Scene) -> None:
    """15. A file saved as Latin-1 names the offending byte and says to save it as UTF-8."""
    path = scene.mappings / "users.yml"
    path.write_bytes(users_yml().replace("# Users", "# Usérs").encode("latin-1"))
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "users.yml: byte 4: not UTF-8 text — save the file as UTF-8" in result.stderr


def test_an_unknown_stream_name_exits_2_with_a_suggestion(scene: Scene) -> None:
    """16. `--stream user` (a typo) exits 2 and suggests `users`."""
    result = scene.run("sync", "--stream", "user")
    assert result.exit_code == 2
    assert "--stream: unknown stream 'user' — did you mean 'users'?" in result.stderr


HOSTILE_COLUMN = 'na"me; DROP TABLE users; --'
HOSTILE_TABLE = 'app users"; DROP TABLE users; --'


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("sqlite_url", id="17-sqlite"),
        pytest.param("pg_url", marks=pytest.mark.postgres, id="18-postgresql"),
    ],
)
def test_identifiers_with_quotes_spaces_and_sql_are_quoted_never_run(
    scene: Scene, source: str, request: pytest.FixtureRequest
) -> None:
    """17-18. A table and a column literally named like SQL injections are read as
    names: the value arrives and the `users` table survives (SQLite and PostgreSQL)."""
    url = scene.source_url if source == "sqlite_url" else request.getfixturevalue("pg_url")
    if source == "pg_url":
        seed(url, n_workspaces=1, n_users=1)
    table = sa.Table(
        HOSTILE_TABLE,
        sa.MetaData(),
        sa.Column("id", sa.String(10), primary_key=True),
        sa.Column(HOSTILE_COLUMN, sa.String(50)),
        sa.Column("created at", sa.DateTime(timezone=True)),
    )
    engine = sa.create_engine(url)
    table.create(engine)
    engine.dispose()
    execute(
        url,
        table.insert().values(
            {"id": "u1", HOSTILE_COLUMN: "Robert'); --", "created at": dt.datetime(2024, 1, 2)}
        ),
    )
    (scene.mappings / "workspaces.yml").unlink()
    write_mapping(
        scene,
        "users.yml",
        json.dumps(
            {
                "stream": "bobby",
                "event_type": "user_identify",
                "source": {"table": HOSTILE_TABLE},
                "key": "id",
                "user_id": "id",
                "account_id": {"const": "acme"},
                "traits": {
                    "email": {"const": "bobby@example.com"},
                    "name": HOSTILE_COLUMN,
                    "created_at": "created at",
                },
            }
        ),
    )
    result = scene.run("sync", ETL_SOURCE_URL=url)
    assert result.exit_code == 0, result.stderr
    assert scene.sent()["u1"]["traits"]["name"] == "Robert'); --"
    engine = sa.create_engine(url)
    try:
        assert sa.inspect(engine).has_table("users")
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(users)).scalar() >= 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("edit", "key", "expression"),
    [
        pytest.param(
            ('where: "deleted_at IS NULL"', 'where: "deleted_at IS NUL"'),
            "source.where",
            "deleted_at IS NUL",
            id="19-where-fails",
        ),
        pytest.param(
            ("website: {sql: \"'https://' || domain\"}", 'website: {sql: "concat_ws(domain)"}'),
            "traits.website.sql",
            "concat_ws(domain)",
            id="20-sql-fails",
        ),
    ],
)
def test_a_where_or_sql_that_fails_in_the_database_names_stream_and_expression(
    scene: Scene, edit: tuple[str, str], key: str, expression: str
) -> None:
    """19-20. `sync` exits 2 before sending, naming the file, the key and the expression
    (nothing sent, no watermark); `validate --check-source` exits 2 saying the same."""
    path = scene.mappings / "workspaces.yml"
    path.write_text(path.read_text().replace(*edit))
    result = scene.run("sync")
    assert result.exit_code == 2, result.stderr
    assert f"workspaces.yml: {key}: {expression!r} fails in the database" in result.stderr
    assert scene.receiver.requests() == []
    assert "workspaces" not in state_of(scene.env["ETL_STATE_URL"])["watermarks"]
    checked = scene.run("validate", "--check-source")
    assert checked.exit_code == 2
    assert f"workspaces.yml: {key}: {expression!r} fails in the database" in checked.stderr
    assert "fix the SQL" in checked.stderr


# ================================================================ source data, SQLite

# One sync over users made hostile one way each; every case checks its own user.
SQLITE_ROWS: dict[str, tuple[int, Any, str | None]] = {
    # case id: (user number, the change, the reason; None: delivered)
    "21-null-email": (1, {"email": None}, "required trait 'email' is missing or empty"),
    "22-empty-email": (2, {"email": ""}, "required trait 'email' is missing or empty"),
    "23-null-name-part": (3, {"first_name": None}, "required trait 'name' is missing or empty"),
    "24-null-account-id": (4, {"workspace_id": None}, "account_id is missing or empty"),
    "25-empty-user-id": (
        5,
        "UPDATE users SET id = '' WHERE id = :id",
        "user_id is missing or empty",
    ),
    "26-emoji": (7, {"first_name": "Zoë 🚀 李"}, None),
    "27-nul-character": (
        8,
        {"email": "a\x00b@example.com"},
        "email: text contains a NUL character",
    ),
    "28-invalid-utf8": (
        9,
        "UPDATE users SET last_name = CAST(x'4cff' AS TEXT) WHERE id = :id",
        "name: text is not valid UTF-8",
    ),
    "29-100kb-text": (10, {"role": "x" * 100_000}, "over the 32 KB limit — drop or trim"),
    "30-bytes": (11, {"role": b"\x00\x01admin"}, "role: binary value — map it with type: text"),
    "31-year-1-and-9999": (12, {"created_at": dt.datetime(1, 1, 1, tzinfo=dt.UTC)}, None),
    "32-text-in-a-timestamp-column": (
        13,
        "UPDATE users SET created_at = 'yesterday' WHERE id = :id",
        "created_at: 'yesterday' is not an ISO-8601 datetime",
    ),
    "91-whitespace-name": (
        15,
        {"first_name": "", "last_name": ""},
        "required trait 'name' is only whitespace (' ')",
    ),
}


@pytest.fixture(scope="module")
def sqlite_hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `etl sync` over a SQLite users table where user N carries hostile value N."""
    tmp = tmp_path_factory.mktemp("hostile-sqlite")
    url = f"sqlite:///{tmp / 'source.db'}"
    seed(url, n_workspaces=2, n_users=16)
    for number, change, _ in SQLITE_ROWS.values():
        if isinstance(change, str):
            execute(url, sa.text(change).bindparams(id=user_id(number)))
        else:
            execute(url, users.update().where(users.c.id == user_id(number)).values(**change))
    execute(
        url,
        users.update()
        .where(users.c.id == user_id(14))
        .values(last_login_at=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
    )
    copy_mappings(tmp / "mappings")
    with start_receiver(store=tmp / "received.db", tokens={TOKEN}) as rx:
        env = cli_env(tmp, url, rx.url)
        result = run_cli(["sync"], env)
        events = rx.events()
    state = state_of(env["ETL_STATE_URL"])
    return {"result": result, "events": events, "state": state}


@pytest.mark.parametrize("case", list(SQLITE_ROWS))
def test_a_hostile_sqlite_value_becomes_an_invalid_record_with_its_reason(
    sqlite_hostile: dict[str, Any], case: str
) -> None:
    """21-32, 91. Each bad value makes its record invalid with the reason (listed in the
    output and the run record, never sent, never marked as sent); the good values
    are delivered as written. The run finishes with exit 3."""
    number, _, reason = SQLITE_ROWS[case]
    result, events, state = (sqlite_hostile[k] for k in ("result", "events", "state"))
    assert result.exit_code == 3, result.stderr
    key = "" if case == "25-empty-user-id" else user_id(number)
    sent = {e["user_id"]: e for e in events if e["event_type"] == "user_identify"}
    if reason is None:
        assert key in sent
        assert key in state["keys"]["users"]
        traits = sent[key]["traits"]
        if case == "26-emoji":
            assert traits["name"] == f"Zoë 🚀 李 Lovelace{number}"
        else:
            assert traits["created_at"] == "0001-01-01T00:00:00Z"
            assert sent[user_id(14)]["traits"]["last_login_at"] == "9999-12-31T23:59:59Z"
        return
    invalid = invalid_of(state["runs"][0], "users")
    assert reason in invalid[key]
    assert reason in result.stdout
    assert key not in sent
    assert key not in state["keys"]["users"]
    # the other users went out: one bad row never stops the run
    assert len(sent) == 16 - sum(1 for _, _, r in SQLITE_ROWS.values() if r)


def test_a_query_with_duplicate_and_null_keys_sends_each_key_once(scene: Scene) -> None:
    """33. A `query:` that returns one key twice (a join fan-out) and a row whose key
    is NULL (an outer join): no row is lost even when a keyset page ends on the
    NULL key (page size 1), each key is sent once, the NULL key is invalid; within
    a page the repeat is invalid too, with the fix."""
    columns = ", ".join(c.name for c in users.columns if c.name != "id")
    query = (
        f"SELECT id, {columns} FROM users"
        f" UNION ALL SELECT id, {columns} FROM users WHERE id = '{user_id(2)}'"
        f" UNION ALL SELECT NULL, {columns} FROM users WHERE id = '{user_id(3)}'"
    )
    path = scene.mappings / "users.yml"
    path.write_text(path.read_text().replace("  table: users", f'  query: "{query}"'))
    result = scene.run("sync", "--page-size", "1")
    assert result.exit_code == 3, result.stderr
    state = state_of(scene.env["ETL_STATE_URL"])
    assert invalid_of(state["runs"][0], "users") == {"None": "key column is NULL"}
    received = [e["user_id"] for e in scene.receiver.events() if e["event_type"] == "user_identify"]
    assert sorted(received) == [user_id(i) for i in range(6)]  # each once, none lost
    again = scene.run("sync", "--full")
    assert again.exit_code == 3
    invalid = invalid_of(state_of(scene.env["ETL_STATE_URL"])["runs"][0], "users")
    assert invalid[user_id(2)] == (
        "duplicate key: the query returned this key more than once in this run"
        " — make `key` unique (only the first row was used)"
    )
    assert len(scene.receiver.events()) == 3 + 6  # the repeat was not sent


def test_a_related_table_or_column_that_does_not_exist_is_named_by_check_source(
    scene: Scene,
) -> None:
    """92. A `related:` entry naming a missing table or column: `validate
    --check-source`, `sync` and `diff` exit 2 with `file: related.N.key: no column …
    — fix` before any stream is read; nothing sent, no run recorded."""
    write_mapping(
        scene,
        "users.yml",
        users_yml()
        + "related:\n  - {table: workspaces, key: owner, cursor: updated_at}\n"
        + "  - {table: memberships, key: user_id, cursor: updated_at}\n",
    )
    for command in (["validate", "--check-source"], ["sync"], ["diff"]):
        result = scene.run(*command)
        assert result.exit_code == 2, result.stderr
        assert "users.yml: related.0.key: no column 'owner' in workspaces (columns: " in (
            result.stderr
        )
        assert "users.yml: related.1.table: no table 'memberships' — check the name" in (
            result.stderr
        )
    assert scene.receiver.requests() == []
    assert state_of(scene.env["ETL_STATE_URL"])["runs"] == []


def test_a_column_dropped_since_the_last_run_exits_2_naming_it_state_untouched(
    scene: Scene,
) -> None:
    """34. `role` was dropped after the last run: the check before sending exits 2
    naming the column and the mapping key; the users' watermark and records are as
    they were, and no run was started."""
    assert scene.run("sync").exit_code == 0
    before = state_of(scene.env["ETL_STATE_URL"])
    scene.execute(
        "ALTER TABLE users DROP COLUMN role", "UPDATE users SET updated_at = '2099-01-01'"
    )
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "users.yml: traits.role: no column 'role' in the source (columns: " in result.stderr
    assert "— fix the column name" in result.stderr
    after = state_of(scene.env["ETL_STATE_URL"])
    assert after["watermarks"]["users"] == before["watermarks"]["users"]
    assert after["keys"]["users"] == before["keys"]["users"]
    assert after["runs"] == before["runs"]


@pytest.mark.postgres
def test_a_column_renamed_on_postgresql_names_old_and_new_columns(
    tmp_path: Path, pg_url: str, receiver: RunningReceiver
) -> None:
    """35. `email` renamed to `email_address` on PostgreSQL: exit 2 before sending; the
    message names the missing column and lists the columns there are (the new name
    among them); nothing of the users is marked as sent."""
    seed(pg_url, n_workspaces=1, n_users=3)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, pg_url, receiver.url)
    execute(pg_url, "ALTER TABLE users RENAME COLUMN email TO email_address")
    result = run_cli(["sync"], env)
    assert result.exit_code == 2
    assert "users.yml: traits.email: no column 'email' in the source" in result.stderr
    assert "email_address" in result.stderr
    assert "users" not in state_of(env["ETL_STATE_URL"])["keys"]


def test_a_table_dropped_since_the_last_run_exits_2_naming_it(scene: Scene) -> None:
    """36. The workspaces table is gone: the check before sending exits 2 with the table
    named and the fix, not a traceback; nothing is sent."""
    scene.execute("DROP TABLE workspaces")
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert "workspaces.yml: source.table: no table 'workspaces' — check the name" in result.stderr
    assert scene.receiver.requests() == []


def test_a_future_dated_row_does_not_push_the_watermark_past_later_changes(
    scene: Scene,
) -> None:
    """37. A row stamped in 2100 is sent once; the watermark stays at the database's
    clock, so a change made after the run is still picked up by the next one."""
    scene.execute(
        users.update()
        .where(users.c.id == user_id(1))
        .values(updated_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    )
    assert scene.run("sync").exit_code == 0
    watermark = state_of(scene.env["ETL_STATE_URL"])["watermarks"]["users"]
    assert isinstance(watermark, dt.datetime)
    assert watermark <= dt.datetime.now(dt.UTC)
    scene.execute(
        users.update()
        .where(users.c.id == user_id(2))
        .values(role="owner", updated_at=sa.func.current_timestamp())
    )
    before = len(scene.receiver.events())
    result = scene.run("sync")
    assert result.exit_code == 0
    later = scene.receiver.events()[before:]
    assert [(e["user_id"], e["traits"]["role"]) for e in later] == [(user_id(2), "owner")]


def test_a_cursor_holding_integers_and_text_exits_1_naming_it(scene: Scene) -> None:
    """38. SQLite keeps any type in any column: an `updated_at` holding epoch integers
    in some rows and text in others cannot be a watermark; exit 1 naming the file,
    the cursor and an offending value, before anything is sent."""
    (scene.mappings / "workspaces.yml").unlink()
    scene.execute(
        users.update().where(users.c.id == user_id(0)).values(updated_at=sa.literal(1_700_000_000))
    )
    result = scene.run("sync")
    assert result.exit_code == 1
    assert (
        "users.yml: cursor: updated_at holds integers and also str values such as '2024-03-01"
        in (result.stderr)
    )
    assert "a cursor must be all timestamps or all integers" in result.stderr
    assert scene.receiver.requests() == []


# ================================================================ source data, PostgreSQL

PG_PEOPLE = """
CREATE TABLE people (
    id text PRIMARY KEY, ws text, email text, name text,
    created_at timestamptz, updated_at timestamptz,
    c_num numeric, c_dbl float8, c_big bigint, c_bytes bytea, c_doc jsonb,
    c_arr text[], c_ts timestamptz, c_date date, c_text text
)
"""
# case id: (row id, column, SQL value, untyped outcome, outcome of the fixed mapping)
# An outcome is ("invalid", reason) or ("sent", trait, value); None: not mapped there.
PG_ROWS: dict[str, tuple[str, str, str, tuple[Any, ...], tuple[Any, ...] | None]] = {
    "39-numeric-nan": (
        "nan",
        "c_num",
        "'NaN'",
        ("invalid", "c_num: NaN is not a finite number"),
        ("sent", "num", "NaN"),
    ),
    "40-float-infinity": (
        "inf",
        "c_dbl",
        "'Infinity'",
        ("invalid", "c_dbl: inf is not a finite number"),
        None,
    ),
    "41-float-minus-infinity": (
        "ninf",
        "c_dbl",
        "'-Infinity'",
        ("invalid", "c_dbl: -inf is not a finite number"),
        None,
    ),
    "42-huge-decimal": (
        "huge",
        "c_num",
        "1e30",
        (
            "invalid",
            "c_num: 1000000000000000000000000000000 is beyond 2^53 and would lose "
            "precision — map it as type: text",
        ),
        ("sent", "num", "1000000000000000000000000000000"),
    ),
    "43-bigint-beyond-2^53": (
        "big",
        "c_big",
        str(2**53 + 1),
        (
            "invalid",
            f"c_big: {2**53 + 1} is beyond 2^53 and would lose precision — map it as type: text",
        ),
        ("sent", "big", str(2**53 + 1)),
    ),
    "44-bytea": (
        "bytes",
        "c_bytes",
        "'\\x68c3a9'::bytea",
        ("invalid", "c_bytes: binary value — map it with type: text and an encoding"),
        ("sent", "bytes", "hé"),
    ),
    "45-nested-jsonb": (
        "nested",
        "c_doc",
        """'{"plan": {"tier": "pro"}}'""",
        ("invalid", "c_doc: nested object — flatten it with sql:"),
        ("sent", "tier", "pro"),
    ),
    "46-jsonb-array-of-mixed-scalars": (
        "scalars",
        "c_doc",
        """'[1, true, "x", 2.5]'""",
        ("sent", "c_doc", ["1", "true", "x", "2.5"]),
        None,
    ),
    "47-jsonb-array-nested": (
        "deep",
        "c_doc",
        "'[1, [2]]'",
        ("invalid", "c_doc: array element 1 is nested — flatten it"),
        None,
    ),
    "48-jsonb-array-with-null": (
        "holes",
        "c_doc",
        """'["a", null]'""",
        ("invalid", "c_doc: array element 1 is null"),
        None,
    ),
    "49-text-array": ("arr", "c_arr", """'{a,"b c"}'""", ("sent", "c_arr", ["a", "b c"]), None),
    "50-timestamp-infinity": (
        "ts-inf",
        "c_ts",
        "'infinity'",
        (
            "invalid",
            "c_ts: timestamp with time zone 'infinity' has no ISO-8601 form — store a "
            "real value or NULL, or map it with sql:",
        ),
        ("sent", "ts", None),
    ),
    "51-timestamp-minus-infinity": (
        "ts-ninf",
        "c_ts",
        "'-infinity'",
        ("invalid", "c_ts: timestamp with time zone '-infinity' has no ISO-8601 form"),
        ("sent", "ts", None),
    ),
    "52-date-infinity": (
        "d-inf",
        "c_date",
        "'infinity'",
        ("invalid", "c_date: date 'infinity' has no ISO-8601 form"),
        ("sent", "day", None),
    ),
    "53-year-1": (
        "y1",
        "c_ts",
        "'0001-01-01 00:00:00+00'",
        ("sent", "c_ts", "0001-01-01T00:00:00Z"),
        ("sent", "ts", "0001-01-01T00:00:00Z"),
    ),
    "54-year-9999": (
        "y9999",
        "c_date",
        "'9999-12-31'",
        ("sent", "c_date", "9999-12-31"),
        ("sent", "day", "9999-12-31"),
    ),
    "55-emoji-and-scripts": (
        "emoji",
        "c_text",
        "'Zoë 🚀 李 مرحبا'",
        ("sent", "c_text", "Zoë 🚀 李 مرحبا"),
        None,
    ),
    "56-infinite-cursor": (
        "cur-inf",
        "updated_at",
        "'infinity'",
        ("sent", "email", "cur-inf@x.io"),
        None,
    ),
    "57-minus-infinite-cursor": (
        "cur-ninf",
        "updated_at",
        "'-infinity'",
        ("sent", "email", "cur-ninf@x.io"),
        None,
    ),
}
PEOPLE_YML = """
event_type: user_identify
source: {table: people}
key: id
cursor: updated_at
user_id: id
account_id: ws
traits:
  email: email
  name: name
  created_at: created_at
"""
UNTYPED_TRAITS = "".join(
    f"  {c}: {c}\n"
    for c in ("c_num", "c_dbl", "c_big", "c_bytes", "c_doc", "c_arr", "c_ts", "c_date", "c_text")
)
# What each message advises, applied: text for big numbers, an encoding, sql: to
# flatten or to turn ±infinity into NULL.
FIXED_TRAITS = """  via: {const: fixed}
  num: {sql: "c_num::text"}
  big: {column: c_big, type: text}
  bytes: {column: c_bytes, type: text, encoding: utf-8}
  tier: {sql: "c_doc->'plan'->>'tier'"}
  ts: {sql: "CASE WHEN isfinite(c_ts) THEN c_ts END", type: datetime}
  day: {sql: "CASE WHEN isfinite(c_date) THEN c_date END", type: date}
"""


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own (module-scoped fixtures cannot use pg_url)."""
    name = f"etl_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def pg_hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `etl sync --page-size 2` over a PostgreSQL table holding one hostile value
    per row, through two streams: `people` maps every column as it is, `fixed`
    applies the fix each message advises."""
    tmp = tmp_path_factory.mktemp("hostile-pg")
    with pg_database() as url:
        statements = [PG_PEOPLE]
        for row_id, column, value, _, _ in PG_ROWS.values():
            statements.append(
                "INSERT INTO people (id, ws, email, name, created_at, updated_at)"
                f" VALUES ('{row_id}', 'acme', '{row_id}@x.io', 'P {row_id}', '2024-01-01', now())"
            )
            statements.append(f"UPDATE people SET {column} = {value} WHERE id = '{row_id}'")
        execute(url, *statements)
        (tmp / "mappings").mkdir()
        (tmp / "mappings" / "people.yml").write_text(PEOPLE_YML + UNTYPED_TRAITS)
        (tmp / "mappings" / "fixed.yml").write_text(PEOPLE_YML + FIXED_TRAITS)
        with start_receiver(store=tmp / "received.db", tokens={TOKEN}) as rx:
            env = cli_env(tmp, url, rx.url)
            result = run_cli(["sync", "--page-size", "2"], env)
            events = rx.events()
    return {"result": result, "events": events, "state": state_of(env["ETL_STATE_URL"])}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(PG_ROWS))
def test_a_hostile_postgresql_value_is_invalid_with_a_reason_and_the_advised_fix_works(
    pg_hostile: dict[str, Any], case: str
) -> None:
    """39-57. NaN, ±Infinity, huge numerics, bigints past 2^53, bytea, nested jsonb,
    arrays, ±infinity timestamps and dates (psycopg cannot load them), years 1
    and 9999, emoji, ±infinity cursors at page boundaries: each row is sent exactly
    as SPEC §4 says or listed invalid with its reason, never crashes the run, is
    never marked as sent when invalid; and the fix the reason advises delivers it."""
    row_id, _, _, untyped, fixed = PG_ROWS[case]
    result, events, state = (pg_hostile[k] for k in ("result", "events", "state"))
    assert result.exit_code == 3, result.stderr
    for stream, outcome in (("people", untyped), ("fixed", fixed)):
        if outcome is None:
            continue
        sent = {
            e["user_id"]: e["traits"]
            for e in events
            if ("via" in e["traits"]) == (stream == "fixed")
        }
        if outcome[0] == "invalid":
            assert outcome[1] in invalid_of(state["runs"][0], stream)[row_id]
            assert row_id not in sent
            assert row_id not in state["keys"][stream]
        else:
            _, trait, value = outcome
            assert sent[row_id].get(trait) == value
            assert row_id in state["keys"][stream]


# ================================================================ environment


@pytest.mark.parametrize(
    "missing",
    [
        pytest.param("HYPERENGAGE_TOKEN", id="58-no-token"),
        pytest.param("HYPERENGAGE_API_KEY", id="59-no-api-key"),
        pytest.param("HYPERENGAGE_WORKSPACE_KEY", id="60-no-workspace-key"),
    ],
)
def test_no_token_api_key_or_workspace_key_exits_2_before_anything_is_read(
    scene: Scene, missing: str
) -> None:
    """58-60. A secret left out of the environment: exit 2 naming it and where to
    put it; the source is never opened and no state is created."""
    result = scene.run("sync", ETL_SOURCE_URL=UNREADABLE_SOURCE, **{missing: ""})
    assert result.exit_code == 2
    assert missing in result.stderr
    assert "export" in result.stderr
    assert not scene.state_file.exists()
    assert scene.receiver.requests() == []


def test_plain_http_to_a_remote_host_exits_2(scene: Scene) -> None:
    """61. http:// to anything but loopback would send the token in clear: exit 2."""
    result = scene.run("sync", HYPERENGAGE_ENDPOINT="http://events.hyperengage.io/api/v1/s2s/event")
    assert result.exit_code == 2
    assert "would send the token in clear text to events.hyperengage.io — use https://" in (
        result.stderr
    )
    assert not scene.state_file.exists()


def test_an_unreadable_token_file_exits_2(scene: Scene) -> None:
    """62. `--token-file` that does not exist: exit 2 with the path and the OS's reason."""
    missing = scene.tmp / "token.txt"
    result = scene.run("sync", "--token-file", str(missing), HYPERENGAGE_TOKEN="")
    assert result.exit_code == 2
    assert f"--token-file {missing}: cannot read it (No such file or directory)" in result.stderr


@pytest.mark.parametrize(
    ("url", "words", "code"),
    [
        pytest.param(
            UNREADABLE_SOURCE,
            "source postgresql+psycopg://etl:***@127.0.0.1:9/app: cannot connect:",
            1,
            id="63-closed-port",
        ),
        pytest.param(
            "postgresql+psycopg://etl:s3cret-pw@127.0.0.1:port/app",
            "--source: invalid literal for int() with base 10: 'port' — use a SQLAlchemy URL",
            2,
            id="64-malformed-url",
        ),
        pytest.param(
            "sqlite:///{tmp}/app-typo.db",
            "source sqlite:///{tmp}/app-typo.db: no such file {tmp}/app-typo.db — check --source",
            1,
            id="65-missing-sqlite-file",
        ),
    ],
)
def test_an_unreachable_or_misspelt_source_says_so_without_the_password(
    scene: Scene, url: str, words: str, code: int
) -> None:
    """63-65. A source at a closed port, a malformed URL, a SQLite path with a typo:
    a one-line message, the password masked, nothing sent or created."""
    url, words = url.format(tmp=scene.tmp), words.format(tmp=scene.tmp)
    result = scene.run("sync", ETL_SOURCE_URL=url)
    assert result.exit_code == code, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert scene.receiver.requests() == []
    assert not (scene.tmp / "app-typo.db").exists()


@pytest.mark.postgres
def test_a_role_that_may_not_log_in_fails_without_printing_its_password(
    scene: Scene, pg_url: str
) -> None:
    """66. Credentials PostgreSQL refuses (a role without LOGIN; the test server
    trusts every password on loopback): exit 1, the server's reason, `***` for the
    password, which appears nowhere."""
    role, password = f"etl_nologin_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    execute(PG_ADMIN_URL, f"CREATE ROLE {role} NOLOGIN PASSWORD '{password}'")
    try:
        url = sa.make_url(pg_url).set(username=role, password=password)
        result = scene.run("sync", ETL_SOURCE_URL=url.render_as_string(hide_password=False))
    finally:
        execute(PG_ADMIN_URL, f"DROP ROLE {role}")
    assert result.exit_code == 1
    assert 'cannot connect: connection failed: connection to server at "127.0.0.1", port 5432 ' in (
        result.stderr
    )
    assert f'role "{role}" is not permitted to log in' in result.stderr
    assert f"{role}:***@" in result.stderr
    assert password not in result.stdout + result.stderr


def test_an_unreachable_endpoint_exits_1_at_once_marking_nothing_sent(
    scene: Scene, quick_retries: None
) -> None:
    """67. Nothing listens at the endpoint: exit 1 at the first attempt with "cannot reach
    HOST — check HYPERENGAGE_ENDPOINT" (no retries: the endpoint never answered); no
    record is marked as sent and no watermark moves, so the next run sends everything."""
    result = scene.run(
        "sync", HYPERENGAGE_ENDPOINT=f"http://127.0.0.1:{CLOSED_PORT}/api/v1/s2s/event"
    )
    assert result.exit_code == 1
    assert "cannot reach 127.0.0.1 — check HYPERENGAGE_ENDPOINT" in result.stderr
    assert "ConnectError" in result.stderr
    assert [e["event"] for e in log_events(result.stderr)].count("batch.retry") == 0
    state = state_of(scene.env["ETL_STATE_URL"])
    assert state["keys"] == {} or all(not keys for keys in state["keys"].values())
    assert state["watermarks"] == {} or all(w is None for w in state["watermarks"].values())
    assert state["runs"][0].status == "failed"
    assert scene.run("sync").exit_code == 0
    assert len(scene.sent()) == 6


@pytest.mark.parametrize(
    ("state_url", "words"),
    [
        pytest.param(
            "sqlite:////etc/passwd/etl-state.db",
            "state store sqlite:////etc/passwd/etl-state.db: cannot create the file (File exists:"
            " /etc/passwd) — point --state / ETL_STATE_URL at a writable directory",
            id="68-state-under-a-file",
        ),
        pytest.param(
            "sqlite:///{tmp}",
            "state store sqlite:///{tmp}: cannot open it: unable to open database file",
            id="69-state-is-a-directory",
        ),
    ],
)
def test_a_state_store_that_cannot_be_written_exits_1_before_sending(
    scene: Scene, state_url: str, words: str
) -> None:
    """68-69. A state path that cannot hold a file (root ignores chmod, so: a path
    under a file, or a directory): exit 1 with the path and the fix, nothing sent."""
    state_url, words = state_url.format(tmp=scene.tmp), words.format(tmp=scene.tmp)
    result = scene.run("sync", ETL_STATE_URL=state_url)
    assert result.exit_code == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert scene.receiver.requests() == []


def contents(path: Path) -> str | bytes:
    """A SQLite file's schema and rows as SQL, or its bytes when SQLite cannot read it
    (opening a foreign store switches it to WAL mode: its header is not compared)."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return "\n".join(conn.iterdump())
    except sqlite3.DatabaseError:
        return path.read_bytes()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 400)


def _torn(path: Path) -> None:
    """A real store whose pages past the first were overwritten (a torn copy)."""
    store = StateStore(f"sqlite:///{path}")
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    """Another tool's SQLite file that happens to have an `etl_runs` table."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE etl_runs (id INTEGER PRIMARY KEY, job TEXT, ok INTEGER)")
    conn.close()


def _newer(path: Path) -> None:
    store = StateStore(f"sqlite:///{path}")
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE etl_meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    conn.close()


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        pytest.param(
            _garbage,
            "cannot open it: file is not a database — check --state / ETL_STATE_URL, or move a "
            "corrupted file aside",
            id="70-state-not-a-database",
        ),
        pytest.param(_torn, "database disk image is malformed", id="71-state-torn"),
        pytest.param(
            _foreign,
            "table etl_runs is not etl's (no column command, mode, started_at, finished_at, "
            "status, streams, error, host, pid) — point --state / ETL_STATE_URL at a "
            "database (or file) of its own",
            id="72-state-foreign",
        ),
        pytest.param(
            _newer,
            f"written by a newer etl (schema {SCHEMA_VERSION + 1}, this etl knows "
            f"{SCHEMA_VERSION}) — upgrade etl, or point --state at a fresh store",
            id="73-state-from-a-newer-etl",
        ),
    ],
)
def test_a_corrupted_foreign_or_newer_state_store_exits_1_and_is_left_alone(
    scene: Scene, spoil: Callable[[Path], None], words: str
) -> None:
    """70-73. A state file that is not a database, a torn copy, another tool's tables,
    a store from a newer etl: exit 1 naming the store and what to do, nothing sent,
    and the file is not modified."""
    spoil(scene.state_file)
    before = contents(scene.state_file)
    result = scene.run("sync")
    assert result.exit_code == 1, result.stderr
    assert f"state store sqlite:///{scene.state_file}" in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert scene.receiver.requests() == []
    assert contents(scene.state_file) == before


def test_a_run_holding_the_lock_makes_the_next_exit_4_naming_it(scene: Scene) -> None:
    """74. Another process holds the state store's lock: exit 4 naming its pid, host
    and start, nothing sent; once it lets go, the next run goes through."""
    holder = {"pid": 4242, "host": "etl-1", "command": "sync", "since": "2024-03-01T02:17:00+00:00"}
    scene.run("state", "show")  # nothing to lock yet: the lock file sits beside the store
    lock_path = f"{scene.state_file}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        result = scene.run("sync")
    finally:
        os.close(fd)
    assert result.exit_code == 4
    assert "another run holds the lock" in result.stderr
    assert "pid 4242 on etl-1 (sync, since 2024-03-01T02:17:00+00:00)" in result.stderr
    assert "wait for it to finish, or stop it" in result.stderr
    assert scene.receiver.requests() == []
    assert scene.run("sync").exit_code == 0


class _DiskFull:
    """Makes the state store's SQLite file full after `pages` pages: SQLite's own
    `max_page_count`, so the real "database or disk is full" comes back."""

    def __init__(self, path: Path, pages: int) -> None:
        self.path, self.pages = str(path), pages

    def __call__(self, dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            name = dbapi_conn.execute("PRAGMA database_list").fetchone()[2]
            if name == self.path:
                dbapi_conn.execute(f"PRAGMA max_page_count = {self.pages}")


def test_disk_full_while_saving_state_exits_1_and_the_next_run_loses_nothing(
    scene: Scene,
) -> None:
    """75. The disk fills up while acknowledged batches are being recorded: exit 1
    with SQLite's words and the fix; nothing unacknowledged is marked as sent; the
    next run (disk freed) delivers every record, re-sending any batch it could not
    record under the same event ids."""
    seed_more = [user_row(i) for i in range(6, 200)]
    scene.execute(users.insert().values(seed_more))
    StateStore(scene.env["ETL_STATE_URL"]).close()
    with sqlite3.connect(scene.state_file) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    full = _DiskFull(scene.state_file, pages + 3)
    sa.event.listen(sa.pool.Pool, "connect", full)
    try:
        result = scene.run("sync", "--batch-size", "10")
    finally:
        sa.event.remove(sa.pool.Pool, "connect", full)
    assert result.exit_code == 1
    assert "database or disk is full — check the disk, permissions" in result.stderr
    first = scene.receiver.events()
    assert first  # some batches were delivered before the disk filled up
    state = state_of(scene.env["ETL_STATE_URL"])
    delivered = {e["user_id"] for e in first if e["event_type"] == "user_identify"}
    assert state["keys"].get("users", set()) <= delivered
    assert len(state["keys"].get("users", set())) < 200
    assert scene.run("sync").exit_code == 0
    events = scene.receiver.events()
    assert {e["user_id"] for e in events if e["event_type"] == "user_identify"} == {
        user_id(i) for i in range(200)
    }
    ids: dict[str, set[str]] = {}
    for event in events:
        ids.setdefault(event["user_id"] + event["event_type"], set()).add(event["event_id"])
    assert all(len(v) == 1 for v in ids.values())  # re-sent, never re-worded
    assert state_of(scene.env["ETL_STATE_URL"])["keys"]["users"] == {user_id(i) for i in range(200)}


def child(env: Mapping[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m etl ARGS` as a process of its own, output appended to `log`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "etl", *args],
            env={**os.environ, **env, "PYTHONPATH": path},
            cwd=log.parent,
            stdout=out,
            stderr=out,
        )


def test_sigterm_during_a_run_stops_cleanly_and_the_next_run_finishes(
    tmp_path: Path, sqlite_url: str
) -> None:
    """76. SIGTERM (a deploy, `kubectl delete pod`) mid-run: the in-flight batches
    finish, exit 1 with `run.stopping` and "stopped by a signal"; every record the
    state marks as sent was received, the users' watermark did not move; the next
    run delivers the rest."""
    seed(sqlite_url, n_workspaces=3, n_users=300)
    copy_mappings(tmp_path / "mappings")
    plan = FaultPlan.from_json(json.dumps({"latency_ms": [40, 60]}))
    with start_receiver(store=tmp_path / "received.db", tokens={TOKEN}, faults=plan) as rx:
        env = cli_env(tmp_path, sqlite_url, rx.url, ETL_BATCH_SIZE="10", ETL_CONCURRENCY="1")
        log = tmp_path / "run.log"
        proc = child(env, log, "sync")
        try:
            for _ in range(400):  # at most 20 s
                if any(e["event_type"] == "user_identify" for e in rx.events()):
                    break
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        output = log.read_text()
        assert code == 1, output[-3000:]
        assert '"event": "run.stopping"' in output
        assert '"signal": "SIGTERM"' in output
        assert "stopped by a signal after the in-flight batches were acknowledged" in output
        state = state_of(env["ETL_STATE_URL"])
        received = {e["user_id"] for e in rx.events() if e["event_type"] == "user_identify"}
        assert state["keys"]["users"] <= received
        assert len(received) < 300
        assert state["watermarks"].get("users") is None
        assert state["runs"][0].status == "failed"
        assert run_cli(["sync"], env).exit_code == 0
        received = {e["user_id"] for e in rx.events() if e["event_type"] == "user_identify"}
        assert received == {user_id(i) for i in range(300)}


# ================================================================ responses


def _swallowing(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
    """Headers and the start of a body, then nothing: a response that never ends."""
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", "1000")
    handler.end_headers()
    handler.wfile.write(b'{"status":')
    handler.wfile.flush()
    stopping.wait(30)


@pytest.mark.parametrize(
    ("respond", "words"),
    [
        pytest.param(
            reply(200, b"<html><body>Sign in to continue</body></html>", "text/html"),
            "answered HTTP 200 with a non-JSON body (text/html) instead of the API's JSON — "
            "likely a proxy or login page in front of the endpoint; check HYPERENGAGE_ENDPOINT",
            id="77-html-200",
        ),
        pytest.param(
            reply(200, b""),
            "answered HTTP 200 with an empty body (application/json)",
            id="78-empty-200",
        ),
        pytest.param(
            reply(200, b'{"message": "workspace is suspended", "error": ""}'),
            "answered HTTP 200 but the API refused the batch: workspace is suspended — fix what "
            "the message names",
            id="79-200-with-a-message",
        ),
        pytest.param(
            reply(302, b"", "text/html"),
            "answered HTTP 302 redirect to nowhere, not followed (a 301/302 turns a POST into a "
            "GET) — set HYPERENGAGE_ENDPOINT to the final URL",
            id="80-redirect",
        ),
        pytest.param(
            _swallowing,
            "; last answer: ReadTimeout",
            id="81-never-ending-response",
        ),
        pytest.param(
            reply(503, b'{"message": "maintenance"}'),
            "; last answer: HTTP 503 Service Unavailable: maintenance — the API or the network",
            id="82-503-forever",
        ),
    ],
)
def test_an_answer_that_is_not_an_acknowledgement_exits_1_marking_nothing_sent(
    scene: Scene, quick_retries: None, respond: Respond, words: str
) -> None:
    """77-82. A proxy's login page, an empty 200, a 200 that says no, a redirect, a
    body that never ends (read timeout), a 503 that never heals: exit 1 with the
    cause and the fix; no record is marked as sent, no watermark moves, and the
    token appears nowhere."""
    with answering(respond) as endpoint:
        result = scene.run("sync", HYPERENGAGE_ENDPOINT=endpoint)
    assert result.exit_code == 1, result.stderr
    assert words in result.stderr
    if "last answer" in words:
        assert "gave up after 3 attempt(s)" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    state = state_of(scene.env["ETL_STATE_URL"])
    assert not any(state["keys"].values())
    assert not any(state["watermarks"].values())
    assert TOKEN.encode() not in scene.state_file.read_bytes()


@pytest.mark.parametrize("log_format", ["83-json-logs", "83-console-logs"])
def test_a_401_that_echoes_the_token_never_puts_it_in_the_logs(
    scene: Scene, tmp_path: Path, log_format: str
) -> None:
    """83. The API's 401 body quotes the token it was given: the run exits 1 naming
    HYPERENGAGE_TOKEN, and the token is in no output, log line or state."""
    with start_receiver(store=tmp_path / "other.db", tokens={"someone-elses-token"}) as rx:
        result = scene.run(
            "sync", HYPERENGAGE_ENDPOINT=rx.url, ETL_LOG_FORMAT=log_format.split("-")[1]
        )
        assert rx.requests()  # the bait was offered
    assert result.exit_code == 1
    assert "HTTP 401: the token is wrong or missing — check HYPERENGAGE_TOKEN" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    runs = scene.run("runs", "--format", "json")
    assert TOKEN not in runs.stdout
    assert TOKEN.encode() not in scene.state_file.read_bytes()


def test_a_400_for_one_record_rejects_it_alone_and_delivers_the_rest(scene: Scene) -> None:
    """84. The API refuses one event (400): bisection isolates it, it is kept as
    rejected with the server's message (exit 3, `etl state show` lists it), every
    other record is delivered."""
    plan = FaultPlan.from_json(
        json.dumps({"reject_events_where": {"traits.email": "user3@example.com"}})
    )
    with start_receiver(store=scene.tmp / "picky.db", tokens={TOKEN}, faults=plan) as rx:
        result = scene.run("sync", HYPERENGAGE_ENDPOINT=rx.url)
        delivered = {e["user_id"] for e in rx.events() if e["event_type"] == "user_identify"}
    assert result.exit_code == 3
    assert delivered == {user_id(i) for i in range(6)} - {user_id(3)}
    rejected = state_of(scene.env["ETL_STATE_URL"])["rejected"]
    assert [(r.key, r.attempts) for r in rejected] == [(user_id(3), 1)]
    assert "HTTP 400" in rejected[0].message
    shown = scene.run("state", "show")
    assert user_id(3) in shown.stdout
    assert "rejected and invalid records (re-read by key by every sync)" in shown.stdout


# ================================================================ property


SQLITE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),  # SQLite stores NaN as NULL
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.binary(max_size=12),
    st.datetimes(),
    st.sampled_from(["", " ", "NaN", "infinity", "2024-13-45", "[1, [2]]", '["a"]', "{}"]),
)
BAD_UTF8 = object()  # a marker: this cell gets invalid UTF-8 text, written with CAST
PEOPLE_COLUMNS = ("ws", "email", "name", "created_at", "score", "flag", "tags", "seen")
PROPERTY_YML = """
event_type: user_identify
source: {table: people}
key: id
cursor: updated_at
user_id: id
account_id: ws
traits:
  email: email
  name: name
  created_at: created_at
  score: {column: score, type: number}
  flag: {column: flag, type: boolean}
  tags: {column: tags, type: string_array}
  seen: seen
"""


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(
        st.tuples(
            *(st.one_of(SQLITE_SCALARS, st.just(BAD_UTF8)) for _ in PEOPLE_COLUMNS),
            st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2030, 1, 1)),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_rows_of_random_scalars_are_delivered_or_listed_invalid(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[Any, ...]]
) -> None:
    """85. Property, end to end (the pure form is tests/test_transform.py::
    test_any_row_becomes_a_valid_event_or_an_invalid_record): random rows of any
    SQLite scalar (NULL, ints to 2^63, ±inf, any text with NUL and emoji, invalid
    UTF-8, blobs, datetimes) in a real table, one `etl sync --page-size 3`: exit 0
    or 3, never 1; every row is either received or listed invalid with a reason."""
    tmp = tmp_path_factory.mktemp("random")
    url = f"sqlite:///{tmp / 'source.db'}"
    statements = [
        "CREATE TABLE people (id INTEGER PRIMARY KEY, "
        + ", ".join(PEOPLE_COLUMNS)
        + ", updated_at TIMESTAMP)"
    ]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(statements[0])
            for number, row in enumerate(rows, 1):
                values = [None if v is BAD_UTF8 else v for v in row[:-1]]
                conn.exec_driver_sql(
                    f"INSERT INTO people VALUES (?, {', '.join('?' * len(values))}, ?)",
                    (number, *values, row[-1].isoformat(sep=" ")),
                )
                for column, value in zip(PEOPLE_COLUMNS, row, strict=False):
                    if value is BAD_UTF8:
                        conn.exec_driver_sql(
                            f"UPDATE people SET {column} = CAST(x'61ff' AS TEXT) WHERE id = ?",
                            (number,),
                        )
    finally:
        engine.dispose()
    (tmp / "mappings").mkdir()
    (tmp / "mappings" / "people.yml").write_text(PROPERTY_YML)
    with start_receiver(store=tmp / "received.db", tokens={TOKEN}) as rx:
        env = cli_env(tmp, url, rx.url)
        result = run_cli(["sync", "--page-size", "3"], env)
        received = {e["user_id"] for e in rx.events()}
    assert result.exit_code in (0, 3), result.stderr[-3000:]
    state = state_of(env["ETL_STATE_URL"])
    invalid = invalid_of(state["runs"][0], "people")
    assert all(invalid.values())  # each with a reason
    every = {str(n) for n in range(1, len(rows) + 1)}
    assert received | set(invalid) == every
    assert not received & set(invalid)
    assert state["keys"]["people"] == received
