"""CATALOGUE PLACEHOLDER"""

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
from support import REPO, TOKEN, cli_env, copy_mappings, run_cli, seed, user_id, users, ws_id

import etl.api
import etl.load
from etl.receiver import FaultPlan, RunningReceiver, start_receiver
from etl.state import SCHEMA_VERSION, StateStore

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
        streams = {s["stream"]: s for s in store.summary()}
        return {
            "watermarks": {name: s["watermark"] for name, s in streams.items()},
            "keys": {name: set(store.sent_keys(name)) for name in streams},
            "runs": store.runs(),
            "rejected": store.rejected(),
        }
    finally:
        store.close()


def invalid_of(run: Mapping[str, Any], stream: str) -> dict[str, str]:
    """The invalid records a run listed for a stream: key -> reason."""
    listed = next(s for s in run["streams"] if s["stream"] == stream)["invalid_records"]
    return {key: reason for key, reason in listed}


def log_events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry budget of 3 attempts, 0.5 s read timeouts and tiny backoffs (the
    defaults, 8 attempts and 30 s timeouts, are for production)."""
    original = etl.api.delivery_config

    def delivery_config(**kwargs: Any) -> Any:
        config = original(**kwargs)
        return dataclasses.replace(
            config, max_attempts=3, timeout_seconds=0.5, max_retry_seconds=10.0
        )

    monkeypatch.setattr(etl.api, "delivery_config", delivery_config)
    monkeypatch.setattr(etl.load, "BACKOFF_BASE", 0.01)


Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@contextlib.contextmanager
def answering(respond: Respond) -> Iterator[str]:
    """A one-trick HTTP server on 127.0.0.1 that answers every POST with `respond`;
    yields its event endpoint. `respond` gets an event set when the server stops."""
    stopping = threading.Event()
    posts: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
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
            id="05-top-level-list",
        ),
        pytest.param(
            base.replace(
                "name: {sql: \"first_name || ' ' || last_name\"}",
                "name: {column: last_name, sql: \"first_name || ' ' || last_name\"}",
            ),
            ["users.yml: traits.name: has both 'column' and 'sql'", "keep exactly one of column"],
            id="06-column-and-sql",
        ),
        pytest.param(
            base.replace("user_id: id\n", ""),
            ["users.yml: user_id: is missing — add user_id: COLUMN"],
            id="07-no-user-id",
        ),
        pytest.param(
            base.replace("  email: email\n", ""),
            ["users.yml: traits: user_identify requires email, not mapped here", "`email: COLUMN`"],
            id="08-required-trait-unmapped",
        ),
        pytest.param(
            base.replace("{column: is_admin, type: boolean}", "{column: is_admin, type: bool}"),
            ["users.yml: traits.is_admin.type: unknown value 'bool'", "did you mean 'boolean'?"],
            id="09-unknown-type",
        ),
        pytest.param(
            tabbed,
            [
                f"users.yml: line {line_of(tabbed, 'rank')}, column 1: while scanning",
                "found character '\\t' that cannot start any token",
                "indent with spaces: YAML does not allow tabs there",
            ],
            id="10-tab-in-yaml",
        ),
        pytest.param(
            base.replace("key: id", "key: [id, id]"),
            ["users.yml: key: lists 'id' more than once — list each column once"],
            id="11-key-listed-twice",
        ),
        pytest.param(
            base.replace("source:\n  table: users", 'source:\n  query: "DELETE FROM users"'),
            ["users.yml: source.query: must start with SELECT or WITH"],
            id="12-query-not-a-select",
        ),
    ]


@pytest.mark.parametrize(("text", "words"), _mapping_cases())
def test_a_broken_mapping_file_exits_2_naming_file_key_and_fix_before_reading(
    scene: Scene, text: str, words: list[str]
) -> None:
    """A mapping mistake stops `sync` with exit 2 and `file: key: problem — fix`;
    the source is never opened (its URL leads nowhere) and no state is created."""
    write_mapping(scene, "users.yml", text)
    result = scene.run("sync", ETL_SOURCE_URL=UNREADABLE_SOURCE)
    assert result.exit_code == 2, result.stderr
    for phrase in words:
        assert phrase in result.stderr
    assert "s3cret-pw" not in result.stderr
    assert not scene.state_file.exists()
    assert scene.receiver.requests() == []


def test_03_yaml_1_1_surprises_are_sent_as_written(scene: Scene) -> None:
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
        pytest.param("missing", "mappings directory does not exist", id="04a-no-directory"),
        pytest.param("empty", "no mapping files (*.yml, *.yaml)", id="04b-empty-directory"),
    ],
)
def test_04_a_missing_or_empty_mappings_directory_exits_2(
    scene: Scene, layout: str, words: str
) -> None:
    """4. No mappings directory, or one without *.yml: exit 2, saying how to point elsewhere."""
    target = scene.tmp / "nowhere" if layout == "missing" else scene.tmp / "empty"
    if layout == "empty":
        target.mkdir()
        (target / "README.txt").write_text("mappings go here")
    result = scene.run("sync", ETL_MAPPINGS=str(target))
    assert result.exit_code == 2
    assert f"{target}: {words}" in result.stderr
    assert "--mappings DIR or set ETL_MAPPINGS" in result.stderr
    assert not scene.state_file.exists()


def test_13_two_files_declaring_one_stream_exit_2_naming_both(scene: Scene) -> None:
    """13. A copy of users.yml left beside it (same `stream:`) would send every user
    twice: exit 2 naming both files."""
    write_mapping(scene, "users-old.yml", "stream: users\n" + users_yml())
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "users.yml: stream: 'users' is also declared in" in result.stderr
    assert "users-old.yml" in result.stderr
    assert "give each file its own stream name" in result.stderr


def test_14_a_mapping_file_that_is_not_utf8_exits_2_with_the_byte(scene: Scene) -> None:
    """14. A file saved as Latin-1 names the offending byte and says to save it as UTF-8."""
    path = scene.mappings / "users.yml"
    path.write_bytes(users_yml().replace("# Users", "# Usérs").encode("latin-1"))
    result = scene.run("sync")
    assert result.exit_code == 2
    assert "users.yml: byte 4: not UTF-8 text — save the file as UTF-8" in result.stderr


def test_15_an_unknown_stream_name_exits_2_with_a_suggestion(scene: Scene) -> None:
    """15. `--stream user` (a typo) exits 2 and suggests `users`."""
    result = scene.run("sync", "--stream", "user")
    assert result.exit_code == 2
    assert "--stream: unknown stream 'user' — did you mean 'users'?" in result.stderr


HOSTILE_COLUMN = 'na"me; DROP TABLE users; --'
HOSTILE_TABLE = 'app users"; DROP TABLE users; --'


@pytest.mark.parametrize(
    "source", ["sqlite_url", pytest.param("pg_url", marks=pytest.mark.postgres)]
)
def test_16_identifiers_with_quotes_spaces_and_sql_are_quoted_never_run(
    scene: Scene, source: str, request: pytest.FixtureRequest
) -> None:
    """16. A table and a column literally named like SQL injections are read as
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
            id="17-where-fails",
        ),
        pytest.param(
            ("website: {sql: \"'https://' || domain\"}", 'website: {sql: "concat_ws(domain)"}'),
            "traits.website.sql",
            "concat_ws(domain)",
            id="18-sql-fails",
        ),
    ],
)
def test_a_where_or_sql_that_fails_in_the_database_names_stream_and_expression(
    scene: Scene, edit: tuple[str, str], key: str, expression: str
) -> None:
    """17-18. `sync` exits 1 naming the file, the stream, the key and the expression
    (nothing sent, no watermark); `validate --check-source` exits 2 saying the same."""
    path = scene.mappings / "workspaces.yml"
    path.write_text(path.read_text().replace(*edit))
    result = scene.run("sync")
    assert result.exit_code == 1, result.stderr
    assert "workspaces.yml: stream workspaces: the source query failed" in result.stderr
    assert f"{key}: {expression!r} fails in the database" in result.stderr
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
    "19-null-email": (1, {"email": None}, "required trait 'email' is missing or empty"),
    "20-empty-email": (2, {"email": ""}, "required trait 'email' is missing or empty"),
    "21-null-name-part": (3, {"first_name": None}, "required trait 'name' is missing or empty"),
    "22-null-account-id": (4, {"workspace_id": None}, "account_id is missing or empty"),
    "23-empty-user-id": (
        5,
        "UPDATE users SET id = '' WHERE id = :id",
        "user_id is missing or empty",
    ),
    "25-emoji": (7, {"first_name": "Zoë 🚀 李"}, None),
    "26-nul-character": (
        8,
        {"email": "a\x00b@example.com"},
        "email: text contains a NUL character",
    ),
    "27-invalid-utf8": (
        9,
        "UPDATE users SET last_name = CAST(x'4cff' AS TEXT) WHERE id = :id",
        "name: text is not valid UTF-8",
    ),
    "28-100kb-text": (10, {"role": "x" * 100_000}, "over the 32 KB limit — drop or trim"),
    "29-bytes": (11, {"role": b"\x00\x01admin"}, "role: binary value — map it with type: text"),
    "30-year-1-and-9999": (12, {"created_at": dt.datetime(1, 1, 1, tzinfo=dt.UTC)}, None),
    "31-text-in-a-timestamp-column": (
        13,
        "UPDATE users SET created_at = 'yesterday' WHERE id = :id",
        "created_at: 'yesterday' is not an ISO-8601 datetime",
    ),
}


