"""`etl validate --check-source`: a bounded sample of real rows through the transform.

Before any run (SPEC §11), `sample_source()` reads, per stream, a few rows from
each end of the key order and of the cursor order (and rows whose key is
NULL), read-only and `LIMIT`ed, maps them as a sync would, and reports the share
of invalid records by field and reason, repeated keys and empty ids. What
proves the mapping wrong (a key that repeats, a field that makes every sampled
row invalid) is a problem (exit 2); a share of bad rows is a note.

It also names the tables a `query:` source (or a `sql:` trait's subquery) reads
whose changes neither the cursor nor a `related:` entry can see: edits there
reach Hyperengage only at the next full read.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.model import Mapping
from etl.run.transform import EventContext, make_transformer, record_key
from etl.source import extract

_ID_FIELDS = ("user_id", "account_id", "anonymous_id", "url")
_REQUIRED = re.compile(r"^required trait '([^']+)'")
_ID_REASON = re.compile(r"^(user_id|account_id) is ")
_FIELD_REASON = re.compile(r"^([^:]+): ")


@dataclass
class StreamSample:
    """What the sample of one stream showed."""

    mapping: Mapping
    rows: int = 0
    invalid: Counter[str] = field(default_factory=Counter)  # mapping key -> rows
    example: dict[str, str] = field(default_factory=dict)  # mapping key -> one reason
    duplicates: list[str] = field(default_factory=list)  # keys seen more than once
    keys: int = 0
    empty_ids: Counter[str] = field(default_factory=Counter)  # user_id/account_id -> rows
    uncovered: list[str] = field(default_factory=list)  # tables no cursor/related covers


def sample_source(
    engine: sa.Engine, mappings: Sequence[Mapping], *, rows: int
) -> tuple[list[str], list[str]]:
    """(problems, notes) of sampling every stream's source; `rows` per end and order."""
    problems: list[str] = []
    notes: list[str] = []
    for mapping in mappings:
        with engine.connect() as conn, extract.read_only(conn, timezone=mapping.timezone):
            sample = _sample(conn, mapping, rows)
        found, said = _findings(sample)
        problems += found
        notes += said
    return problems, notes


def _sample(conn: Connection, mapping: Mapping, n: int) -> StreamSample:
    src = extract.source_from(conn, mapping)
    transform = make_transformer(mapping, EventContext(mapping.event_type, "", ""))
    sample = StreamSample(mapping)
    n_keys = len(mapping.key)
    seen: dict[str, tuple[Any, ...]] = {}
    repeated: set[str] = set()
    for batch in _reads(conn, mapping, src, n):
        within: Counter[str] = Counter()
        for row in batch:
            key = record_key(row[:n_keys])
            within[key] += 1
            if key in seen:
                # the same row met again by another order is not a repeat
                if seen[key] != row:
                    repeated.add(key)
                continue
            seen[key] = row
            sample.rows += 1
            record = transform(row)
            if record.reason is not None:
                where = _field_of(record.reason, mapping)
                sample.invalid[where] += 1
                sample.example.setdefault(where, record.reason)
                if where in ("user_id", "account_id"):
                    sample.empty_ids[where] += 1
        # one query returns each row once: a key twice in it is two rows
        repeated.update(key for key, count in within.items() if count > 1)
    sample.keys = len(seen)
    sample.duplicates = sorted(repeated)
    sample.uncovered = uncovered_tables(mapping, dialect=conn.dialect.name)
    return sample


def _reads(
    conn: Connection, mapping: Mapping, src: sa.FromClause, n: int
) -> Iterator[list[tuple[Any, ...]]]:
    """Both ends of the key order and of the cursor order, and NULL-key rows: each
    a `LIMIT n` query of exactly the columns a sync selects."""
    keys = [src.c[k] for k in mapping.key]
    ascending = extract.build_query(mapping, src, order="key", limit=n)
    yield _fetch(conn, mapping, ascending)
    yield _fetch(conn, mapping, ascending.order_by(None).order_by(*(k.desc() for k in keys)))
    if mapping.cursor:
        cursor = src.c[mapping.cursor]
        by_cursor = extract.build_query(mapping, src, order="cursor", limit=n)
        yield _fetch(conn, mapping, by_cursor)
        yield _fetch(
            conn,
            mapping,
            by_cursor.order_by(None).order_by(cursor.desc(), *(k.desc() for k in keys)),
        )
    nulls = extract.build_query(mapping, src, order="key", limit=n, null_keys=True)
    yield _fetch(conn, mapping, nulls)


