"""The safe watermark of a run (SPEC §5), and the lower bound of the next read.

`safe_horizon()` is taken inside the read snapshot: the database's clock,
held back by transactions still open, or the largest integer cursor.
`lower_bound()` turns a stored watermark into the value the next read
compares the cursor with (lookback, DST fall-back, each dialect's form).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.errors import SourceError
from etl.model import Mapping, Watermark
from etl.settings import READ
from etl.source.extract import execute

UTC = dt.UTC


@dataclass(frozen=True)
class Horizon:
    """The safe watermark of a run and what limited it (SPEC §5)."""

    value: Watermark | None
    clock: dt.datetime | None = None
    held_by_transaction: dt.datetime | None = None
    notes: tuple[str, ...] = ()


def cursor_kind(conn: Connection, mapping: Mapping, src: sa.FromClause) -> str | None:
    """ "integer" or "datetime" by a sample value; None when no row has a cursor."""
    if not mapping.cursor:
        return None
    column = src.c[mapping.cursor]
    # the first query of a stream: a missing table or column is named here
    query = sa.select(column).where(column.is_not(None)).limit(1)
    sample = execute(conn, mapping, query, doing="sampling the cursor").scalar()
    if sample is None:
        return None
    return "integer" if isinstance(sample, int) and not isinstance(sample, bool) else "datetime"


def safe_horizon(
    conn: Connection,
    mapping: Mapping,
    src: sa.FromClause,
    *,
    max_transaction_age: dt.timedelta = READ.max_transaction_age,
) -> Horizon:
    """The watermark this run may advance to, taken inside the read snapshot.

    Timestamps: the database's clock, held below the start of the oldest other
    transaction still open (PostgreSQL) so rows it commits later are re-read.
    Integer cursors: the largest value visible in the snapshot.
    """
    kind = cursor_kind(conn, mapping, src)
    if kind is None:
        return Horizon(value=None)
    if kind == "integer":
        column = src.c[mapping.cursor]  # type: ignore[index]
        top = execute(
            conn, mapping, sa.select(sa.func.max(column)), doing="taking the safe horizon"
        ).scalar_one()
        if not isinstance(top, int) or isinstance(top, bool):
            # SQLite keeps any type in any column: integers and text in one cursor
            raise SourceError(
                f"{mapping.path}: cursor: {mapping.cursor} holds integers and also "
                f"{type(top).__name__} values such as {str(top)[:40]!r} — a cursor must be all "
                "timestamps or all integers: fix those rows, or map another cursor"
            )
        return Horizon(value=top)
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return _postgres_horizon(conn, max_transaction_age)
    if dialect in ("mysql", "mariadb"):
        return _mysql_horizon(conn, max_transaction_age)
    now = conn.exec_driver_sql("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").scalar_one()
    clock = dt.datetime.fromisoformat(now).replace(tzinfo=UTC)
    return Horizon(value=clock, clock=clock)


# Sessions the role may not see show datname and pid but NULL everything else
# (backend_type and xact_start included): counted apart, they cannot hold us back.
_PG_HORIZON = """
SELECT now(),
       min(xact_start) FILTER (WHERE backend_type = 'client backend'
                               AND xact_start > now() - %(age)s::interval),
       min(xact_start) FILTER (WHERE backend_type = 'client backend'
                               AND xact_start <= now() - %(age)s::interval),
       count(*) FILTER (WHERE backend_type IS NULL AND query = '<insufficient privilege>')
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


def _postgres_horizon(conn: Connection, max_age: dt.timedelta) -> Horizon:
    # now() is our transaction's start, before our snapshot was taken.
    age = f"{int(max_age.total_seconds())} seconds"
    row = conn.exec_driver_sql(_PG_HORIZON, {"age": age}).one()
    clock, oldest, stuck, hidden = row
    notes: list[str] = []
    if hidden:
        notes.append(
            f"{hidden} other session(s) are not visible to this role, so transactions "
            "still open there cannot hold the watermark back; relying on the lookback "
            "— grant pg_read_all_stats to the role to close that gap"
        )
    if stuck is not None:
        notes.append(
            f"a transaction open since {stuck.isoformat()} is older than the "
            f"{max_age} bound and is ignored; rows it commits later rely on the lookback"
        )
    value = min(clock, oldest) if oldest is not None else clock
    return Horizon(value=value, clock=clock, held_by_transaction=oldest, notes=tuple(notes))


