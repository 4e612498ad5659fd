"""PostgreSQL (psycopg) half of etl.source.drivers: load `infinity` / `-infinity`
timestamps and dates as `Unrepresentable` instead of failing the read, and
json/jsonb text with orjson.

The ±infinity loaders are Python code around psycopg's own (C) loaders, paid
for on every value (~0.75 us a bench row). A keyset page is read with the
execution option FAST_DATETIMES: psycopg's own loaders, and only a page that
holds ±infinity (they refuse it) is read again with these
(`etl.source.extract.fetch_page`).

A module of its own so that only a PostgreSQL source imports psycopg (~0.05 s
a process): drivers.install imports it when the engine is postgresql+psycopg.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format

from etl.model import Unrepresentable
from etl.source.extract import FAST_DATETIMES

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


def hooks(dbapi_conn: Any, _record: Any) -> None:
    """Register the ±infinity loaders and the Unrepresentable dumper on a new
    psycopg connection."""
    adapters = dbapi_conn.adapters
    for name, spelled in _TYPE_NAMES.items():
        oid = psycopg.postgres.types[name].oid
        for fmt in (Format.TEXT, Format.BINARY):
            base = adapters.get_loader(oid, fmt)
            if base is not None and not getattr(base, "_etl_infinity", False):
                adapters.register_loader(oid, _infinity_loader(base, spelled))
    adapters.register_dumper(Unrepresentable, _UnrepresentableDumper)
    for name in ("json", "jsonb"):
        adapters.register_loader(name, _JsonText)


def fast_datetimes(
    _conn: Any,
    cursor: Any,
    _statement: str,
    _parameters: Any,
    context: Any,
    _executemany: bool,
) -> None:
    """SQLAlchemy's before_cursor_execute: a query run with FAST_DATETIMES loads its
    timestamps and dates with psycopg's own loaders (on this cursor only), which
    fail on ±infinity with psycopg.DataError."""
    if context is None or not context.execution_options.get(FAST_DATETIMES):
        return
    adapters = cursor.adapters  # the cursor's own copy of the connection's
    for name in _TYPE_NAMES:
        oid = psycopg.postgres.types[name].oid
        for fmt in (Format.TEXT, Format.BINARY):
            base = getattr(adapters.get_loader(oid, fmt), "_etl_base", None)
            if base is not None:
                adapters.register_loader(oid, base)


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

    namespace = {
        "__init__": __init__,
        "load": load,
        "format": base.format,
        "_etl_infinity": True,
        "_etl_base": base,
    }
    return type(f"Infinity{base.__name__}", (Loader,), namespace)


class _JsonText(Loader):
    """json/jsonb in text form, parsed by orjson: psycopg calls `load` with each
    value, and here that is orjson's own function, without a Python frame around
    it (psycopg's JsonLoader has one; binary jsonb keeps psycopg's)."""

    # orjson.loads takes str too: a wider signature than Loader.load's, as a function
    load = staticmethod(orjson.loads)  # type: ignore[assignment]


class _UnrepresentableDumper(Dumper):
    """Sends an Unrepresentable back as the database spelled it (oid unknown: the
    server casts it to the column's type), e.g. as the keyset position after it."""

    def dump(self, obj: Any) -> bytes:
        return str(obj.text).encode()
