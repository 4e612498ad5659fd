"""Database sessions terminated (`pg_terminate_backend`) at each phase of a run.

The run either finishes with everything delivered, or exits 1 with a message
that says what happened and that the next run picks up; never a traceback. The
next run delivers the rest, re-sending no more than the batches in flight.

A `Terminator` listens to the statements `etl` sends and, at the chosen moment,
has an admin connection terminate a real session: no driver is mocked.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from support import TOKEN, cli_env, copy_mappings, run_cli, seed

from etl.receiver.faults import FaultPlan
from etl.receiver.server import RunningReceiver, start_receiver

N_WORKSPACES, N_USERS = 3, 30
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Terminator:
    """Terminates PostgreSQL sessions when `when(statement, database)` first says so.

    `victims(cursor)` picks the backend pids to terminate (default: the session
    about to run the statement). `after=True` fires after the statement ran.
    """

    when: Callable[[str, str], bool]
    victims: Callable[[sa.Connection, Any], list[int]] | None = None
    after: bool = False
    fired: int = 0
    admin: sa.Engine = field(
        default_factory=lambda: sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        database = conn.engine.url.database or ""
        if cursor is None:
            return
        with self._lock:
            if self.fired or not self.when(statement, database):
                return
            self.fired += 1
        with self.admin.connect() as admin:
            pids = (
                self.victims(admin, cursor)
                if self.victims
                else [cursor.connection.info.backend_pid]
            )
            for pid in pids:
                # the timeout makes it wait until the session is gone
                admin.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})

    def __enter__(self) -> Terminator:
        event = "after_cursor_execute" if self.after else "before_cursor_execute"
        sa.event.listen(sa.engine.Engine, event, self._check)
        return self

    def __exit__(self, *_: Any) -> None:
        event = "after_cursor_execute" if self.after else "before_cursor_execute"
        sa.event.remove(sa.engine.Engine, event, self._check)
        self.admin.dispose()


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


def sync(tmp_path: Path, source: str, rx: RunningReceiver, *extra: str, **env: str) -> Result:
    copy_mappings(tmp_path / "mappings", dialect="postgresql")
    args = ["sync", "--page-size", "5", "--batch-size", "4", "--concurrency", "2", *extra]
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


def test_session_lost_mid_read_resumes_from_the_last_page(
    tmp_path: Path, source: str, slow_receiver: RunningReceiver
) -> None:
    """Killed before the 3rd page of users (pages left): resumed there, nothing lost or re-sent."""
    name = _db(source)
    pages = Counter[str]()

    def third_users_page(sql: str, db: str) -> bool:
        if db != name or "FROM users" not in sql or "after0" not in sql:
            return False  # only pages after the first carry a keyset position
        pages["users"] += 1
        return pages["users"] == 2

    with Terminator(third_users_page) as kill:
        result = sync(tmp_path, source, slow_receiver)
    assert kill.fired == 1
    assert result.exit_code == 0, result.stderr
    assert "source.reconnect" in result.stderr
    assert_all_once(slow_receiver)


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


@pytest.fixture
def pg_state(pg_url: str) -> Iterator[str]:
    """A second PostgreSQL database, for the state store."""
    name = _db(pg_url) + "_state"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