def _mysql_horizon(conn: Connection, max_age: dt.timedelta) -> Horizon:
    clock = conn.exec_driver_sql("SELECT UTC_TIMESTAMP(6)").scalar_one().replace(tzinfo=UTC)
    notes: list[str] = []
    oldest = None
    try:
        # trx_started is in the session time zone, which read_only() set to UTC.
        started = conn.exec_driver_sql(
            "SELECT MIN(trx_started) FROM information_schema.innodb_trx "
            "WHERE trx_mysql_thread_id <> CONNECTION_ID() AND trx_started > %s",
            (clock.replace(tzinfo=None) - max_age,),
        ).scalar()
        oldest = started.replace(tzinfo=UTC) if started is not None else None
    except sa.exc.DBAPIError:
        notes.append(
            "information_schema.innodb_trx is not readable by this role, so open "
            "transactions cannot hold the watermark back; relying on the lookback "
            "— grant PROCESS to the role to close that gap"
        )
    value = min(clock, oldest) if oldest is not None else clock
    return Horizon(value=value, clock=clock, held_by_transaction=oldest, notes=tuple(notes))


def lower_bound(
    conn: Connection, mapping: Mapping, watermark: Watermark, *, now: dt.datetime | None = None
) -> Any:
    """`watermark - lookback`, as a value the database compares with the cursor.

    PostgreSQL gets an aware timestamp: timestamptz compares exactly, and a
    `timestamp` column is read in the session zone, which `read_only` set to
    the mapping's. MySQL/MariaDB get a naive value in the mapping's zone;
    SQLite gets text (see `sqlite_text`).

    When clocks went back between the bound and `now` (a DST fall-back), local
    times after the bound repeat an hour below it; the bound moves down by
    that much so naive local timestamps in the repeated hour are not skipped.
    """
    return as_bound(conn, mapping, below_lookback(mapping, watermark, now=now))


def below_lookback(
    mapping: Mapping, watermark: Watermark, *, now: dt.datetime | None = None
) -> Watermark:
    """`watermark - lookback` (moved down over a DST fall-back, see `lower_bound`)."""
    if isinstance(watermark, int):
        return watermark - int(mapping.lookback_seconds)
    value = watermark - dt.timedelta(seconds=mapping.lookback_seconds)
    return value - fall_back(value, now or value, ZoneInfo(mapping.timezone))


def as_bound(conn: Connection, mapping: Mapping, value: Watermark) -> Any:
    """A watermark-like value (an aware time or an integer) in the form the
    database compares the cursor with (see `lower_bound`)."""
    if isinstance(value, int) or conn.dialect.name == "postgresql":
        return value
    local = value.astimezone(ZoneInfo(mapping.timezone)).replace(tzinfo=None)
    if conn.dialect.name == "sqlite":
        return sqlite_text(local)
    return local


def fall_back(start: dt.datetime, end: dt.datetime, zone: dt.tzinfo) -> dt.timedelta:
    """How far `zone`'s clocks went back between two instants (zero if they did not)."""
    before = start.astimezone(zone).utcoffset() or dt.timedelta(0)
    after = end.astimezone(zone).utcoffset() or dt.timedelta(0)
    return max(dt.timedelta(0), before - after)


def sqlite_text(value: dt.datetime) -> str:
    """A naive datetime as SQLite text that compares safely with stored text.

    `YYYY-MM-DD HH:MM:SS` plus the fraction without trailing zeros: then `>=`
    on text holds for every stored fraction length at the same instant, and
    rows stored with `T` or a `Z`/offset suffix sort at or above it, so a
    text comparison can re-read a row but never skip one.
    """
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text
