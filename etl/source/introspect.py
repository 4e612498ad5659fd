"""What tables and columns the source database has, for `etl init` (SPEC §11).

`inspect_tables()` reads the catalogue with SQLAlchemy's inspector (no rows)
and returns plain frozen data, which `etl.source.scaffold` turns into mapping
files without touching the database again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

ColumnKind = Literal[
    "text", "integer", "number", "boolean", "datetime", "date", "json", "binary", "other"
]


@dataclass(frozen=True)
class ColumnInfo:
    """One column: its name, what kind of values it holds, and whether it may be NULL."""

    name: str
    kind: ColumnKind
    nullable: bool
    timezone: bool = False  # datetime columns: values carry their zone


@dataclass(frozen=True)
class TableInfo:
    """One table: its columns in order, primary key and single-column foreign keys."""

    name: str
    columns: tuple[ColumnInfo, ...]
    primary_key: tuple[str, ...]
    foreign_keys: tuple[tuple[str, str], ...]  # (column, referred table)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)


def inspect_tables(engine: sa.Engine) -> tuple[TableInfo, ...]:
    """Every table of the default schema, sorted by name (views are left out)."""
    inspector = sa.inspect(engine)
    tables = []
    for name in sorted(inspector.get_table_names()):
        columns = tuple(
            ColumnInfo(
                name=column["name"],
                kind=column_kind(column["type"]),
                nullable=bool(column.get("nullable", True)),
                timezone=bool(getattr(column["type"], "timezone", False)),
            )
            for column in inspector.get_columns(name)
        )
        primary_key = tuple(inspector.get_pk_constraint(name).get("constrained_columns") or ())
        foreign_keys = tuple(
            (fk["constrained_columns"][0], fk["referred_table"])
            for fk in inspector.get_foreign_keys(name)
            if len(fk["constrained_columns"]) == 1
        )
        tables.append(TableInfo(name, columns, primary_key, foreign_keys))
    return tuple(tables)


def column_kind(column_type: sa.types.TypeEngine[Any]) -> ColumnKind:
    """The kind of a reflected column type (dialect types subclass the generic ones)."""
    # Order matters: Boolean before Integer (MySQL's TINYINT(1) reflects as Boolean
    # only sometimes), DateTime before Date (some dialects subclass one from the other).
    kinds: tuple[tuple[type[sa.types.TypeEngine[Any]], ColumnKind], ...] = (
        (sa.Boolean, "boolean"),
        (sa.DateTime, "datetime"),
        (sa.Date, "date"),
        (sa.Integer, "integer"),
        (sa.Numeric, "number"),
        (sa.JSON, "json"),
        (sa.LargeBinary, "binary"),
        (sa.String, "text"),
    )
    for generic, kind in kinds:
        if isinstance(column_type, generic):
            return kind
    name = type(column_type).__name__.lower()
    if "json" in name:
        return "json"
    if "uuid" in name:
        return "text"
    return "other"
