"""Read a stream's rows from the source database, streaming, in keyset pages.

`build_query` is pure (tests compile and inspect it); the rest runs SQL inside
a read-only transaction that `read_only` opens. Rows come out as plain tuples:
the key columns, the cursor (when mapped), then one value per
`Mapping.selected_fields` — the layout `transform.to_record` reads.

Identifiers go through SQLAlchemy's quoting; `sql:` and `where:` are the only
raw SQL, and they run read-only. The watermark maths is in `horizon`, the
`validate --check-source` checks in `check`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from etl.dburl import with_driver
from etl.model import SHARD_SEPARATOR, Mapping, Related, Shard, key_part, shard_bucket
from etl.settings import READ
from etl.source.errors import SOURCE_ERRORS, classify, driver_line, query_error

Order = Literal["cursor", "key"]
log = structlog.get_logger("etl")


# ---------------------------------------------------------------- the engine


def create_source_engine(url: str) -> sa.Engine:
    """An engine on the source database, with its driver tuned for reading.

    PostgreSQL: json/jsonb columns are parsed with orjson (psycopg's default is
    the json module, several times slower on every row). `postgres://` and
    `mysql://` URLs reach the installed drivers (etl.dburl).
    """
    engine = sa.create_engine(with_driver(url), pool_pre_ping=True)
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


def related_from(conn: Connection, related: Related) -> sa.FromClause:
    """The FROM of a `related:` entry: its table (key and cursor columns), or its query."""
    src = related.source
    if src.table is not None:
        columns = sorted({*related.key, related.cursor})
        return sa.table(src.table, *(sa.column(c) for c in columns), schema=src.schema)
    if src.query is None:
        raise ValueError("related entry has neither table nor query")
    names = query_columns(conn, src.query)
    return raw_sql(src.query).columns(*(sa.column(c) for c in names)).subquery("rel")


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


# ---------------------------------------------------------------- shards


class ShardBucket(FunctionElement[int]):
    """`model.shard_bucket` of a row's key, computed by the database: the first
    4 bytes of the MD5 of the key's text (its columns as text, joined by
    SHARD_SEPARATOR), unsigned. Compiled per dialect below; SQLite calls the
    Python function `read_only` registers."""

    name = "etl_shard_bucket"
    type = sa.BigInteger()
    inherit_cache = True


@compiles(ShardBucket)
def _bucket_sqlite(element: ShardBucket, compiler: SQLCompiler, **kw: Any) -> str:
    return f"etl_shard_bucket({compiler.process(element.clauses, **kw)})"


@compiles(ShardBucket, "postgresql")
def _bucket_postgresql(element: ShardBucket, compiler: SQLCompiler, **kw: Any) -> str:
    parts = [f"CAST({compiler.process(c, **kw)} AS TEXT)" for c in element.clauses]
    text = parts[0] if len(parts) == 1 else f"concat_ws(chr(31), {', '.join(parts)})"
    return f"('x' || substr(md5({text}), 1, 8))::bit(32)::bigint"


@compiles(ShardBucket, "mysql")
@compiles(ShardBucket, "mariadb")
def _bucket_mysql(element: ShardBucket, compiler: SQLCompiler, **kw: Any) -> str:
    parts = [f"CAST({compiler.process(c, **kw)} AS CHAR)" for c in element.clauses]
    text = parts[0] if len(parts) == 1 else f"CONCAT_WS(CHAR(31 USING utf8mb4), {', '.join(parts)})"
    # MD5 of the UTF-8 bytes, whatever the column's character set
    return f"CAST(CONV(SUBSTRING(MD5(CONVERT({text} USING utf8mb4)), 1, 8), 16, 10) AS UNSIGNED)"


def shard_predicate(keys: Sequence[Any], shard: Shard) -> sa.ColumnElement[bool]:
    """The rows of `shard`: their key's bucket modulo N is I (`Shard.owns_values`
    in SQL), so N workers each read about 1/N of a table."""
    return (ShardBucket(*keys) % shard.count) == shard.index


def key_text_disagrees(
    conn: Connection, mapping: Mapping, src: sa.FromClause, *, sample: int = 200
) -> tuple[Any, ...] | None:
    """A key (its column values) whose shard bucket the database computes unlike etl,
    among `sample` rows; None when they all agree. The two agree for integer, text
    and uuid keys (tested per database); a char(n) key (PostgreSQL trims the
    padding its driver returns), a timestamp or a float is spelled differently."""
    keys = [src.c[k] for k in mapping.key]
    query = (
        sa.select(*keys, ShardBucket(*keys))
        .select_from(src)
        .where(*(k.is_not(None) for k in keys))
        .limit(sample)
    )
    if mapping.source.where:
        query = query.where(raw_sql(f"({mapping.source.where}\n)"))
    for row in execute(conn, mapping, query, doing="checking how the key hashes").all():
        values: tuple[Any, ...] = tuple(row[:-1])
        if row[-1] != _sqlite_bucket(*values):
            return values
    return None


def _sqlite_bucket(*values: Any) -> int | None:
    if None in values:
        return None
    return shard_bucket(SHARD_SEPARATOR.join(key_part(v) for v in values))


def register_functions(conn: Connection) -> None:
    """SQLite has no md5(): give this connection `etl_shard_bucket(key, ...)`."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        if driver is not None:
            driver.create_function("etl_shard_bucket", -1, _sqlite_bucket, deterministic=True)


