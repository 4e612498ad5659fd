"""Database sessions terminated (`pg_terminate_backend`) at each phase of a run.

The run either finishes with everything delivered, or exits 1 with a message
that says what happened and that the next run picks up; never a traceback. The
next run delivers the rest, re-sending no more than the batches in flight.

A `Terminator` listens to the statements `etl` sends and, at the chosen moment,
has an admin connection terminate a real session: no driver is mocked.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from support import TOKEN, cli_env, copy_mappings, run_cli, seed, user_id

from etl.receiver.faults import FaultPlan
from etl.receiver.server import RunningReceiver, start_receiver

N_WORKSPACES, N_USERS = 3, 30
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


@dataclass
class Terminator:
    """Ends database sessions when `when(statement, database)` first says so:
    `pg_terminate_backend` on PostgreSQL, `KILL CONNECTION` on MariaDB.

    `victims(admin, cursor)` picks the PostgreSQL backend pids to terminate
    (default: the session about to run the statement).
    """

    when: Callable[[str, str], bool]
    victims: Callable[[sa.Connection, Any], list[int]] | None = None
    first: Callable[[], None] | None = None  # done just before the kill
    fired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        database = conn.engine.url.database or ""
        if cursor is None:
            return
        with self._lock:
            if self.fired or not self.when(statement, database):
                return
            self.fired += 1
        if self.first is not None:
            self.first()
        if conn.engine.dialect.name == "mysql":
            # the statement about to run meets a killed connection
            with _admin(MARIADB_ADMIN_URL) as admin:
                admin.execute(sa.text(f"KILL CONNECTION {int(cursor.connection.thread_id())}"))
            return
        with _admin(ADMIN_URL) as admin:
            pids = (
                self.victims(admin, cursor)
                if self.victims
                else [cursor.connection.info.backend_pid]
            )
            for pid in pids:
                # the timeout makes it wait until the session is gone
                admin.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})

    def __enter__(self) -> Terminator:
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._check)
        return self

    def __exit__(self, *_: Any) -> None:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", self._check)


@contextlib.contextmanager
def _admin(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def sessions_of(*databases: str) -> Callable[[sa.Connection, Any], list[int]]:
    """Every session connected to these databases (the admin one aside)."""

    def pick(admin: sa.Connection, _cursor: Any) -> list[int]:
        rows = admin.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY(:d) "
                "AND pid <> pg_backend_pid()"
            ),
            {"d": list(databases)},
        )
        return [r[0] for r in rows]

    return pick


@pytest.fixture
def slow_receiver(tmp_path: Path) -> Iterator[RunningReceiver]:
    """The real receiver, answering each request after 150 ms: batches stay in flight."""
    plan = FaultPlan.from_json('{"latency_ms": [150, 150]}')
    with start_receiver(store=tmp_path / "received.db", tokens={TOKEN}, faults=plan) as rx:
        yield rx


@pytest.fixture
def source(pg_url: str) -> str:
    seed(pg_url, n_workspaces=N_WORKSPACES, n_users=N_USERS)
    return pg_url


def sync(
    tmp_path: Path,
    source: str,
    rx: RunningReceiver,
    *extra: str,
    command: str = "sync",
    **env: str,
) -> Result:
    """`etl COMMAND` with small pages and batches (several of each in flight)."""
    copy_mappings(tmp_path / "mappings", dialect=sa.make_url(source).get_backend_name())
    args = [command, "--page-size", "5", "--batch-size", "4", "--concurrency", "2", *extra]
    result = run_cli(args, cli_env(tmp_path, source, rx.url, **env))
    print(f"exit {result.exit_code}; stderr: {result.stderr.strip().splitlines()[-1:]}")
    assert "Traceback" not in result.output + result.stderr
    return result


def delivered(rx: RunningReceiver) -> Counter[tuple[str, str]]:
    """How many times each record arrived."""
    return Counter(
        (e["event_type"], e["user_id"] if e["event_type"] == "user_identify" else e["account_id"])
        for e in rx.events()
    )


def assert_all_once(rx: RunningReceiver, *, extra: int = 0) -> None:
    counts = delivered(rx)
    assert len(counts) == N_WORKSPACES + N_USERS
    assert sum(counts.values()) - len(counts) <= extra


def _db(url: str) -> str:
    return sa.make_url(url).database or ""


def test_session_lost_before_the_first_page_is_reconnected(
    tmp_path: Path, source: str, slow_receiver: RunningReceiver
) -> None:
    """Killed at the horizon query (before any page): the run reconnects, delivers all once."""
    name = _db(source)
    with Terminator(lambda sql, db: db == name and "pg_stat_activity" in sql) as kill:
        result = sync(tmp_path, source, slow_receiver)
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "source.reconnect" in result.stderr
    assert_all_once(slow_receiver)


@pytest.mark.parametrize(
    ("database", "command"),
    [
        pytest.param("pg_url", "sync", marks=pytest.mark.postgres, id="postgres-sync"),
        pytest.param("pg_url", "backfill", marks=pytest.mark.postgres, id="postgres-backfill"),
        pytest.param("mariadb_url", "sync", marks=pytest.mark.mariadb, id="mariadb-sync"),
    ],
)
def test_session_lost_mid_read_resumes_from_the_last_page(
    tmp_path: Path,
    slow_receiver: RunningReceiver,
    database: str,
    command: str,
    request: pytest.FixtureRequest,
) -> None:
    """Killed before the 3rd page of users (pages left): resumed there in a new snapshot,
    nothing lost or re-sent."""
    url = request.getfixturevalue(database)
    seed(url, n_workspaces=N_WORKSPACES, n_users=N_USERS)
    name = _db(url)
    pages = Counter[str]()

    def third_users_page(sql: str, db: str) -> bool:
        if db != name or "FROM users" not in sql or "after0" not in sql:
            return False  # only pages after the first carry a keyset position
        pages["users"] += 1
        return pages["users"] == 2

    with Terminator(third_users_page) as kill:
        result = sync(tmp_path, url, slow_receiver, command=command)
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "source.reconnect" in result.stderr
    assert "source.resumed" in result.stderr
    assert_all_once(slow_receiver)


@pytest.mark.postgres
def test_reconnect_budget_spent_exits_1_and_the_next_run_delivers_the_rest(
    tmp_path: Path, source: str, slow_receiver: RunningReceiver
) -> None:
    """With no reconnect allowed, a session killed mid-read ends the run: exit 1 saying the
    connection was lost and the next run picks up; the next run delivers the rest with
    no more duplicates than the batches in flight."""
    name = _db(source)
    pages = Counter[str]()

    def third_users_page(sql: str, db: str) -> bool:
        if db != name or "FROM users" not in sql or "after0" not in sql:
            return False
        pages["users"] += 1
        return pages["users"] == 2

    with Terminator(third_users_page) as kill:
        failed = sync(tmp_path, source, slow_receiver, ETL_RECONNECT_ATTEMPTS="0")
    assert kill.fired == 1
    assert failed.exit_code == 1
    assert "users.yml: stream users: the source connection was lost and could not be " in (
        failed.stderr
    )
    assert "the next run picks up where this one stopped" in failed.stderr
    assert "(streams already done in this run: workspaces)" in failed.stderr
    assert len(delivered(slow_receiver)) < N_WORKSPACES + N_USERS
    again = sync(tmp_path, source, slow_receiver)
    assert again.exit_code == 0, again.stderr
    assert_all_once(slow_receiver, extra=2 * 4)


@pytest.mark.postgres
def test_a_statement_timeout_names_the_query_and_the_fix(
    tmp_path: Path, source: str, receiver: RunningReceiver
) -> None:
    """A page query past the database's statement_timeout: exit 1 saying it timed out
    while reading rows, with statement_timeout and an index as the fix; not a lost
    connection, not the mapping's fault."""
    with _admin(ADMIN_URL) as admin:
        admin.execute(sa.text(f'ALTER DATABASE "{_db(source)}" SET statement_timeout = 100'))
    copy_mappings(tmp_path / "mappings", dialect="postgresql")
    users = tmp_path / "mappings" / "users.yml"
    users.write_text(
        users.read_text().replace(
            "  role: role\n", '  role: {sql: "role || left(pg_sleep(0.02)::text, 0)"}\n'
        )
    )
    result = run_cli(["sync"], cli_env(tmp_path, source, receiver.url))
    print(f"exit {result.exit_code}; stderr: {result.stderr.strip().splitlines()[-1:]}")
    assert result.exit_code == 1
    assert (
        "users.yml: stream users: the source query timed out while reading a page ordered by "
        "(updated_at, id): canceling statement due to statement timeout"
    ) in result.stderr
    assert "statement_timeout" in result.stderr
    assert "index" in result.stderr
    assert "Traceback" not in result.stderr


