"""Opening a state database: its engine, and its tables at `SCHEMA_VERSION`.

`open_engine()` makes a SQLite store a private file in WAL mode (or connects
to PostgreSQL), then `check_schema()` refuses a database whose `etl_*` tables
are another tool's or a newer etl's, creates the missing tables and migrates
an older etl's store in place.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from etl.dburl import with_driver
from etl.errors import StateError

log = structlog.get_logger("etl")

# 1: first release. 2: etl_records.source_hash (row digests that skip transform).
# 3: shards own keys by MD5 (model.shard_bucket) instead of BLAKE2b: shard states
#    restart from their stream's lowest shard watermark (_restart_moved_shards).
# 4: etl_track and etl_track_ledger (track streams, SPEC §10).
# 5: full reads and related tables (SPEC §9): etl_streams.full_read_at/first_run_at,
#    etl_related watermarks, etl_rejects.kind ("invalid" records are remembered too).
# 6: etl_streams.checkpoint_since(_kind): the safe horizon a backfill checkpoint's pages
#    were read under, so a resumed backfill never saves a later watermark than that.
SCHEMA_VERSION = 6

metadata = sa.MetaData()

meta_table = sa.Table(
    "etl_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
streams_table = sa.Table(
    "etl_streams",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("watermark", sa.Text),  # ISO-8601 with offset and microseconds, or an integer
    sa.Column("watermark_kind", sa.String(16)),  # "datetime" | "integer"
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("checkpoint", sa.Text),  # backfill: JSON list of the last acknowledged key
    # ... and the earliest safe horizon the pages up to it were read under (as watermark)
    sa.Column("checkpoint_since", sa.Text),
    sa.Column("checkpoint_since_kind", sa.String(16)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    # SPEC §9: when the last full read ended, and when the stream first ran (the
    # full_every clock starts there until a full read happened)
    sa.Column("full_read_at", sa.DateTime(timezone=True)),
    sa.Column("first_run_at", sa.DateTime(timezone=True)),
)
related_table = sa.Table(
    "etl_related",
    metadata,
    # the stream's state name (per shard) and the related entry's label (Related.label)
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("related", sa.String(300), primary_key=True),
    sa.Column("watermark", sa.Text),
    sa.Column("watermark_kind", sa.String(16)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
records_table = sa.Table(
    "etl_records",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("hash", sa.String(32), nullable=False),
    sa.Column("source_hash", sa.String(32)),  # digest of the source row, to skip transform
    sa.Column("payload", sa.Text, nullable=False),  # canonical JSON last sent
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    # SQLite: cluster rows on (stream, key) instead of a rowid table plus a PK
    # index, so each upsert writes one B-tree, not two.
    sqlite_with_rowid=False,
)
rejects_table = sa.Table(
    "etl_rejects",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("key_values", sa.Text, nullable=False),  # JSON list, to re-read the row
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    # "rejected" (the API refused it; NULL in stores from before schema 5) or
    # "invalid" (never sendable as read); both are re-read by key every run
    sa.Column("kind", sa.String(16)),
)
# Track streams (SPEC §10): per stream (and shard) where incremental reads start
# (`start`, the safe horizon of its first run), the floor they never go below,
# and its backfill; positions are `ledger_position()` text.
track_table = sa.Table(
    "etl_track",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),  # "name" or "name#I/N"
    sa.Column("start", sa.Text),  # history (backfill) is below it, syncs at or above
    sa.Column("floor", sa.Text),  # incremental reads never go below it
    sa.Column("backfill_since", sa.Text),  # the --since as given ("" for all history)
    sa.Column("backfill_lower", sa.Text),  # ... resolved when that backfill started
    sa.Column("backfill_checkpoint", sa.Text),  # JSON [cursor, *key] acknowledged up to
    sa.Column("backfill_done_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
# The keys of a track stream sent and still inside its re-read window: "sent
# already?" is a look-up here. Pruned below the floor, each shard (`owner`) its own.
ledger_table = sa.Table(
    "etl_track_ledger",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("owner", sa.String(240), nullable=False),  # the state name that sent it
    sa.Column("position", sa.Text, nullable=False),  # ledger_position() of its cursor
    sa.Column("hash", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # canonical JSON sent
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("etl_track_ledger_prune", "stream", "owner", "position"),
    sqlite_with_rowid=False,
)
runs_table = sa.Table(
    "etl_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("command", sa.String(32), nullable=False),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String(16), nullable=False),  # running | ok | partial | failed
    sa.Column("streams", sa.Text),  # JSON: per-stream counts, invalid and rejected keys
    sa.Column("error", sa.Text),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("shard", sa.String(32)),  # "I/N" for a sharded worker, else NULL
)

# The advisory lock keys of a PostgreSQL store: the run lock (lock.py) and the
# schema set-up (check_schema). Any constant works; this one spells "ETL" so it
# is recognisable in pg_locks.
LOCK_KEY = 0x45544C
SCHEMA_KEY = LOCK_KEY + 1


def open_engine(url: str, *, readonly: bool) -> Engine | None:
    """An engine on the state database at `url`, its tables checked, created or
    migrated; None for a read-only open of a store that does not exist yet."""
    url = with_driver(url)  # postgres:// -> postgresql+psycopg:// (etl.dburl)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            raise StateError(f"state store {url}: needs a file — e.g. sqlite:///etl-state.db")
        if readonly:
            if not Path(path).exists():
                return None
            engine = sa.create_engine(
                f"sqlite:///file:{path}?mode=ro&uri=true", poolclass=sa.pool.NullPool
            )
        else:
            _create_private(Path(path))
            # A pooled connection: closing the last connection of a WAL
            # database checkpoints it, which would cost a checkpoint a batch.
            engine = sa.create_engine(url)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(url, pool_pre_ping=True)
    else:
        raise StateError(
            f"state store {safe_url(url)}: unsupported database "
            f"{parsed.get_backend_name()!r} — use sqlite:///PATH or postgresql+psycopg://..."
        )
    try:
        check_schema(engine, shown=safe_url(url), readonly=readonly)
    except EmptyStore:
        engine.dispose()
        return None
    return engine


def check_schema(engine: Engine, *, shown: str, readonly: bool) -> None:
    """Check, create or migrate the tables of the store `shown` (its URL, password
    hidden); raise EmptyStore for a read-only open of a store without tables."""
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        has_meta = inspector.has_table("etl_meta")
        version = None
        if has_meta:
            version = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")
            ).scalar()
        if version is not None and int(version) == SCHEMA_VERSION:
            return  # ours and current: the common case costs two queries
        foreign = _foreign_table(inspector)
        if foreign:
            raise StateError(
                f"state store {shown}: {foreign} — point --state / "
                "ETL_STATE_URL at a database (or file) of its own"
            )
        if not has_meta and readonly:
            raise EmptyStore
        if version is not None and int(version) > SCHEMA_VERSION:
            raise StateError(
                f"state store {shown}: written by a newer etl (schema "
                f"{version}, this etl knows {SCHEMA_VERSION}) — upgrade etl, or point "
                "--state at a fresh store"
            )
        if readonly and version is not None:
            raise StateError(
                f"state store {shown}: written by an older etl (schema "
                f"{version}) and a dry run does not write — run `etl sync` once to "
                "upgrade it in place"
            )
    if not readonly:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # two first runs at once: one creates the tables, the other waits
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_KEY})
            metadata.create_all(conn)
            _migrate(conn, from_version=None if version is None else int(version))
            upsert(
                conn,
                meta_table,
                [{"name": "schema_version", "value": str(SCHEMA_VERSION)}],
                ["name"],
            )


class EmptyStore(Exception):
    """A read-only open of a store that has no tables yet."""


def _foreign_table(inspector: sa.Inspector) -> str | None:
    """Why a table named like one of ours is not ours (another tool's `etl_runs`),
    or None. Checked before anything is written, so nothing is sent either."""
    existing = set(inspector.get_table_names())
    for table in metadata.sorted_tables:
        if table.name in existing:
            have = {column["name"] for column in inspector.get_columns(table.name)}
            missing = [
                column.name
                for column in table.columns
                if column.name not in have and (table.name, column.name) not in _MIGRATED
            ]
            if missing:
                return f"table {table.name} is not etl's (no column {', '.join(missing)})"
    return None


# Columns added after schema 1: (table, column) -> their SQL type.
_MIGRATED = {
    ("etl_records", "source_hash"): "VARCHAR(32)",
    ("etl_runs", "shard"): "VARCHAR(32)",
    ("etl_streams", "full_read_at"): "TIMESTAMP WITH TIME ZONE",
    ("etl_streams", "first_run_at"): "TIMESTAMP WITH TIME ZONE",
    ("etl_rejects", "kind"): "VARCHAR(16)",
    ("etl_streams", "checkpoint_since"): "TEXT",
    ("etl_streams", "checkpoint_since_kind"): "VARCHAR(16)",
}


def _migrate(conn: Connection, *, from_version: int | None) -> None:
    """Bring a store written by an older etl up to SCHEMA_VERSION, in place
    (`from_version` None: a new store, or one from before etl_meta)."""
    inspector = sa.inspect(conn)
    for (table, column), sql_type in _MIGRATED.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
    if from_version is not None and from_version < 3:
        _restart_moved_shards(conn)


def _restart_moved_shards(conn: Connection) -> None:
    """Schema 3 changed which shard owns a key (BLAKE2b -> MD5 of the key text).

    A key that moved from old shard j to new shard i was delivered up to j's
    watermark; if i's watermark is ahead of j's, i would never read that key's
    changes made in between. So every shard state `STREAM#I/N` restarts from
    the lowest watermark of the shards `STREAM#*/N` (none, if one never
    finished: a first read of every row with a cursor), and its backfill
    checkpoint is dropped (it was a position among the old keys). Re-read rows
    that were delivered are unchanged by the diff: this costs reads, not sends.
    """
    groups: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    query = sa.select(
        streams_table.c.stream, streams_table.c.watermark, streams_table.c.watermark_kind
    ).where(streams_table.c.stream.like("%#%/%"))
    for name, text, kind in conn.execute(query):
        stream, _, label = name.rpartition("#")
        _, _, count = label.partition("/")
        value = None if text is None else (int(text) if kind == "integer" else _aware(text))
        groups.setdefault((stream, count), []).append((name, (text, kind, value)))
    for (stream, _), members in groups.items():
        values = [v for _, v in members]
        lowest = (
            (None, None, None)
            if any(v[2] is None for v in values)
            else min(values, key=lambda v: v[2])
        )
        conn.execute(
            streams_table.update()
            .where(streams_table.c.stream.in_([name for name, _ in members]))
            .values(watermark=lowest[0], watermark_kind=lowest[1], checkpoint=None)
        )
        log.warning(
            "state.shards_restarted",
            stream=stream,
            shards=sorted(name for name, _ in members),
            watermark=lowest[0],
            reason="shard ownership changed (MD5 of the key text)",
        )


def _aware(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def upsert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE, in the dialect's own words, executemany."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table)
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update), rows)


def _create_private(path: Path) -> None:
    """Create the SQLite file owner-only (it holds PII) before SQLite does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL: readers never block the writer; NORMAL sync is durable across a
    # process crash, which is what at-least-once delivery needs.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Checkpoint every ~40 MB of WAL rather than every 4 MB: a big backfill
    # otherwise copies pages back (and syncs) every other batch.
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def safe_url(url: str) -> str:
    """A database URL fit for messages: the password hidden."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid URL>"
