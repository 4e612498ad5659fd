"""What a source database error means, decided in one place.

Every error the source raises, at any moment of a run (connecting, opening the
snapshot, the horizon query, a page, rolling back, closing), is one of:

* **transient** — the connection was lost or refused, the server is shutting
  down or restarting (a failover), or a serialization failure: the same work
  may succeed on a new connection. `SourceLostError`; the run reconnects.
* **timeout** — a statement ran past `statement_timeout` (PostgreSQL) or
  `max_statement_time`/`max_execution_time` (MariaDB/MySQL): the message says
  which query, and that a larger timeout or an index is the fix.
* **database** — anything else (a missing table, bad SQL, permissions): the
  driver's first line, and for reads the mapping problems behind it.

`classify()` is the rule; `source_error()` turns an error into the SourceError
the run raises; `translated()` applies it to a block of code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import sqlalchemy as sa

from etl.errors import QueryError, SourceError, SourceLostError
from etl.redact import first_line

Kind = Literal["transient", "timeout", "database"]

# PostgreSQL SQLSTATEs (Appendix A of its manual). Class 08 is "connection
# exception"; 57P01-57P03 are admin/crash shutdown and "cannot connect now"
# (a server starting or in recovery); 40001/40P01 are serialization failure and
# deadlock (retrying the transaction is the documented remedy); 25P03 is
# idle_in_transaction_session_timeout, which ends the session.
_PG_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "40001", "40P01", "25P03"})
_PG_TIMEOUT = frozenset({"57014"})  # query_canceled: a timeout when its message says so
# MariaDB/MySQL client and server error codes: can't connect (2002, 2003), server
# gone away / lost connection (2006, 2013, 2055), server shutdown (1053),
# connection killed (1927), deadlock (1213), disconnected for inactivity (4031).
_MYSQL_TRANSIENT = frozenset({2002, 2003, 2006, 2013, 2055, 1053, 1927, 1213, 4031})
# max_statement_time exceeded (MariaDB), max_execution_time exceeded (MySQL).
_MYSQL_TIMEOUT = frozenset({1969, 3024})

# What SQLAlchemy and the drivers raise for a database problem (not our bugs).
SOURCE_ERRORS = (
    sa.exc.DBAPIError,
    sa.exc.DisconnectionError,
    sa.exc.ResourceClosedError,
    sa.exc.PendingRollbackError,
)

TIMEOUT_ADVICE = (
    "raise the statement timeout for the role etl connects as (PostgreSQL "
    "statement_timeout, MariaDB max_statement_time, MySQL max_execution_time), or add "
    "an index that serves this query"
)


def classify(error: BaseException) -> Kind:
    """transient, timeout or database: what a source error means for the run."""
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return "transient"
        return _classify_driver(error.orig, wrapper=error)
    if isinstance(error, sa.exc.DisconnectionError | sa.exc.ResourceClosedError):
        return "transient"
    if isinstance(error, sa.exc.PendingRollbackError):
        # "Can't reconnect until invalid transaction is rolled back": a dead connection
        return "transient"
    return _classify_driver(error, wrapper=None)


def is_bad_query(error: BaseException) -> bool:
    """A database error proper (not a lost connection, not a timeout): the mapping's
    tables, columns or SQL are to blame."""
    return classify(error) == "database"


def _classify_driver(orig: BaseException | None, *, wrapper: sa.exc.DBAPIError | None) -> Kind:
    # MariaDB/MySQL errors carry their numeric code first (and a SQLSTATE too, in
    # recent PyMySQL: the code is the finer of the two); PostgreSQL's a SQLSTATE.
    args = getattr(orig, "args", ())
    code = args[0] if args and isinstance(args[0], int) else None
    if code is not None:
        if code in _MYSQL_TRANSIENT:
            return "transient"
        if code in _MYSQL_TIMEOUT:
            return "timeout"
        return "database"
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate.startswith("08") or sqlstate in _PG_TRANSIENT:
            return "transient"
        if sqlstate in _PG_TIMEOUT and "timeout" in str(orig).lower():
            return "timeout"
        return "database"
    # No SQLSTATE and no code: psycopg's own connection failures ("connection
    # failed", "consuming input failed", "the connection is closed") are
    # OperationalError/InterfaceError without a server answer.
    if isinstance(wrapper, sa.exc.OperationalError | sa.exc.InterfaceError):
        name = type(orig).__module__ if orig is not None else ""
        if name.startswith(("psycopg", "pymysql")):
            return "transient"
    return "database"


def driver_line(error: BaseException) -> str:
    """The driver's first line of a source error (masked), for one-line reports."""
    return first_line(error.orig if isinstance(error, sa.exc.DBAPIError) else error)


def source_error(error: BaseException, *, where: str, doing: str) -> SourceError:
    """The SourceError for `error`, raised while `doing` something for `where`
    (e.g. "mappings/users.yml: stream users")."""
    detail = driver_line(error)
    kind = classify(error)
    if kind == "transient":
        return SourceLostError(
            f"{where}: the source connection was lost while {doing}: {detail}",
            detail=detail,
        )
    if kind == "timeout":
        return SourceError(
            f"{where}: the source query timed out while {doing}: {detail} — {TIMEOUT_ADVICE}"
        )
    return SourceError(f"{where}: the source database failed while {doing}: {detail}")


def query_error(error: BaseException, *, mapping_path: str, stream: str, doing: str) -> SourceError:
    """A failed read of a stream: transient and timeout as `source_error`; a
    database error becomes a QueryError, which the run explains with the
    mapping's problems (`check.explain_failure`)."""
    where = f"{mapping_path}: stream {stream}"
    if classify(error) != "database":
        return source_error(error, where=where, doing=doing)
    detail = driver_line(error)
    return QueryError(
        f"{where}: the source query failed: {detail} — check the table, columns, `where:` "
        "and `sql:` expressions (etl validate --check-source)",
        mapping_path=mapping_path,
        stream=stream,
        detail=detail,
    )


@contextlib.contextmanager
def translated(*, where: str, doing: str) -> Iterator[None]:
    """Run a block; a source error escaping it becomes its SourceError (no traceback)."""
    try:
        yield
    except SOURCE_ERRORS as exc:
        raise source_error(exc, where=where, doing=doing) from None