def test_session_lost_after_the_last_page_with_batches_in_flight(
    tmp_path: Path, source: str, slow_receiver: RunningReceiver
) -> None:
    """Killed once users' last page was read, batches still in flight: the run finishes,
    the failed rollback of the read-only snapshot costs nothing."""
    name = _db(source)
    read_all = threading.Event()

    def after_last_page(sql: str, db: str) -> bool:
        if db == name and "FROM users" in sql and "IS NULL" in sql:
            read_all.set()  # the NULL-key page is the last one
        return read_all.is_set() and "INSERT INTO etl_records" in sql

    with Terminator(after_last_page, victims=sessions_of(name)) as kill:
        result = sync(tmp_path, source, slow_receiver)
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "source.rollback_failed" in result.stderr
    assert_all_once(slow_receiver)


def test_sessions_lost_during_the_final_state_commit(
    tmp_path: Path, source: str, pg_state: str, slow_receiver: RunningReceiver
) -> None:
    """Every session killed while the last stream's watermark is committed: exit 1 with a
    clear message, the lock dies with its session, and the next run re-sends nothing."""
    state = _db(pg_state)
    commits = Counter[str]()

    def last_watermark(sql: str, db: str) -> bool:
        if db == state and "INSERT INTO etl_streams" in sql:
            commits["streams"] += 1
        return commits["streams"] == 2  # workspaces, then users

    with Terminator(last_watermark, victims=sessions_of(_db(source), state)) as kill:
        failed = sync(tmp_path, source, slow_receiver, ETL_STATE_URL=pg_state)
    assert kill.fired == 1
    assert failed.exit_code == 1
    assert "state store" in failed.stderr
    assert_all_once(slow_receiver)
    again = sync(tmp_path, source, slow_receiver, ETL_STATE_URL=pg_state)
    assert again.exit_code == 0, again.stderr
    assert_all_once(slow_receiver)


