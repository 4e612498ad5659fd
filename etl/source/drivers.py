"""Hooks on the source engine's connections, so values Python cannot hold reach
`transform` as values it reports invalid, instead of failing the whole read.

* PostgreSQL's `infinity` / `-infinity` timestamps and dates: psycopg refuses
  to load them as datetimes ("timestamp too large (after year 10K)"), which
  would stop the run at the first such row. They load as `Unrepresentable`
  (and dump back as themselves, for a keyset page that ends on one).
* Invalid UTF-8 in SQLite text: sqlite3 refuses the whole fetch ("Could not
  decode to UTF-8"). Such text loads with lone surrogates, which transform
  reports as "text is not valid UTF-8".

The PostgreSQL hooks are in etl.source.pgtypes (imported only for such a source).

SPEC §4: one bad row never stops a run.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def install(engine: sa.Engine) -> None:
    """Register the hooks on every connection `engine` opens (PostgreSQL via
    psycopg, SQLite); other databases are left as they are."""
    backend, driver = engine.dialect.name, engine.dialect.driver
    if backend == "postgresql" and driver == "psycopg":
        # Imported here: psycopg is paid for only by a PostgreSQL source.
        from etl.source import pgtypes  # noqa: PLC0415

        sa.event.listen(engine, "connect", pgtypes.hooks)
        sa.event.listen(engine, "before_cursor_execute", pgtypes.fast_datetimes)
    elif backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_hooks)


def _sqlite_hooks(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.text_factory = _decode_sqlite_text


def _decode_sqlite_text(data: bytes) -> str:
    # surrogateescape keeps every byte (as a lone surrogate) for the reason to name
    return data.decode("utf-8", "surrogateescape")
