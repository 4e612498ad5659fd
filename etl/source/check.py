"""`etl validate --check-source`: a mapping's tables, columns and SQL against the source.

`check_source()` collects every problem of every mapping, then raises once;
`check_one()` also explains a read that failed (`extract.execute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.errors import MappingError, QueryError, SourceError
from etl.model import Mapping, Related, Source
from etl.redact import first_line
from etl.source.errors import driver_line, is_bad_query, translated
from etl.source.extract import (
    Order,
    build_query,
    count_null_cursors,
    query_columns,
    raw_sql,
    read_only,
    related_from,
    source_from,
)


def check_source(engine: sa.Engine, mappings: Sequence[Mapping]) -> list[str]:
    """Check tables, columns and expressions of every mapping against the source.

    Raises MappingError listing every problem; returns notes (NULL cursors).
    """
    problems: list[str] = []
    notes: list[str] = []
    for mapping in mappings:
        where = f"{mapping.path}: stream {mapping.stream}"
        with (
            translated(where=where, doing="checking it against the source"),
            engine.connect() as conn,
            read_only(conn),
        ):
            found = check_one(conn, mapping)
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


def prepare(engine: sa.Engine, mappings: Sequence[Mapping]) -> None:
    """Before anything is read or sent: prepare every stream's queries against the
    source, with no rows (`LIMIT 0`). A missing table or column or bad SQL raises
    one MappingError listing every problem (exit 2); a lost connection raises
    SourceLostError like any read.

    The stream's own page queries go first: when they run, every table, column,
    expression and `where:` they name exists, which is the common case and costs
    one query per read order. Only a stream whose queries fail is then checked
    piece by piece (`check_one`), to name each problem."""
    problems: list[str] = []
    for mapping in mappings:
        where = f"{mapping.path}: stream {mapping.stream}"
        with translated(where=where, doing="preparing its queries"):
            found = _prepare_reads(engine, mapping)
            if found:
                # On a fresh connection: a failed query ends a PostgreSQL transaction.
                with engine.connect() as conn, read_only(conn, timezone=mapping.timezone):
                    found = check_one(conn, mapping) or found
        problems.extend(found)
    if problems:
        raise MappingError(problems)


def _prepare_reads(engine: sa.Engine, mapping: Mapping) -> list[str]:
    """The stream's page queries as a run sends them, with no rows, then its
    `related:` entries; the first problem found, or none."""
    orders: list[Order] = ["key", "cursor"] if mapping.cursor else ["key"]
    with engine.connect() as conn, read_only(conn, timezone=mapping.timezone):
        try:
            src = source_from(conn, mapping)
            for order in orders:
                conn.execute(build_query(mapping, src, order=order, limit=0)).close()
        except sa.exc.DBAPIError as exc:
            if not is_bad_query(exc):
                raise
            return [
                f"{mapping.path}: source: the stream's query fails in the database: "
                f"{driver_line(exc)} — check `key`, `cursor` and the traits "
                "(etl validate --check-source)"
            ]
        return [
            problem
            for index, related in enumerate(mapping.related)
            for problem in _check_related(conn, mapping, index, related)
        ]


def check_one(conn: Connection, mapping: Mapping) -> list[str]:
    where = f"{mapping.path}: source"
    try:
        with conn.begin_nested():
            available = _available_columns(conn, mapping.source)
    except sa.exc.DBAPIError as exc:
        if not is_bad_query(exc):
            raise  # a lost connection or a timeout is not the mapping's fault
        what = "query" if mapping.source.query else "table"
        return [
            f"{where}.{what}: cannot be read: {first_line(exc.orig)} — check the "
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
    values = "properties." if mapping.track else "traits."
    for field in (*mapping.id_fields, *mapping.track_fields, *mapping.traits):
        if field.kind == "column":
            prefix = values if field in mapping.traits else ""
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
            key = f"{values}{field.name}" if field in mapping.traits else field.name
            query: sa.Select[Any] = (
                sa.select(sa.literal_column(f"({field.value}\n)")).select_from(src).limit(0)
            )
            problems += _try(conn, mapping, f"{key}.sql", field.value, query)
    for index, related in enumerate(mapping.related):
        problems += _check_related(conn, mapping, index, related)
    return problems


def _check_related(conn: Connection, mapping: Mapping, index: int, related: Related) -> list[str]:
    """A `related:` entry's table or query, its key and cursor columns, its `where:`."""
    at = f"{mapping.path}: related.{index}"
    what = "query" if related.source.query else "table"
    try:
        with conn.begin_nested():
            available = _available_columns(conn, related.source)
    except sa.exc.DBAPIError as exc:
        if not is_bad_query(exc):
            raise  # a lost connection or a timeout is not the mapping's fault
        return [f"{at}.{what}: cannot be read: {first_line(exc.orig)} — check the {what}"]
    if available is None:
        schema = f" in schema {related.source.schema}" if related.source.schema else ""
        return [
            f"{at}.table: no table {related.source.table!r}{schema} — check the name "
            "(and `schema:`)"
        ]
    listing = ", ".join(sorted(available))
    problems = [
        f"{at}.{key}: no column {column!r} in {related.source.table or 'the query'} "
        f"(columns: {listing}) — fix the column name"
        for key, column in [*(("key", k) for k in related.key), ("cursor", related.cursor)]
        if column not in available
    ]
    if related.source.where and not problems:
        src = related_from(conn, related)
        problems += _try(
            conn,
            mapping,
            f"related.{index}.where",
            related.source.where,
            sa.select(sa.literal(1))
            .select_from(src)
            .where(raw_sql(f"({related.source.where}\n)"))
            .limit(0),
        )
    return problems


def _available_columns(conn: Connection, source: Source) -> set[str] | None:
    if source.query is not None:
        return set(query_columns(conn, source.query))
    inspector = sa.inspect(conn)
    table = source.table or ""
    if not inspector.has_table(table, schema=source.schema):
        return None
    return {c["name"] for c in inspector.get_columns(table, schema=source.schema)}


def _try(
    conn: Connection, mapping: Mapping, key: str, expression: str, query: sa.Executable
) -> list[str]:
    try:
        with conn.begin_nested():
            conn.execute(query).close()
    except sa.exc.DBAPIError as exc:
        if not is_bad_query(exc):
            raise  # a lost connection or a timeout is not the mapping's fault
        return [
            f"{mapping.path}: {key}: {expression!r} fails in the database: "
            f"{first_line(exc.orig)} — fix the SQL (it runs as written, inside the FROM)"
        ]
    return []


def explain_failure(engine: sa.Engine, mapping: Mapping, error: QueryError) -> SourceError:
    """A failed read, with what to fix: the mapping's problems as `validate
    --check-source` finds them (on a fresh connection: the failed one may be in
    an aborted transaction), else the generic advice the error already carries."""
    try:
        with engine.connect() as probe, read_only(probe):
            problems = check_one(probe, mapping)
    except Exception:  # the probe is best effort: the first error stands
        return error
    if not problems:
        return error
    return SourceError(
        f"{error.mapping_path}: stream {error.stream}: the source query failed: {error.detail} — "
        "`etl validate --check-source` finds:\n  " + "\n  ".join(problems)
    )
