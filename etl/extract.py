"""Read a stream's rows from the source database, streaming, in keyset pages.

`build_query` is pure (tests compile and inspect it); the rest runs SQL inside
a read-only transaction that `read_only` opens. Rows come out as plain tuples:
the key columns, the cursor (when mapped), then one value per
`Mapping.selected_fields` — the layout `transform.to_record` reads.

Identifiers go through SQLAlchemy's quoting; `sql:` and `where:` are the only
raw SQL, and they run read-only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.errors import MappingError, SourceError
from etl.model import Mapping

Order = Literal["cursor", "key"]
Watermark = dt.datetime | int
UTC = dt.UTC
DEFAULT_PAGE_SIZE = 5000


# ---------------------------------------------------------------- the engine


def create_source_engine(url: str) -> sa.Engine:
    """An engine on the source database, with its driver tuned for reading.

    PostgreSQL: json/jsonb columns are parsed with orjson (psycopg's default is
    the json module, several times slower on every row).
    """
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":
        sa.event.listen(engine, "connect", _fast_json)
    return engine


def _fast_json(dbapi_conn: Any, _record: Any) -> None:
    from psycopg.types.json import set_json_loads  # noqa: PLC0415 - PostgreSQL only

    set_json_loads(orjson.loads, dbapi_conn)


# ---------------------------------------------------------------- the FROM


def source_from(conn: Connection, mapping: Mapping) -> sa.FromClause:
    """The FROM of a stream: its table, or its query wrapped as a subquery."""
    src = mapping.source
    if src.table is not None:
        columns = sorted(_columns_used(mapping))
        return sa.table(src.table, *(sa.column(c) for c in columns), schema=src.schema)
    if src.query is None:
        raise ValueError(f"{mapping.path}: source has neither table nor query")
    names = query_columns(conn, src.query)
    text = raw_sql(src.query).columns(*(sa.column(c) for c in names))
    return text.subquery("src")


def query_columns(conn: Connection, query: str) -> list[str]:
    """The column names a `query:` source returns (it runs with no rows)."""
    probe: sa.Select[Any] = sa.select(sa.literal_column("*")).select_from(
        raw_sql(query).columns().subquery("src")
    )
    result = conn.execute(probe.where(sa.false()))
    names = list(result.keys())
    result.close()
    return names


def raw_sql(sql: str) -> sa.TextClause:
    """The user's SQL as written: `:name` is not a bind parameter here, and a
    trailing `-- comment` cannot swallow the `)` that wraps it."""
    return sa.text(sql.replace(":", "\\:") + "\n")


def _columns_used(mapping: Mapping) -> set[str]:
    used = set(mapping.key)
    if mapping.cursor:
        used.add(mapping.cursor)
    used.update(f.value for f in mapping.selected_fields if f.kind == "column")
    return used


# ---------------------------------------------------------------- queries


def build_query(
    mapping: Mapping,
    src: sa.FromClause,
    *,
    order: Order,
    lower: Any = None,
    after: Sequence[Any] | None = None,
    limit: int | None = DEFAULT_PAGE_SIZE,
    null_keys: bool = False,
) -> sa.Select[Any]:
    """One keyset page: rows past `after`, ordered by (cursor, key) or by key.

    `lower` bounds the cursor from below (closed: timestamps are not unique,
    and the watermark's own instant must be re-read). Pages hold no row with a
    NULL key column: no keyset position passes a NULL (`k > NULL` is never
    true), so one at the end of a page would hide every row after it.
    `null_keys=True` selects those rows instead (invalid records, read apart).
    """
    keys = [src.c[k] for k in mapping.key]
    cursor = src.c[mapping.cursor] if mapping.cursor else None
    selected: list[Any] = [k.label(f"k{i}") for i, k in enumerate(keys)]
    if cursor is not None:
        selected.append(cursor.label("cur"))
    for i, field in enumerate(mapping.selected_fields):
        expr = (
            src.c[field.value]
            if field.kind == "column"
            else sa.literal_column(f"({field.value}\n)")
        )
        selected.append(expr.label(f"f{i}"))
    query = sa.select(*selected).select_from(src)
    if mapping.source.where:
        query = query.where(raw_sql(f"({mapping.source.where}\n)"))
    if null_keys:
        query = query.where(sa.or_(*(k.is_(None) for k in keys)))
    else:
        query = query.where(*(k.is_not(None) for k in keys))
    position = [*keys] if order == "key" else [cursor, *keys]
    if order == "cursor":
        if cursor is None:
            raise ValueError("order='cursor' needs a mapping with a cursor")
        if lower is not None:
            query = query.where(cursor >= sa.bindparam("lower", lower))
        else:
            query = query.where(cursor.is_not(None))
    if after is not None:
        query = query.where(_after(position, after))
    query = query.order_by(*position)
    if limit is not None:
        query = query.limit(limit)
    return query


def _after(position: list[Any], after: Sequence[Any]) -> sa.ColumnElement[bool]:
    if len(position) == 1:
        return position[0] > sa.bindparam("after0", after[0])  # type: ignore[no-any-return]
    values: list[Any] = [sa.bindparam(f"after{i}", v) for i, v in enumerate(after)]
    return sa.tuple_(*position) > sa.tuple_(*values)


def read_pages(
    conn: Connection,
    mapping: Mapping,
    src: sa.FromClause,
    *,
    order: Order,
    lower: Any = None,
    after: Sequence[Any] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Iterator[list[tuple[Any, ...]]]:
    """Stream the stream's rows page by page (never OFFSET, never all at once);
    rows with a NULL key (invalid records) come last, streamed by the driver."""
    n_keys = len(mapping.key)
    while True:
        query = build_query(mapping, src, order=order, lower=lower, after=after, limit=page_size)
        rows = _fetch_page(_execute(conn, mapping, query))
        if rows:
            yield rows
        if len(rows) < page_size:
            break
        last = rows[-1]
        after = last[:n_keys] if order == "key" else (last[n_keys], *last[:n_keys])
    query = build_query(mapping, src, order=order, lower=lower, limit=None, null_keys=True)
    result = _execute(conn, mapping, query.execution_options(yield_per=page_size))
    try:
        for partition in result.partitions():
            yield [tuple(row) for row in partition]
    finally:
        result.close()


_Page = TypeVar("_Page")
_END = object()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def prefetch(pages: Iterator[_Page]) -> Iterator[_Page]:
    """`pages`, with the next page read in a thread while the caller works on this one.

    The database (another process, often another core) and the driver's
    network wait overlap with transform, diff and send. At most one page waits
    in the queue, so memory stays at about three pages. The thread is the only
    user of the connection until it has stopped; closing this generator early
    stops and joins it.
    """
    slot: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for page in pages:
                if not offer(page):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the caller's thread, raised there
            offer(_Raised(exc))

    worker = threading.Thread(target=read, name="etl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slot.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
        if isinstance(pages, Generator):
            pages.close()


def read_keys(
    conn: Connection, mapping: Mapping, src: sa.FromClause, keys: Sequence[Sequence[Any]]
) -> list[tuple[Any, ...]]:
    """The rows of the given key values (to retry previously rejected records)."""
    if not keys:
        return []
    query = build_query(mapping, src, order="key", limit=None)
    columns = [src.c[k] for k in mapping.key]
    if len(columns) == 1:
        query = query.where(columns[0].in_([k[0] for k in keys]))
    else:
        query = query.where(sa.tuple_(*columns).in_([tuple(k) for k in keys]))
    return _fetch_page(_execute(conn, mapping, query))


def _fetch_page(result: sa.CursorResult[Any]) -> list[tuple[Any, ...]]:
    """All rows of one page as the driver's own tuples: one driver call, and no
    SQLAlchemy Row built per row (the hot path of every read)."""
    try:
        return [tuple(row) for row in result.cursor.fetchall()] if result.returns_rows else []
    finally:
        result.close()


def _execute(conn: Connection, mapping: Mapping, query: sa.Executable) -> sa.CursorResult[Any]:
    try:
        return conn.execute(query)
    except sa.exc.DBAPIError as exc:
        raise SourceError(
            f"{mapping.path}: stream {mapping.stream}: the source query failed: "
            f"{_first_line(exc.orig)} — {_culprits(conn.engine, mapping)}"
        ) from None


def _culprits(engine: sa.Engine, mapping: Mapping) -> str:
    """What to fix after a failed read: the mapping's problems as `validate
    --check-source` finds them (on a fresh connection: the failed one may be in
    an aborted transaction), else where to look."""
    advice = (
        "check the table, columns, `where:` and `sql:` expressions (etl validate --check-source)"
    )
    try:
        with engine.connect() as probe, read_only(probe):
            problems = _check_one(probe, mapping)
    except Exception:  # the probe is best effort: the first error stands
        return advice
    if not problems:
        return advice
    return "`etl validate --check-source` finds:\n  " + "\n  ".join(problems)


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error is not None and str(error) else "error"


# ---------------------------------------------------------------- transactions


@contextlib.contextmanager
def read_only(
    conn: Connection, *, snapshot: bool = True, timezone: str = "UTC"
) -> Iterator[Connection]:
    """A read-only transaction; with `snapshot`, one consistent view for all pages.

    PostgreSQL's session zone is the mapping's, so a `timestamp` column compares
    with an aware bound in that zone. MySQL/MariaDB sessions are in UTC, so
    TIMESTAMP columns and NOW() come back in UTC.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        level = "REPEATABLE READ" if snapshot else "READ COMMITTED"
        conn.exec_driver_sql(f"SET TRANSACTION ISOLATION LEVEL {level} READ ONLY")
        # zone names were validated by ZoneInfo and cannot contain quotes
        conn.exec_driver_sql(f"SET LOCAL TIME ZONE '{timezone}'")
    elif dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET SESSION time_zone = '+00:00'")
        conn.commit()
        level = "REPEATABLE READ" if snapshot else "READ COMMITTED"
        conn.exec_driver_sql(f"SET TRANSACTION ISOLATION LEVEL {level}")
        conn.exec_driver_sql(
            "START TRANSACTION READ ONLY" + (", WITH CONSISTENT SNAPSHOT" if snapshot else "")
        )
    elif dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
        conn.exec_driver_sql("BEGIN")
    try:
        yield conn
    finally:
        conn.rollback()
        if dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA query_only = OFF")


# ---------------------------------------------------------------- watermarks


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
    sample = _execute(conn, mapping, query).scalar()
    if sample is None:
        return None
    return "integer" if isinstance(sample, int) and not isinstance(sample, bool) else "datetime"


def safe_horizon(
    conn: Connection,
    mapping: Mapping,
    src: sa.FromClause,
    *,
    max_transaction_age: dt.timedelta = dt.timedelta(hours=1),
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
        top = _execute(conn, mapping, sa.select(sa.func.max(column))).scalar_one()
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
    if isinstance(watermark, int):
        return watermark - int(mapping.lookback_seconds)
    zone = ZoneInfo(mapping.timezone)
    value = watermark - dt.timedelta(seconds=mapping.lookback_seconds)
    value -= fall_back(value, now or value, zone)
    if conn.dialect.name == "postgresql":
        return value
    local = value.astimezone(zone).replace(tzinfo=None)
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


def count_null_cursors(conn: Connection, mapping: Mapping, src: sa.FromClause) -> int:
    """Rows whose cursor is NULL: only `--full` and `backfill` see them."""
    if not mapping.cursor:
        return 0
    query = sa.select(sa.func.count()).select_from(src).where(src.c[mapping.cursor].is_(None))
    if mapping.source.where:
        query = query.where(raw_sql(f"({mapping.source.where}\n)"))
    return int(_execute(conn, mapping, query).scalar_one())


def estimate_rows(conn: Connection, mapping: Mapping, src: sa.FromClause) -> int | None:
    """A fast row-count estimate for progress (pg_class.reltuples), else an exact count."""
    if conn.dialect.name == "postgresql" and mapping.source.table and not mapping.source.where:
        estimate = conn.execute(
            sa.text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:name)"),
            {"name": _quoted(conn, mapping)},
        ).scalar()
        if estimate is not None and estimate >= 0:
            return int(estimate)
    query = sa.select(sa.func.count()).select_from(src)
    if mapping.source.where:
        query = query.where(raw_sql(f"({mapping.source.where}\n)"))
    return int(_execute(conn, mapping, query).scalar_one())


def _quoted(conn: Connection, mapping: Mapping) -> str:
    preparer = conn.dialect.identifier_preparer
    table = preparer.quote(mapping.source.table or "")
    return f"{preparer.quote(mapping.source.schema)}.{table}" if mapping.source.schema else table


# ---------------------------------------------------------------- validate --check-source


def check_source(engine: sa.Engine, mappings: Sequence[Mapping]) -> list[str]:
    """Check tables, columns and expressions of every mapping against the source.

    Raises MappingError listing every problem; returns notes (NULL cursors).
    """
    problems: list[str] = []
    notes: list[str] = []
    for mapping in mappings:
        with engine.connect() as conn, read_only(conn):
            found = _check_one(conn, mapping)
            problems.extend(found)
            if not found and mapping.cursor:
                src = source_from(conn, mapping)
                nulls = count_null_cursors(conn, mapping, src)
                if nulls:
                    notes.append(
                        f"{mapping.path}: cursor: {nulls} row(s) have a NULL "
                        f"{mapping.cursor}; only `sync --full` and `backfill` send them"
                    )
    if problems:
        raise MappingError(problems)
    return notes


def _check_one(conn: Connection, mapping: Mapping) -> list[str]:
    where = f"{mapping.path}: source"
    try:
        with conn.begin_nested():
            available = _available_columns(conn, mapping)
    except sa.exc.DBAPIError as exc:
        what = "query" if mapping.source.query else "table"
        return [
            f"{where}.{what}: cannot be read: {_first_line(exc.orig)} — check the "
            f"{what} name{' and schema' if what == 'table' else ''}"
        ]
    if available is None:
        schema = f" in schema {mapping.source.schema}" if mapping.source.schema else ""
        return [
            f"{where}.table: no table {mapping.source.table!r}{schema} — check the name "
            "(and `schema:`)"
        ]
    problems = []
    listing = ", ".join(sorted(available))
    wanted = [("key", k) for k in mapping.key]
    if mapping.cursor:
        wanted.append(("cursor", mapping.cursor))
    for field in (*mapping.id_fields, *mapping.traits):
        if field.kind == "column":
            prefix = "" if field in mapping.id_fields else "traits."
            wanted.append((f"{prefix}{field.name}", field.value))
    for key, column in wanted:
        if column not in available:
            problems.append(
                f"{mapping.path}: {key}: no column {column!r} in the source "
                f"(columns: {listing}) — fix the column name"
            )
    # SQL expressions are checked even when a column is wrong: all problems at once
    src = source_from(conn, mapping)
    if mapping.source.where:
        problems += _try(
            conn,
            mapping,
            "source.where",
            mapping.source.where,
            sa.select(sa.literal(1))
            .select_from(src)
            .where(raw_sql(f"({mapping.source.where}\n)"))
            .limit(0),
        )
    for field in mapping.selected_fields:
        if field.kind == "sql":
            key = f"traits.{field.name}" if field in mapping.traits else field.name
            query: sa.Select[Any] = (
                sa.select(sa.literal_column(f"({field.value}\n)")).select_from(src).limit(0)
            )
            problems += _try(conn, mapping, f"{key}.sql", field.value, query)
    return problems


def _available_columns(conn: Connection, mapping: Mapping) -> set[str] | None:
    if mapping.source.query is not None:
        return set(query_columns(conn, mapping.source.query))
    inspector = sa.inspect(conn)
    table = mapping.source.table or ""
    if not inspector.has_table(table, schema=mapping.source.schema):
        return None
    return {c["name"] for c in inspector.get_columns(table, schema=mapping.source.schema)}


def _try(
    conn: Connection, mapping: Mapping, key: str, expression: str, query: sa.Executable
) -> list[str]:
    try:
        with conn.begin_nested():
            conn.execute(query).close()
    except sa.exc.DBAPIError as exc:
        return [
            f"{mapping.path}: {key}: {expression!r} fails in the database: "
            f"{_first_line(exc.orig)} — fix the SQL (it runs as written, inside the FROM)"
        ]
    return []
