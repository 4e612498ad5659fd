"""Source errors are classified in one place: transient, timeout or database, from the
real errors PostgreSQL, MariaDB and SQLite raise (no driver is mocked)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from etl.errors import QueryError, SourceError, SourceLostError
from etl.source.errors import classify, query_error, source_error

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_ADMIN = "mysql+pymysql://root@127.0.0.1:3306/test"


def raised(url: str, act: Callable[[sa.Connection, sa.Connection], None]) -> BaseException:
    """What `act(conn, admin)` raises on a fresh connection to `url`."""
    engine = sa.create_engine(url)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn, admin.connect() as other:
            with pytest.raises(sa.exc.SQLAlchemyError) as caught:
                act(conn, other)
            return caught.value
    finally:
        engine.dispose()
        admin.dispose()


def pg_terminated(conn: sa.Connection, admin: sa.Connection) -> None:
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})
    conn.exec_driver_sql("SELECT 1")


def pg_timeout(conn: sa.Connection, _admin: sa.Connection) -> None:
    conn.exec_driver_sql("SET statement_timeout = 10")
    conn.exec_driver_sql("SELECT pg_sleep(1)")


def pg_no_table(conn: sa.Connection, _admin: sa.Connection) -> None:
    conn.exec_driver_sql("SELECT nope FROM nowhere")


def maria_killed(conn: sa.Connection, admin: sa.Connection) -> None:
    thread = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
    admin.exec_driver_sql(f"KILL CONNECTION {int(thread or 0)}")
    conn.exec_driver_sql("SELECT 1")


def maria_timeout(conn: sa.Connection, _admin: sa.Connection) -> None:
    conn.exec_driver_sql("SET STATEMENT max_statement_time=0.01 FOR SELECT SLEEP(1)")


def maria_no_table(conn: sa.Connection, _admin: sa.Connection) -> None:
    conn.exec_driver_sql("SELECT nope FROM nowhere")


@pytest.mark.parametrize(
    ("url", "act", "kind"),
    [
        pytest.param(PG_ADMIN, pg_terminated, "transient", marks=pytest.mark.postgres),
        pytest.param(PG_ADMIN, pg_timeout, "timeout", marks=pytest.mark.postgres),
        pytest.param(PG_ADMIN, pg_no_table, "database", marks=pytest.mark.postgres),
        pytest.param(MARIADB_ADMIN, maria_killed, "transient", marks=pytest.mark.mariadb),
        pytest.param(MARIADB_ADMIN, maria_timeout, "timeout", marks=pytest.mark.mariadb),
        pytest.param(MARIADB_ADMIN, maria_no_table, "database", marks=pytest.mark.mariadb),
    ],
)
def test_real_errors_are_classified(
    url: str, act: Callable[[sa.Connection, sa.Connection], None], kind: str
) -> None:
    """A killed session is transient, a statement timeout a timeout, a missing table a
    database error, on PostgreSQL and MariaDB alike."""
    assert classify(raised(url, act)) == kind


@pytest.mark.postgres
def test_a_refused_connection_is_transient() -> None:
    """Nothing listening on the port (a server restarting): transient."""
    engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(sa.exc.OperationalError) as caught:
            engine.connect()
    finally:
        engine.dispose()
    assert classify(caught.value) == "transient"


def test_sqlite_errors_are_database_errors(tmp_path: object) -> None:
    """SQLite has no connection to lose: its errors are the database's."""
    error = raised("sqlite://", pg_no_table)
    assert classify(error) == "database"


@pytest.mark.postgres
def test_each_kind_becomes_its_own_source_error() -> None:
    """Transient -> SourceLostError with the driver's line; timeout -> the fix; a
    database error in a read -> QueryError (explained from the mapping later)."""
    lost = source_error(raised(PG_ADMIN, pg_terminated), where="m.yml: stream s", doing="x")
    assert isinstance(lost, SourceLostError)
    assert lost.detail == "terminating connection due to administrator command"
    assert str(lost) == (
        "m.yml: stream s: the source connection was lost while x: "
        "terminating connection due to administrator command"
    )
    slow = source_error(raised(PG_ADMIN, pg_timeout), where="m.yml: stream s", doing="x")
    assert type(slow) is SourceError
    assert "timed out while x: canceling statement due to statement timeout — raise" in str(slow)
    bad = query_error(raised(PG_ADMIN, pg_no_table), mapping_path="m.yml", stream="s", doing="x")
    assert isinstance(bad, QueryError)
    assert bad.detail == 'relation "nowhere" does not exist'