# ---------------------------------------------------------------- queries


def build_query(
    mapping: Mapping,
    src: sa.FromClause,
    *,
    order: Order,
    lower: Any = None,
    after: Sequence[Any] | None = None,
    limit: int | None = READ.page_size,
    null_keys: bool = False,
    shard: Shard | None = None,
    upper: Any = None,
) -> sa.Select[Any]:
    """One keyset page: rows past `after`, ordered by (cursor, key) or by key.

    `lower` bounds the cursor from below (closed: timestamps are not unique,
    and the watermark's own instant must be re-read). Pages hold no row with a
    NULL key column: no keyset position passes a NULL (`k > NULL` is never
    true), so one at the end of a page would hide every row after it.
    `null_keys=True` selects those rows instead (invalid records, read apart).
    With `shard`, only that shard's rows (the ones with a NULL key: shard 0's).
    `upper` bounds the cursor from above (open: a track stream's history ends
    where its first sync started).
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
        if shard is not None and shard.index != 0:
            query = query.where(sa.false())
    else:
        query = query.where(*(k.is_not(None) for k in keys))
        if shard is not None:
            query = query.where(shard_predicate(keys, shard))
    position = [*keys] if order == "key" else [cursor, *keys]
    if order == "cursor":
        if cursor is None:
            raise ValueError("order='cursor' needs a mapping with a cursor")
        if lower is not None:
            query = query.where(cursor >= sa.bindparam("lower", lower))
        else:
            query = query.where(cursor.is_not(None))
        if upper is not None:
            query = query.where(cursor < sa.bindparam("upper", upper))
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
    page_size: int = READ.page_size,
    page_bytes: int = READ.page_bytes,
    shard: Shard | None = None,
    upper: Any = None,
    keyset: bool = True,
) -> Iterator[list[tuple[Any, ...]]]:
    """Stream the stream's rows page by page (never OFFSET, never all at once);
    rows with a NULL key (invalid records) come last, streamed by the driver.
    With `shard`, only that shard's rows are read. `keyset=False` reads only the
    NULL-key rows (a read resumed after the keyset pages).

    A page holds at most `page_size` rows and about `page_bytes` bytes of
    values: the first page is small, and each next one is sized from the rows
    already read, so wide rows (20 KB texts, big jsonb) make short pages and
    memory stays flat whatever the row width.
    """
    n_keys = len(mapping.key)
    limit = min(page_size, FIRST_PAGE_ROWS)
    while keyset:
        query = build_query(
            mapping,
            src,
            order=order,
            lower=lower,
            after=after,
            limit=limit,
            shard=shard,
            upper=upper,
        )
        rows = fetch_page(conn, mapping, query, doing=_reading(mapping, order))
        if rows:
            yield rows
        if len(rows) < limit:
            break
        limit = rows_per_page(rows, page_size=page_size, page_bytes=page_bytes)
        last = rows[-1]
        after = last[:n_keys] if order == "key" else (last[n_keys], *last[:n_keys])
    query = build_query(
        mapping, src, order=order, lower=lower, limit=None, null_keys=True, shard=shard, upper=upper
    )
    result = execute(
        conn,
        mapping,
        query.execution_options(yield_per=page_size),
        doing="reading rows whose key is NULL",
    )
    try:
        for partition in result.partitions():
            yield [tuple(row) for row in partition]
    finally:
        result.close()


# The first page of a read: enough to size the next ones by, small enough that
# even rows of 32 KB cost only a few MB.
FIRST_PAGE_ROWS = 100
_SAMPLED_ROWS = 16


def rows_per_page(rows: Sequence[Sequence[Any]], *, page_size: int, page_bytes: int) -> int:
    """How many rows like these fit `page_bytes` (at most `page_size`, at least 10
    or `page_size`), from the sizes of a few of them."""
    step = max(1, len(rows) // _SAMPLED_ROWS)
    sample = rows[::step]
    per_row = sum(row_bytes(row) for row in sample) / len(sample)
    return max(min(10, page_size), min(page_size, int(page_bytes / max(per_row, 1.0))))


def row_bytes(row: Sequence[Any]) -> int:
    """About how many bytes a row's values hold: text and bytes by length, JSON
    values (jsonb, arrays) by their serialized length, anything else 8."""
    size = 0
    for value in row:
        if isinstance(value, str | bytes):
            size += len(value)
        elif isinstance(value, list | dict):
            size += len(orjson.dumps(value, default=str))
        else:
            size += 8
    return size


_Page = TypeVar("_Page")
_END = object()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def prefetch(pages: Iterator[_Page]) -> Generator[_Page, None, None]:
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
    conn: Connection,
    mapping: Mapping,
    src: sa.FromClause,
    keys: Sequence[Sequence[Any]],
    *,
    shard: Shard | None = None,
    with_cursor: bool = False,
) -> list[tuple[Any, ...]]:
    """The rows of the given key values (to retry rejected and invalid records, or
    re-read records a related table names); with `shard`, only those it owns;
    `with_cursor` leaves out rows whose cursor is NULL (SPEC §5: only full reads
    see them)."""
    if not keys:
        return []
    query = build_query(mapping, src, order="key", limit=None, shard=shard)
    if with_cursor and mapping.cursor:
        query = query.where(src.c[mapping.cursor].is_not(None))
    columns = [src.c[k] for k in mapping.key]
    if len(columns) == 1:
        query = query.where(columns[0].in_([k[0] for k in keys]))
    else:
        query = query.where(sa.tuple_(*columns).in_([tuple(k) for k in keys]))
    return fetch_page(conn, mapping, query, doing="re-reading records by key")


def related_mapping(mapping: Mapping, related: Related) -> Mapping:
    """A stream's mapping as seen through one `related:` entry: its source, key,
    cursor and lookback (the stream's path, name and time zone), so the horizon and
    lower-bound functions of streams serve related tables too."""
    return dataclasses.replace(
        mapping,
        source=related.source,
        key=related.key,
        cursor=related.cursor,
        lookback_seconds=related.lookback_seconds,
        traits=(),
        related=(),
    )


def read_related_keys(
    conn: Connection,
    mapping: Mapping,
    related: Related,
    src: sa.FromClause,
    *,
    lower: Any,
    page_size: int = READ.page_size,
) -> Iterator[list[tuple[Any, ...]]]:
    """The distinct key values of a related table's rows whose cursor is at or above
    `lower`, streamed in partitions (keys only: SPEC §9)."""
    keys = [src.c[k] for k in related.key]
    query = (
        sa.select(*keys)
        .distinct()
        .select_from(src)
        .where(*(k.is_not(None) for k in keys))
        .where(src.c[related.cursor] >= sa.bindparam("lower", lower))
    )
    if related.source.where:
        query = query.where(raw_sql(f"({related.source.where}\n)"))
    result = execute(
        conn,
        mapping,
        query.execution_options(yield_per=page_size),
        doing=f"reading keys of the related table {related.source.table or 'query'}",
    )
    try:
        for partition in result.partitions():
            yield [tuple(row) for row in partition]
    finally:
        result.close()


# The execution option that has a page's datetimes loaded by psycopg's own
# loaders (etl.source.pgtypes.fast_datetimes), not etl's ±infinity ones.
FAST_DATETIMES = "etl_fast_datetimes"


def fetch_page(
    conn: Connection, mapping: Mapping, query: sa.Select[Any], *, doing: str
) -> list[tuple[Any, ...]]:
    """All rows of one page (a bounded query).

    With psycopg, the page is first read with psycopg's own datetime loaders
    (etl.source.pgtypes): cheaper on every row than etl's, which load ±infinity
    too. A page they refuse (psycopg.DataError) is read again with etl's, in the
    same transaction: nothing was sent to the server that could abort it.
    """
    if conn.dialect.driver != "psycopg":
        return _fetch_page(execute(conn, mapping, query, doing=doing))
    fast = query.execution_options(**{FAST_DATETIMES: True})
    try:
        return _fetch_page(execute(conn, mapping, fast, doing=doing))
    except conn.dialect.loaded_dbapi.DataError:
        return _fetch_page(execute(conn, mapping, query, doing=doing))


def _fetch_page(result: sa.CursorResult[Any]) -> list[tuple[Any, ...]]:
    """All rows of one page as the driver's own tuples: one driver call, and no
    SQLAlchemy Row built per row (the hot path of every read)."""
    try:
        return [tuple(row) for row in result.cursor.fetchall()] if result.returns_rows else []
    finally:
        result.close()


def _reading(mapping: Mapping, order: Order) -> str:
    """Which read a page is, for messages: `reading a page ordered by (updated_at, id)`."""
    position = list(mapping.key) if order == "key" else [mapping.cursor or "", *mapping.key]
    return f"reading a page ordered by ({', '.join(position)})"


def execute(
    conn: Connection, mapping: Mapping, query: sa.Executable, *, doing: str = "reading rows"
) -> sa.CursorResult[Any]:
    """Run one read of `mapping`; a database error becomes the SourceError that
    `source.errors` classifies it as (lost connection, timeout, or a bad query)."""
    try:
        return conn.execute(query)
    except SOURCE_ERRORS as exc:
        raise query_error(
            exc, mapping_path=str(mapping.path), stream=mapping.stream, doing=doing
        ) from None


# ---------------------------------------------------------------- transactions


@contextlib.contextmanager
def read_only(
    conn: Connection, *, snapshot: bool = True, timezone: str = "UTC", sharded: bool = False
) -> Iterator[Connection]:
    """A read-only transaction; with `snapshot`, one consistent view for all pages.

    PostgreSQL's session zone is the mapping's, so a `timestamp` column compares
    with an aware bound in that zone. MySQL/MariaDB sessions are in UTC, so
    TIMESTAMP columns and NOW() come back in UTC. `sharded`: the pages carry a
    shard predicate (`shard_predicate`), which PostgreSQL cannot estimate.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        level = "REPEATABLE READ" if snapshot else "READ COMMITTED"
        conn.exec_driver_sql(f"SET TRANSACTION ISOLATION LEVEL {level} READ ONLY")
        # zone names were validated by ZoneInfo and cannot contain quotes
        conn.exec_driver_sql(f"SET LOCAL TIME ZONE '{timezone}'")
        if sharded:
            # The planner has no statistics for the MD5 shard predicate and takes it
            # for rare (0.5% of rows): it then reads a keyset page by a sequential
            # scan of the whole table and a top-N sort (146 ms a 2,000-row page of a
            # 100,000-row table, growing with the table), or by a Gather Merge of
            # parallel workers launched for every page (~30 ms). A page is a range
            # of the key's index, read in order: no sort, no parallel workers (5-25
            # ms, flat). Without such an index, the sort is still made.
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
            conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
    elif dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET SESSION time_zone = '+00:00'")
        conn.commit()
        level = "REPEATABLE READ" if snapshot else "READ COMMITTED"
        conn.exec_driver_sql(f"SET TRANSACTION ISOLATION LEVEL {level}")
        conn.exec_driver_sql(
            "START TRANSACTION READ ONLY" + (", WITH CONSISTENT SNAPSHOT" if snapshot else "")
        )
    elif dialect == "sqlite":
        register_functions(conn)
        conn.exec_driver_sql("PRAGMA query_only = ON")
        conn.exec_driver_sql("BEGIN")
    try:
        yield conn
    finally:
        _end_read_only(conn, dialect)


def _end_read_only(conn: Connection, dialect: str) -> None:
    """Roll the read-only transaction back. On a dead connection that fails, and
    nothing is lost by it (nothing was written): the connection is dropped, and an
    error already on its way out is not replaced by this one."""
    try:
        conn.rollback()
        if dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA query_only = OFF")
    except SOURCE_ERRORS as exc:
        log.info("source.rollback_failed", error=driver_line(exc), kind=classify(exc))
        with contextlib.suppress(*SOURCE_ERRORS):
            conn.invalidate()


# ---------------------------------------------------------------- watermarks


def count_null_cursors(conn: Connection, mapping: Mapping, src: sa.FromClause) -> int:
    """Rows whose cursor is NULL: only `--full` and `backfill` see them."""
    if not mapping.cursor:
        return 0
    query = sa.select(sa.func.count()).select_from(src).where(src.c[mapping.cursor].is_(None))
    if mapping.source.where:
        query = query.where(raw_sql(f"({mapping.source.where}\n)"))
    return int(execute(conn, mapping, query, doing="counting rows with a NULL cursor").scalar_one())


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
    return int(execute(conn, mapping, query, doing="counting rows").scalar_one())


def _quoted(conn: Connection, mapping: Mapping) -> str:
    preparer = conn.dialect.identifier_preparer
    table = preparer.quote(mapping.source.table or "")
    return f"{preparer.quote(mapping.source.schema)}.{table}" if mapping.source.schema else table
