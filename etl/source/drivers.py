"""Hooks on the source engine's connections, so values Python cannot hold reach
`transform` as values it reports invalid, instead of failing the whole read.

* PostgreSQL's `infinity` / `-infinity` timestamps and dates: psycopg refuses
  to load them as datetimes ("timestamp too large (after year 10K)"), which
  would stop the run at the first such row. They load as `Unrepresentable`
  (and dump back as themselves, for a keyset page that ends on one).
* Invalid UTF-8 in SQLite text: sqlite3 refuses the whole fetch ("Could not
  decode to UTF-8"). Such text loads with lone surrogates, which transform
  reports as "text is not valid UTF-8".

SPEC §4: one bad row never stops a run.
"""

from __future__ import annotations

import functools
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format

from etl.model import Unrepresentable

# PostgreSQL's binary forms of ±infinity: the extreme int64 (timestamps,
# microseconds) and int32 (dates, days).
_INFINITIES = {
    b"infinity": "infinity",
    b"-infinity": "-infinity",
    (2**63 - 1).to_bytes(8, "big"): "infinity",
    (-(2**63)).to_bytes(8, "big", signed=True): "-infinity",
    (2**31 - 1).to_bytes(4, "big"): "infinity",
    (-(2**31)).to_bytes(4, "big", signed=True): "-infinity",
}
_TYPE_NAMES = {
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp",
    "date": "date",
}


def install(engine: sa.Engine) -> None:
    """Register the hooks on every connection `engine` opens (PostgreSQL via
    psycopg, SQLite); other databases are left as they are."""
    backend, driver = engine.dialect.name, engine.dialect.driver
    if backend == "postgresql" and driver == "psycopg":
        sa.event.listen(engine, "connect", _psycopg_hooks)
    elif backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_hooks)


def _sqlite_hooks(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.text_factory = _decode_sqlite_text


def _decode_sqlite_text(data: bytes) -> str:
    # surrogateescape keeps every byte (as a lone surrogate) for the reason to name
    return data.decode("utf-8", "surrogateescape")


def _psycopg_hooks(dbapi_conn: Any, _record: Any) -> None:
    adapters = dbapi_conn.adapters
    for name, spelled in _TYPE_NAMES.items():
        oid = psycopg.postgres.types[name].oid
        for fmt in (Format.TEXT, Format.BINARY):
            base = adapters.get_loader(oid, fmt)
            if base is not None and not getattr(base, "_etl_infinity", False):
                adapters.register_loader(oid, _infinity_loader(base, spelled))
    adapters.register_dumper(Unrepresentable, _UnrepresentableDumper)


@functools.cache
def _infinity_loader(base: type[Any], type_name: str) -> type[Any]:
    """A loader that delegates to `base` (psycopg's own, C-accelerated one: not
    subclassable) and loads ±infinity as Unrepresentable instead of failing."""

    def __init__(self: Any, oid: int, context: Any = None) -> None:
        Loader.__init__(self, oid, context)
        self._load = base(oid, context).load

    def load(self: Any, data: Any) -> Any:
        try:
            return self._load(data)
        except psycopg.DataError:
            spelled = _INFINITIES.get(bytes(data))
            if spelled is None:
                raise
            return Unrepresentable(text=spelled, type_name=type_name)

    namespace = {"__init__": __init__, "load": load, "format": base.format, "_etl_infinity": True}
    return type(f"Infinity{base.__name__}", (Loader,), namespace)


class _UnrepresentableDumper(Dumper):
    """Sends an Unrepresentable back as the database spelled it (oid unknown: the
    server casts it to the column's type), e.g. as the keyset position after it."""

    def dump(self, obj: Any) -> bytes:
        return str(obj.text).encode()