@pytest.fixture(scope="module")
def sqlite_hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
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
    yield {"result": result, "events": events, "state": state}


@pytest.mark.parametrize("case", list(SQLITE_ROWS))
def test_a_hostile_sqlite_value_becomes_an_invalid_record_with_its_reason(
    sqlite_hostile: dict[str, Any], case: str
) -> None:
    """19-31. Each bad value makes its record invalid with the reason (listed in the
    output and the run record, never sent, never marked as sent); the good values
    are delivered as written. The run finishes with exit 3."""
    number, _, reason = SQLITE_ROWS[case]
    result, events, state = (sqlite_hostile[k] for k in ("result", "events", "state"))
    assert result.exit_code == 3, result.stderr
    key = "" if case == "23-empty-user-id" else user_id(number)
    sent = {e["user_id"]: e for e in events if e["event_type"] == "user_identify"}
    if reason is None:
        assert key in sent
        assert key in state["keys"]["users"]
        traits = sent[key]["traits"]
        if case == "25-emoji":
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


def test_32_a_query_with_duplicate_and_null_keys_sends_each_key_once(scene: Scene) -> None:
    """32. A `query:` that returns one key twice (a join fan-out) and a row whose key
    is NULL (an outer join): the first row of the key is sent once, the repeat and
    the NULL key are invalid with their reasons, and no row is lost, even when a
    keyset page ends on the NULL key (page size 1)."""
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
    invalid = invalid_of(state["runs"][0], "users")
    assert invalid[user_id(2)].startswith("duplicate key: the query returned this key more")
    assert invalid["None"] == "key column is NULL"
    received = [e["user_id"] for e in scene.receiver.events() if e["event_type"] == "user_identify"]
    assert sorted(received) == [user_id(i) for i in range(6)]  # each once, none lost


