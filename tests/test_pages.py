"""Keyset pages sized by bytes as well as rows: memory stays flat with wide rows."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from etl.model import Field, Mapping, Source
from etl.source import extract


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