def lock_holder(admin: sa.Connection, _cursor: Any) -> list[int]:
    """The session holding an advisory lock (the run lock of a PostgreSQL state store)."""
    rows = admin.execute(sa.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory'"))
    return [r[0] for r in rows]


def test_state_session_holding_the_lock_lost_mid_run(
    tmp_path: Path, source: str, pg_state: str, slow_receiver: RunningReceiver
) -> None:
    """The state store's lock session killed mid-run: the next state write sees the lock is
    gone and the run stops (exit 1); the next run delivers the rest."""
    state = _db(pg_state)
    reads = Counter[str]()

    def mid_run(sql: str, db: str) -> bool:
        if db == state and "FROM etl_records" in sql:
            reads["pages"] += 1
        return reads["pages"] == 3  # users' second page: batches acknowledged and in flight

    with Terminator(mid_run, victims=lock_holder) as kill:
        failed = sync(tmp_path, source, slow_receiver, ETL_STATE_URL=pg_state)
    assert kill.fired == 1
    assert failed.exit_code == 1
    assert "session holding the run lock was lost" in failed.stderr
    first = sum(delivered(slow_receiver).values())
    assert first < N_WORKSPACES + N_USERS
    again = sync(tmp_path, source, slow_receiver, ETL_STATE_URL=pg_state)
    assert again.exit_code == 0, again.stderr
    assert_all_once(slow_receiver, extra=2 * 4)  # at most the batches in flight, re-sent


def test_a_table_dropped_mid_run_exits_1_naming_the_streams_done(
    tmp_path: Path, receiver: RunningReceiver
) -> None:
    """users dropped once workspaces was done (after the check before sending): exit 1
    naming the table and the streams already done, no traceback."""
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    seed(source_url, n_workspaces=2, n_users=3)
    dropped = threading.Event()

    def drop_users(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INSERT INTO etl_streams" in statement and not dropped.is_set():
            dropped.set()
            engine = sa.create_engine(source_url)
            with engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE users"))
            engine.dispose()

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", drop_users)
    try:
        result = sync(tmp_path, source_url, receiver)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", drop_users)
    assert dropped.is_set()
    assert result.exit_code == 1
    assert "users.yml: stream users: the source query failed: no such table: users" in (
        result.stderr
    )
    assert "(streams already done in this run: workspaces)" in result.stderr


@pytest.mark.postgres
def test_validate_check_source_with_the_session_lost_says_so(tmp_path: Path, source: str) -> None:
    """`validate --check-source` whose session is killed: exit 1 saying the connection was
    lost while checking, no traceback."""
    name = _db(source)
    copy_mappings(tmp_path / "mappings", dialect="postgresql")
    env = cli_env(tmp_path, source, "http://127.0.0.1:9/api/v1/s2s/event")
    with Terminator(lambda sql, db: db == name and "pg_catalog" in sql) as kill:
        result = run_cli(["validate", "--check-source"], env)
    assert kill.fired == 1
    assert result.exit_code == 1
    assert "the source connection was lost while checking it against the source" in (result.stderr)
    assert "Traceback" not in result.stderr


TRACK_MAPPING = """\
stream: invoices_paid
kind: track
event_type: invoice_paid
source: {table: invoices}
key: id
cursor: paid_at
timestamp: paid_at
user_id: paid_by
account_id: workspace_id
properties:
  amount: {column: amount_cents, type: integer}
"""


@pytest.mark.postgres
def test_a_track_backfill_resumes_after_a_lost_session(
    tmp_path: Path, pg_url: str, slow_receiver: RunningReceiver
) -> None:
    """A track stream's backfill killed before its 3rd page: resumed from the last page
    in a new snapshot, every event sent once."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE invoices (id int PRIMARY KEY, paid_by text, workspace_id text, "
            "amount_cents int, paid_at timestamptz)"
        )
        conn.exec_driver_sql(
            "INSERT INTO invoices SELECT g, 'u-' || g, 'w-1', g * 100, "
            "now() - interval '1 day' + g * interval '1 minute' FROM generate_series(1, 30) g"
        )
    engine.dispose()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "invoices.yml").write_text(TRACK_MAPPING)
    name = _db(pg_url)
    pages = Counter[str]()

    def third_page(sql: str, db: str) -> bool:
        if db != name or "FROM invoices" not in sql or "after0" not in sql:
            return False
        pages["invoices"] += 1
        return pages["invoices"] == 2

    env = cli_env(tmp_path, pg_url, slow_receiver.url)
    with Terminator(third_page) as kill:
        result = run_cli(["backfill", "--page-size", "5", "--batch-size", "4"], env)
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "source.resumed" in result.stderr
    ids = Counter(e["event_id"] for e in slow_receiver.events())
    assert len(ids) == 30
    assert set(ids.values()) == {1}


@pytest.mark.postgres
def test_a_key_read_again_after_a_resume_is_not_a_duplicate(
    tmp_path: Path, source: str, slow_receiver: RunningReceiver
) -> None:
    """A `query:` source (where keys can repeat): a row already read changes while the
    connection is down and is read again after the resume; it is sent with its new
    payload, not called a duplicate key (duplicates are judged within one snapshot)."""
    name = _db(source)
    pages = Counter[str]()
    first = user_id(0)

    def third_page(sql: str, db: str) -> bool:
        if db != name or "FROM users" not in sql or "after0" not in sql:
            return False
        pages["users"] += 1
        return pages["users"] == 2

    def move_first_user() -> None:
        with _admin(ADMIN_URL.replace("/test", f"/{name}")) as admin:
            admin.execute(
                sa.text(
                    "UPDATE users SET first_name = 'Moved', updated_at = now() + interval "
                    "'1 hour' WHERE id = :id"
                ),
                {"id": first},
            )

    copy_mappings(tmp_path / "mappings", dialect="postgresql")
    users = tmp_path / "mappings" / "users.yml"
    users.write_text(users.read_text().replace("  table: users", '  query: "SELECT * FROM users"'))
    with Terminator(third_page, first=move_first_user) as kill:
        result = run_cli(
            ["sync", "--page-size", "5", "--batch-size", "4"],
            cli_env(tmp_path, source, slow_receiver.url),
        )
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "duplicate key" not in result.stderr
    names = [
        e["traits"]["name"]
        for e in slow_receiver.events()
        if e["event_type"] == "user_identify" and e["user_id"] == first
    ]
    assert names == ["Ada Lovelace0", "Moved Lovelace0"]