def _fetch(conn: Connection, mapping: Mapping, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    result = extract.execute(conn, mapping, query)
    try:
        return [tuple(row) for row in result]
    finally:
        result.close()


def _field_of(reason: str, mapping: Mapping) -> str:
    """The mapping key an invalid record's reason is about (`traits.name`, `user_id`...)."""
    traits = {f.name for f in mapping.traits}
    # a track stream's traits are its event's properties (SPEC §10)
    values = "properties" if mapping.track is not None else "traits"
    if match := _REQUIRED.match(reason):
        return f"traits.{match[1]}"
    if match := _ID_REASON.match(reason):
        return match[1]
    if reason.startswith(("key column is NULL", "duplicate key")):
        return "key"
    if reason.startswith(("timestamp is NULL", "utc_time: ")):
        return "timestamp"
    if reason.startswith("event_type") or "reserved for identify events" in reason:
        return "event_type"
    if (match := _FIELD_REASON.match(reason)) and match[1] in traits:
        return f"{values}.{match[1]}"
    if match and match[1] in _ID_FIELDS:
        return match[1]
    return values


def _findings(sample: StreamSample) -> tuple[list[str], list[str]]:
    mapping = sample.mapping
    path = mapping.path
    problems: list[str] = []
    notes = [
        f"{path}: sampled {sample.rows} row(s) (both ends of key"
        + (" and cursor" if mapping.cursor else "")
        + f"): {sample.rows - sum(sample.invalid.values())} valid, "
        f"{sum(sample.invalid.values())} invalid, {len(sample.duplicates)} repeated key(s)"
    ]
    for where, count in sorted(sample.invalid.items(), key=lambda item: -item[1]):
        share = f"{count} of {sample.rows} sampled row(s) ({count / sample.rows:.0%})"
        reason = sample.example[where]
        if count == sample.rows:
            # a reason may carry its own fix ("… — flatten it with sql:")
            problem, _, fix = reason.partition(" — ")
            problems.append(
                f"{path}: {where}: every sampled row is invalid: {problem} — "
                f"{fix or _fix(where, reason)}"
            )
        else:
            notes.append(f"{path}: {where}: {share} invalid, e.g. {reason}")
    for name, count in sample.empty_ids.items():
        if count < sample.rows:
            notes.append(f"{path}: {name}: {count} sampled row(s) have no {name}")
    if sample.duplicates:
        shown = ", ".join(sample.duplicates[:5])
        problems.append(
            f"{path}: key: {len(sample.duplicates)} of {sample.keys} sampled key(s) come from "
            f"more than one row (e.g. {shown}) — make `key` unique: a join repeats a row per "
            "match (add the joined table's key to `key`, or aggregate)"
        )
    for table in sample.uncovered:
        notes.append(
            f"{path}: source: reads table {table!r}, whose changes move neither the cursor "
            f"nor a related: entry — add related: [{{table: {table}, key: ..., cursor: "
            "updated_at}] or rely on full_every (changes there wait for the next full read)"
        )
    return problems, notes


def _fix(where: str, reason: str) -> str:
    if "whitespace" in reason or "missing or empty" in reason:
        return f"check the {where} column or expression (COALESCE, NULLIF(TRIM(...), ''))"
    return "fix the mapping for it, or the data"


# ---------------------------------------------------------------- tables and cursors


# SQLAlchemy's dialect names -> sqlglot's
_SQLGLOT_DIALECTS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def uncovered_tables(mapping: Mapping, *, dialect: str = "") -> list[str]:
    """Tables a `query:` source or a `sql:` trait reads that neither the stream's
    cursor nor a `related:` entry covers. SQL the parser cannot read is skipped
    (this is advice, never a reason to refuse a mapping); a related query that
    does not parse covers everything, so nothing is named wrongly."""
    import sqlglot  # noqa: PLC0415 - only `validate --check-source` needs the parser
    from sqlglot import exp  # noqa: PLC0415

    read_sql = _SQLGLOT_DIALECTS.get(dialect, dialect or None)

    def parse_one(sql: str) -> exp.Expr | None:
        try:
            return sqlglot.parse_one(sql, read=read_sql)
        except sqlglot.errors.SqlglotError:
            return None

    read: set[str] = set()
    covered: set[str] = set()
    if mapping.source.query is not None:
        tree = parse_one(mapping.source.query)
        if tree is None:
            return []
        aliases = {t.alias_or_name: t.name for t in tree.find_all(exp.Table)}
        read |= set(aliases.values())
        for projection in getattr(tree, "expressions", []):
            if projection.alias_or_name == mapping.cursor:
                covered |= {aliases.get(c.table, c.table) for c in projection.find_all(exp.Column)}
                if len(aliases) == 1:
                    covered |= set(aliases.values())
    elif mapping.source.table is not None:
        covered.add(mapping.source.table)
    for trait in mapping.traits:
        expression = parse_one(str(trait.value)) if trait.kind == "sql" else None
        if expression is not None:
            read |= {t.name for t in expression.find_all(exp.Table)}
    for related in mapping.related:
        if related.source.table is not None:
            covered.add(related.source.table)
        elif related.source.query is not None:
            tree = parse_one(related.source.query)
            if tree is None:
                return []
            covered |= {t.name for t in tree.find_all(exp.Table)}
    return sorted(read - covered - {""})
