"""Keyset pages sized by bytes as well as rows: memory stays flat with wide rows."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import psycopg
import sqlalchemy as sa

from etl.model import Field, Mapping, Source, Unrepresentable
from etl.source import drivers, extract


def _mapping() -> Mapping:
    column = Field(name="user_id", kind="column", value="id")
    return Mapping(
        stream="t",
        path="t.yml",
        event_type="user_identify",
        source=Source(table="t"),
        key=("id",),
        cursor=None,
        user_id=column,
        account_id=column,
        traits=(Field(name="bio", kind="column", value="bio"),),
    )


def _pages(url: str, *, bio_bytes: int, rows: int, **sizes: int) -> list[list[Any]]:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, bio TEXT)")
        conn.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO t SELECT i, ? FROM n",
            (rows, "x" * bio_bytes),
        )
    try:
        with engine.connect() as conn, extract.read_only(conn):
            src = extract.source_from(conn, _mapping())
            return list(extract.read_pages(conn, _mapping(), src, order="key", **sizes))
    finally:
        engine.dispose()


def test_wide_rows_make_short_pages(sqlite_url: str) -> None:
    """Rows of 5 KB with a 50 KB page budget come about ten to a page, every row once."""
    pages = _pages(sqlite_url, bio_bytes=5000, rows=400, page_size=1000, page_bytes=50_000)
    assert len(pages[0]) == extract.FIRST_PAGE_ROWS
    assert all(len(page) <= 10 for page in pages[1:])
    assert [row[0] for page in pages for row in page] == list(range(1, 401))


def test_narrow_rows_fill_pages_up_to_the_row_limit(sqlite_url: str) -> None:
    """Rows of a few bytes are read `page_size` at a time after the first page."""
    pages = _pages(sqlite_url, bio_bytes=10, rows=1000, page_size=300, page_bytes=2_000_000)
    assert [len(p) for p in pages] == [100, 300, 300, 300]


def test_postgresql_pages_use_psycopgs_datetime_loaders_and_reread_a_page_with_infinity(
    pg_url: str,
) -> None:
    """A page is read with psycopg's own timestamp loaders (no Python per value); the
    page holding `infinity`, which they refuse, is read once more with etl's, which
    load it as Unrepresentable. jsonb is parsed as before."""
    engine = extract.create_source_engine(pg_url)
    drivers.install(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, bio TIMESTAMPTZ, j JSONB)")
        conn.exec_driver_sql(
            "INSERT INTO t SELECT i, CASE WHEN i = 250 THEN 'infinity' ELSE "
            "timestamptz '2021-01-20 09:55:35+00' + i * interval '1 second' END, "
            """'{"n": [1, "x"]}' FROM generate_series(1, 300) AS i"""
        )
    loaders: list[bool] = []  # per page query: did it load datetimes with etl's loaders?

    def after(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("SELECT") and "FROM t" in statement:
            loader = cursor.adapters.get_loader(psycopg.postgres.types["timestamptz"].oid, 0)
            loaders.append(getattr(loader, "_etl_infinity", False))

    sa.event.listen(engine, "after_cursor_execute", after)
    json_trait = Field(name="j", kind="column", value="j")
    mapping = dataclasses.replace(_mapping(), traits=(*_mapping().traits, json_trait))
    try:
        with engine.connect() as conn, extract.read_only(conn):
            src = extract.source_from(conn, mapping)
            pages = list(extract.read_pages(conn, mapping, src, order="key", page_size=100))
    finally:
        engine.dispose()
    rows = [row for page in pages for row in page]
    assert [row[0] for row in rows] == list(range(1, 301))
    # (key, user_id, account_id, bio, j)
    assert rows[0][3] == dt.datetime(2021, 1, 20, 9, 55, 36, tzinfo=dt.UTC)
    assert rows[249][3] == Unrepresentable("infinity", "timestamp with time zone")
    assert rows[0][4] == {"n": [1, "x"]}
    # pages 1-100, 101-200, 201-300 (read again with etl's loaders), an empty page,
    # then the rows with a NULL key (streamed, with etl's loaders)
    assert loaders == [False, False, False, True, False, True]