def test_33_a_column_dropped_since_the_last_run_exits_1_naming_it_state_untouched(
    scene: Scene,
) -> None:
    """33. `role` was dropped after the last run: exit 1 naming the column, the
    mapping key and `etl validate --check-source`; the users' watermark and
    records are as they were."""
    assert scene.run("sync").exit_code == 0
    before = state_of(scene.env["ETL_STATE_URL"])
    scene.execute(
        "ALTER TABLE users DROP COLUMN role", "UPDATE users SET updated_at = '2099-01-01'"
    )
    result = scene.run("sync")
    assert result.exit_code == 1
    assert "users.yml: stream users: the source query failed: no such column: role" in result.stderr
    assert "`etl validate --check-source` finds:" in result.stderr
    assert "users.yml: traits.role: no column 'role' in the source (columns: " in result.stderr
    assert "— fix the column name" in result.stderr
    after = state_of(scene.env["ETL_STATE_URL"])
    assert after["watermarks"]["users"] == before["watermarks"]["users"]
    assert after["keys"]["users"] == before["keys"]["users"]
    assert after["runs"][0]["status"] == "failed"


@pytest.mark.postgres
def test_34_a_column_renamed_on_postgresql_names_old_and_new_columns(
    tmp_path: Path, pg_url: str, receiver: RunningReceiver
) -> None:
    """34. `email` renamed to `email_address` on PostgreSQL: exit 1; the message
    names the missing column and lists the columns there are (the new name among
    them); nothing of the users is marked as sent."""
    seed(pg_url, n_workspaces=1, n_users=3)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, pg_url, receiver.url)
    execute(pg_url, "ALTER TABLE users RENAME COLUMN email TO email_address")
    result = run_cli(["sync"], env)
    assert result.exit_code == 1
    assert 'column "email" does not exist' in result.stderr
    assert "users.yml: traits.email: no column 'email' in the source" in result.stderr
    assert "email_address" in result.stderr
    assert "users" not in state_of(env["ETL_STATE_URL"])["keys"]


def test_35_a_table_dropped_since_the_last_run_exits_1_naming_it(scene: Scene) -> None:
    """35. The workspaces table is gone: exit 1 with the table named and the fix, not
    a traceback; nothing is sent."""
    scene.execute("DROP TABLE workspaces")
    result = scene.run("sync")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "workspaces.yml: stream workspaces:" in result.stderr
    assert "no such table: workspaces" in result.stderr
    assert "workspaces.yml: source.table: no table 'workspaces' — check the name" in result.stderr
    assert scene.receiver.requests() == []


def test_36_a_future_dated_row_does_not_push_the_watermark_past_later_changes(
    scene: Scene,
) -> None:
    """36. A row stamped in 2100 is sent once; the watermark stays at the database's
    clock, so a change made after the run is still picked up by the next one."""
    scene.execute(
        users.update()
        .where(users.c.id == user_id(1))
        .values(updated_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    )
    assert scene.run("sync").exit_code == 0
    watermark = dt.datetime.fromisoformat(
        state_of(scene.env["ETL_STATE_URL"])["watermarks"]["users"]
    )
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
    "37-numeric-nan": (
        "nan",
        "c_num",
        "'NaN'",
        ("invalid", "c_num: NaN is not a finite number"),
        ("sent", "num", "NaN"),
    ),
    "38-float-infinity": (
        "inf",
        "c_dbl",
        "'Infinity'",
        ("invalid", "c_dbl: inf is not a finite number"),
        None,
    ),
    "39-float-minus-infinity": (
        "ninf",
        "c_dbl",
        "'-Infinity'",
        ("invalid", "c_dbl: -inf is not a finite number"),
        None,
    ),
    "40-huge-decimal": (
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
    "41-bigint-beyond-2^53": (
        "big",
        "c_big",
        str(2**53 + 1),
        (
            "invalid",
            f"c_big: {2**53 + 1} is beyond 2^53 and would lose precision — map it as type: text",
        ),
        ("sent", "big", str(2**53 + 1)),
    ),
    "42-bytea": (
        "bytes",
        "c_bytes",
        "'\\x68c3a9'::bytea",
        ("invalid", "c_bytes: binary value — map it with type: text and an encoding"),
        ("sent", "bytes", "hé"),
    ),
    "43-nested-jsonb": (
        "nested",
        "c_doc",
        """'{"plan": {"tier": "pro"}}'""",
        ("invalid", "c_doc: nested object — flatten it with sql:"),
        ("sent", "tier", "pro"),
    ),
    "44-jsonb-array-of-mixed-scalars": (
        "scalars",
        "c_doc",
        """'[1, true, "x", 2.5]'""",
        ("sent", "c_doc", ["1", "true", "x", "2.5"]),
        None,
    ),
    "45-jsonb-array-nested": (
        "deep",
        "c_doc",
        "'[1, [2]]'",
        ("invalid", "c_doc: array element 1 is nested — flatten it"),
        None,
    ),
    "46-jsonb-array-with-null": (
        "holes",
        "c_doc",
        """'["a", null]'""",
        ("invalid", "c_doc: array element 1 is null"),
        None,
    ),
    "47-text-array": ("arr", "c_arr", """'{a,"b c"}'""", ("sent", "c_arr", ["a", "b c"]), None),
    "48-timestamp-infinity": (
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
    "49-timestamp-minus-infinity": (
        "ts-ninf",
        "c_ts",
        "'-infinity'",
        ("invalid", "c_ts: timestamp with time zone '-infinity' has no ISO-8601 form"),
        ("sent", "ts", None),
    ),
    "50-date-infinity": (
        "d-inf",
        "c_date",
        "'infinity'",
        ("invalid", "c_date: date 'infinity' has no ISO-8601 form"),
        ("sent", "day", None),
    ),
    "51-year-1": (
        "y1",
        "c_ts",
        "'0001-01-01 00:00:00+00'",
        ("sent", "c_ts", "0001-01-01T00:00:00Z"),
        ("sent", "ts", "0001-01-01T00:00:00Z"),
    ),
    "52-year-9999": (
        "y9999",
        "c_date",
        "'9999-12-31'",
        ("sent", "c_date", "9999-12-31"),
        ("sent", "day", "9999-12-31"),
    ),
    "53-emoji-and-scripts": (
        "emoji",
        "c_text",
        "'Zoë 🚀 李 مرحبا'",
        ("sent", "c_text", "Zoë 🚀 李 مرحبا"),
        None,
    ),
    "54-infinite-cursor": (
        "cur-inf",
        "updated_at",
        "'infinity'",
        ("sent", "email", "cur-inf@x.io"),
        None,
    ),
    "55-minus-infinite-cursor": (
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
def pg_hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
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
    yield {"result": result, "events": events, "state": state_of(env["ETL_STATE_URL"])}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(PG_ROWS))
def test_a_hostile_postgresql_value_is_invalid_with_a_reason_and_the_advised_fix_works(
    pg_hostile: dict[str, Any], case: str
) -> None:
    """37-55. NaN, ±Infinity, huge numerics, bigints past 2^53, bytea, nested jsonb,
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
