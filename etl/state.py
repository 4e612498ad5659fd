"""The state store: watermarks, last-sent payloads, rejects, run history, the lock.

SQLAlchemy Core on SQLite (default, a file with owner-only permissions) or
PostgreSQL. Every write is one transaction, so a crash at any instant leaves
a state from which the next run delivers everything (SPEC §7):

* a record's hash/payload is written only after its batch was acknowledged;
* a stream's watermark only after the whole stream was delivered.

Opened with `readonly=True` (for `etl diff`) it never writes, never creates a
file or a table, and a missing store reads as empty.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from etl.diff import LastSent
from etl.errors import LockedError, StateError, UsageError
from etl.extract import Watermark
from etl.model import Shard

# 1: first release. 2: etl_records.source_hash (row digests that skip transform).
SCHEMA_VERSION = 2
UTC = dt.UTC

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


class Sent(NamedTuple):
    """One acknowledged record, as the state remembers it."""

    key: str
    hash: str
    payload: bytes
    event_id: str
    source_hash: str | None = None  # diff.row_fingerprint() of the row it came from


class Rejected(NamedTuple):
    """One record the API refused, kept to be retried by later runs."""

    key: str
    key_values: list[Any]
    event_id: str
    message: str


@dataclass(frozen=True)
class StreamState:
    """What the store knows of one stream."""

    stream: str
    watermark: Watermark | None
    fingerprint: str | None
    checkpoint: list[Any] | None
    updated_at: dt.datetime | None


def encode_watermark(value: Watermark) -> tuple[str, str]:
    """A watermark as (text, kind), lossless: microseconds and offset kept."""
    if isinstance(value, int):
        return str(value), "integer"
    return value.isoformat(timespec="microseconds"), "datetime"


def decode_watermark(text: str | None, kind: str | None) -> Watermark | None:
    if text is None:
        return None
    return int(text) if kind == "integer" else dt.datetime.fromisoformat(text)


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; everything we write is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class StateStore:
    """One state database. A class for its connection pool and lock handle; the
    data it hands out is plain."""

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        self.url = url
        self.readonly = readonly
        self._engine: Engine | None = None
        self._lock_conn: Connection | None = None
        self._lock_file: int | None = None
        self._lock_key = _LOCK_KEY
        try:
            self._engine = self._open(url)
        except sa.exc.DBAPIError as exc:
            raise StateError(
                f"state store {_safe_url(url)}: cannot open it: {_first_line(exc.orig)} "
                "— check --state / ETL_STATE_URL, or move a corrupted file aside"
            ) from None
        except OSError as exc:  # creating the file: a parent that is a file, no permission
            raise StateError(
                f"state store {_safe_url(url)}: cannot create the file ({exc.strerror}: "
                f"{exc.filename}) — point --state / ETL_STATE_URL at a writable directory"
            ) from None
        except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a bad port
            raise UsageError(
                f"--state: {exc} — use sqlite:///PATH or postgresql+psycopg://user@host/db"
            ) from None

    # ------------------------------------------------------------ opening

    def _open(self, url: str) -> Engine | None:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database
            if not path or path == ":memory:":
                raise StateError(f"state store {url}: needs a file — e.g. sqlite:///etl-state.db")
            if self.readonly:
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
                f"state store {_safe_url(url)}: unsupported database "
                f"{parsed.get_backend_name()!r} — use sqlite:///PATH or postgresql+psycopg://..."
            )
        try:
            self._check_schema(engine)
        except _EmptyStore:
            engine.dispose()
            return None
        return engine

    def _check_schema(self, engine: Engine) -> None:
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
                    f"state store {_safe_url(self.url)}: {foreign} — point --state / "
                    "ETL_STATE_URL at a database (or file) of its own"
                )
            if not has_meta and self.readonly:
                raise _EmptyStore
            if version is not None and int(version) > SCHEMA_VERSION:
                raise StateError(
                    f"state store {_safe_url(self.url)}: written by a newer etl (schema "
                    f"{version}, this etl knows {SCHEMA_VERSION}) — upgrade etl, or point "
                    "--state at a fresh store"
                )
            if self.readonly and version is not None:
                raise StateError(
                    f"state store {_safe_url(self.url)}: written by an older etl (schema "
                    f"{version}) and a dry run does not write — run `etl sync` once to "
                    "upgrade it in place"
                )
        if not self.readonly:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # two first runs at once: one creates the tables, the other waits
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_KEY})
                metadata.create_all(conn)
                _migrate(conn)
                _upsert(
                    conn,
                    meta_table,
                    [{"name": "schema_version", "value": str(SCHEMA_VERSION)}],
                    ["name"],
                )

    def close(self) -> None:
        self.release()
        if self._engine is not None:
            self._engine.dispose()

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        if self._engine is None:
            raise StateError("state store is read-only and empty")
        try:
            with self._engine.begin() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            raise StateError(
                f"state store {_safe_url(self.url)}: {_first_line(exc.orig)} — check the "
                "disk, permissions and that nothing else rewrites the store"
            ) from None

    # ------------------------------------------------------------ the lock

    def acquire(self, command: str, *, shard: Shard | None = None) -> None:
        """Take the one-run-at-a-time lock (one per shard), or raise LockedError
        naming the holder."""
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command + (f" --shard {shard.label}" if shard else ""),
            "since": _now().isoformat(timespec="seconds"),
        }
        if self._engine is None:
            raise StateError("a read-only state store cannot be locked")
        if self._engine.dialect.name == "sqlite":
            self._acquire_file(holder, shard)
        else:
            self._acquire_advisory(holder, shard)
        self._close_abandoned_runs(shard)

    def _close_abandoned_runs(self, shard: Shard | None) -> None:
        """With the lock held no other run is alive: a run still `running` died
        without finishing (kill -9, OOM, a lost host). Say so, or `etl runs` shows
        it running forever."""
        with self._begin() as conn:
            conn.execute(
                sa.update(runs_table)
                .where(
                    runs_table.c.status == "running",
                    runs_table.c.shard == shard.label if shard else runs_table.c.shard.is_(None),
                )
                .values(
                    status="failed",
                    error="abandoned: the process ended without finishing (killed or crashed);"
                    " the next run carried on from the state it left",
                )
            )

    def _acquire_file(self, holder: dict[str, Any], shard: Shard | None) -> None:
        suffix = f".{shard.index}-of-{shard.count}.lock" if shard else ".lock"
        path = f"{self._engine.url.database}{suffix}"  # type: ignore[union-attr]
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise LockedError(_locked_message(current, path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_file = fd

    def _acquire_advisory(self, holder: dict[str, Any], shard: Shard | None) -> None:
        assert self._engine is not None  # noqa: S101 - checked by acquire()
        conn = self._engine.connect()
        # A session-level advisory lock dies with the connection, so with the process.
        self._lock_key = _LOCK_KEY if shard is None else _shard_lock_key(shard)
        got = conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self._lock_key}
        ).scalar()
        conn.commit()
        if not got:
            current = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == _holder_name(shard))
            ).scalar()
            conn.close()
            raise LockedError(_locked_message(current or "", "PostgreSQL advisory lock"))
        with self._begin() as tx:
            row = {"name": _holder_name(shard), "value": json.dumps(holder)}
            _upsert(tx, meta_table, [row], ["name"])
        self._lock_conn = conn

    def release(self) -> None:
        if self._lock_file is not None:
            os.ftruncate(self._lock_file, 0)
            os.close(self._lock_file)  # closing drops the flock
            self._lock_file = None
        if self._lock_conn is not None:
            # A pooled connection outlives close(), and a session lock outlives
            # a rollback: unlock explicitly (the lock still dies with a crash).
            with contextlib.suppress(sa.exc.DBAPIError):
                self._lock_conn.execute(
                    sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self._lock_key}
                )
                self._lock_conn.commit()
            self._lock_conn.close()
            self._lock_conn = None

    # ------------------------------------------------------------ streams

    def stream(self, name: str) -> StreamState | None:
        if self._engine is None:
            return None
        with self._begin() as conn:
            row = conn.execute(
                sa.select(streams_table).where(streams_table.c.stream == name)
            ).one_or_none()
        if row is None:
            return None
        return StreamState(
            stream=row.stream,
            watermark=decode_watermark(row.watermark, row.watermark_kind),
            fingerprint=row.fingerprint,
            checkpoint=orjson.loads(row.checkpoint) if row.checkpoint else None,
            updated_at=_aware(row.updated_at),
        )

    def save_watermark(self, stream: str, watermark: Watermark | None, fingerprint: str) -> None:
        """Advance a stream (after all of it was delivered) and clear its checkpoint."""
        text, kind = encode_watermark(watermark) if watermark is not None else (None, None)
        with self._begin() as conn:
            _upsert(
                conn,
                streams_table,
                [
                    {
                        "stream": stream,
                        "watermark": text,
                        "watermark_kind": kind,
                        "fingerprint": fingerprint,
                        "checkpoint": None,
                        "updated_at": _now(),
                    }
                ],
                ["stream"],
            )

    def save_checkpoint(self, stream: str, checkpoint: Sequence[Any] | None) -> None:
        """Remember the last key a backfill had delivered everything up to."""
        value = orjson.dumps(list(checkpoint), default=str).decode() if checkpoint else None
        with self._begin() as conn:
            exists = conn.execute(
                sa.update(streams_table)
                .where(streams_table.c.stream == stream)
                .values(checkpoint=value, updated_at=_now())
            ).rowcount
            if not exists:
                conn.execute(
                    sa.insert(streams_table).values(
                        stream=stream, checkpoint=value, updated_at=_now()
                    )
                )

    def reset(self, stream: str) -> int:
        """Forget everything about a stream; returns how many records it forgot."""
        with self._begin() as conn:
            forgotten = conn.execute(
                sa.delete(records_table).where(records_table.c.stream == stream)
            ).rowcount
            conn.execute(sa.delete(rejects_table).where(rejects_table.c.stream == stream))
            conn.execute(sa.delete(streams_table).where(streams_table.c.stream == stream))
        return int(forgotten)

    # ------------------------------------------------------------ records

    def last_sent(
        self, stream: str, keys: Sequence[str], *, with_payload: bool = False
    ) -> dict[str, LastSent]:
        """What was last sent for these keys: one query per page of keys.

        Driver-level SQL: this runs once per page on the hot path, and building
        a 5,000-item IN with SQLAlchemy costs more than the query itself.
        """
        if self._engine is None or not keys:
            return {}
        columns = "key, hash, source_hash, payload" if with_payload else "key, hash, source_hash"
        with self._begin() as conn:
            if conn.dialect.name == "postgresql":
                result = conn.exec_driver_sql(
                    f"SELECT {columns} FROM etl_records WHERE stream = %s AND key = ANY(%s)",
                    (stream, list(keys)),
                )
            else:
                marks = ",".join("?" * len(keys))
                result = conn.exec_driver_sql(
                    f"SELECT {columns} FROM etl_records WHERE stream = ? AND key IN ({marks})",
                    (stream, *keys),
                )
            rows = result.cursor.fetchall()  # the driver's tuples, no Row objects
            result.close()
        if with_payload:
            return {r[0]: LastSent(r[1], r[3].encode(), r[2]) for r in rows}
        return {r[0]: LastSent(r[1], None, r[2]) for r in rows}

    def sent_keys(self, stream: str) -> Iterator[str]:
        """Every key ever acknowledged for a stream (for `diff --full`'s "gone")."""
        if self._engine is None:
            return
        with self._begin() as conn:
            result = conn.execution_options(yield_per=10_000).execute(
                sa.select(records_table.c.key).where(records_table.c.stream == stream)
            )
            for row in result:
                yield row[0]

    def commit_batch(
        self,
        stream: str,
        sent: Sequence[Sent],
        rejected: Sequence[Rejected] = (),
        *,
        clear_rejects: bool = True,
    ) -> None:
        """Record one acknowledged batch in one transaction.

        `clear_rejects=False` says no reject of this stream can be among `sent`
        (none was pending when the stream started), which saves a DELETE a batch.
        """
        now = _now()
        with self._begin() as conn:
            if sent:
                _upsert_records(conn, stream, sent, now)
                if clear_rejects:
                    conn.execute(
                        sa.delete(rejects_table).where(
                            rejects_table.c.stream == stream,
                            rejects_table.c.key.in_([s.key for s in sent]),
                        )
                    )
            for r in rejected:
                self._reject(conn, stream, r, now)

    def forget_rejects(self, stream: str, keys: Sequence[str]) -> None:
        """Drop pending rejects that no longer need retrying, in one transaction."""
        with self._begin() as conn:
            for start in range(0, len(keys), 500):
                conn.execute(
                    sa.delete(rejects_table).where(
                        rejects_table.c.stream == stream,
                        rejects_table.c.key.in_(keys[start : start + 500]),
                    )
                )

    def _reject(self, conn: Connection, stream: str, r: Rejected, now: dt.datetime) -> None:
        updated = conn.execute(
            sa.update(rejects_table)
            .where(rejects_table.c.stream == stream, rejects_table.c.key == r.key)
            .values(
                event_id=r.event_id,
                message=r.message,
                last_seen=now,
                attempts=rejects_table.c.attempts + 1,
            )
        ).rowcount
        if not updated:
            conn.execute(
                sa.insert(rejects_table).values(
                    stream=stream,
                    key=r.key,
                    key_values=orjson.dumps(r.key_values, default=str).decode(),
                    event_id=r.event_id,
                    message=r.message,
                    first_seen=now,
                    last_seen=now,
                    attempts=1,
                )
            )

    def rejected(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Pending rejects (all streams, or one), oldest first."""
        if self._engine is None:
            return []
        query = sa.select(rejects_table).order_by(rejects_table.c.first_seen)
        if stream is not None:
            query = query.where(rejects_table.c.stream == stream)
        with self._begin() as conn:
            return [_plain_row(r) for r in conn.execute(query)]

    # ------------------------------------------------------------ runs

    def start_run(self, command: str, mode: str, *, shard: Shard | None = None) -> int | None:
        if self.readonly:
            return None
        with self._begin() as conn:
            result = conn.execute(
                sa.insert(runs_table).values(
                    command=command,
                    mode=mode,
                    started_at=_now(),
                    status="running",
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    shard=shard.label if shard else None,
                )
            )
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def finish_run(
        self,
        run_id: int | None,
        *,
        status: str,
        streams: list[dict[str, Any]],
        error: str | None,
    ) -> None:
        if run_id is None or self.readonly:
            return
        with self._begin() as conn:
            conn.execute(
                sa.update(runs_table)
                .where(runs_table.c.id == run_id)
                .values(
                    finished_at=_now(),
                    status=status,
                    streams=orjson.dumps(streams, default=str).decode(),
                    error=error,
                )
            )

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest runs, newest first."""
        if self._engine is None:
            return []
        with self._begin() as conn:
            rows = conn.execute(
                sa.select(runs_table).order_by(runs_table.c.id.desc()).limit(limit)
            ).all()
        out = []
        for row in rows:
            item = _plain_row(row)
            item["started_at"] = _aware(item["started_at"])
            item["finished_at"] = _aware(item["finished_at"])
            item["streams"] = orjson.loads(item["streams"]) if item["streams"] else []
            out.append(item)
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per stream: watermark, records sent, pending rejects, checkpoint."""
        if self._engine is None:
            return []
        with self._begin() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    sa.select(records_table.c.stream, sa.func.count()).group_by(
                        records_table.c.stream
                    )
                ).all()
            )
            rejects: dict[str, int] = dict(
                conn.execute(
                    sa.select(rejects_table.c.stream, sa.func.count()).group_by(
                        rejects_table.c.stream
                    )
                ).all()
            )
            streams = conn.execute(sa.select(streams_table).order_by(streams_table.c.stream)).all()
        names = sorted({s.stream for s in streams} | counts.keys() | rejects.keys())
        by_name = {s.stream: s for s in streams}
        out = []
        for name in names:
            row = by_name.get(name)
            out.append(
                {
                    "stream": name,
                    "watermark": row.watermark if row else None,
                    "records": counts.get(name, 0),
                    "rejected": rejects.get(name, 0),
                    "checkpoint": row.checkpoint if row else None,
                    "updated_at": _aware(row.updated_at) if row else None,
                }
            )
        return out


# Any constant works; this one spells "ETL" so it is recognisable in pg_locks.
_LOCK_KEY = 0x45544C
_SCHEMA_KEY = _LOCK_KEY + 1


def _shard_lock_key(shard: Shard) -> int:
    # one lock per (index, count), clear of the two keys above
    return (_LOCK_KEY << 32) + shard.count * 100_000 + shard.index


def _holder_name(shard: Shard | None) -> str:
    return f"lock_holder {shard.label}" if shard else "lock_holder"


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


class _EmptyStore(Exception):
    """A read-only open of a store that has no tables yet."""


def _locked_message(holder_json: str, where: str) -> str:
    try:
        holder = json.loads(holder_json)
        who = (
            f"pid {holder['pid']} on {holder['host']} ({holder['command']}, "
            f"since {holder['since']})"
        )
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return (
        f"another run holds the lock ({where}): {who} — wait for it to finish, or stop it; "
        "the lock is released when that process exits"
    )


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


_UPSERT_RECORDS = (
    "INSERT INTO etl_records (stream, key, hash, source_hash, payload, event_id, sent_at) "
    "VALUES ({marks}) ON CONFLICT (stream, key) DO UPDATE SET hash = excluded.hash, "
    "source_hash = excluded.source_hash, payload = excluded.payload, "
    "event_id = excluded.event_id, sent_at = excluded.sent_at"
)


# Columns added after schema 1: (table, column) -> their SQL type.
_MIGRATED = {
    ("etl_records", "source_hash"): "VARCHAR(32)",
    ("etl_runs", "shard"): "VARCHAR(32)",
}


def _migrate(conn: Connection) -> None:
    """Bring a store written by an older etl up to SCHEMA_VERSION, in place."""
    inspector = sa.inspect(conn)
    for (table, column), sql_type in _MIGRATED.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


def _upsert_records(conn: Connection, stream: str, sent: Sequence[Sent], now: dt.datetime) -> None:
    """The per-batch upsert, at driver level: SQLAlchemy's per-row parameter
    processing cost more than SQLite's insert itself."""
    if conn.dialect.name == "postgresql":
        sql = _UPSERT_RECORDS.format(marks=", ".join(["%s"] * 7))
        stamp: Any = now
    else:
        sql = _UPSERT_RECORDS.format(marks=", ".join(["?"] * 7))
        # the text form SQLAlchemy's SQLite DateTime reads back
        stamp = now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    conn.exec_driver_sql(
        sql,
        [
            (stream, s.key, s.hash, s.source_hash, s.payload.decode(), s.event_id, stamp)
            for s in sent
        ],
    )


def _upsert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE, in the dialect's own words, executemany."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table)
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update), rows)


def _plain_row(row: sa.Row[Any]) -> dict[str, Any]:
    """A row as a dict keyed by plain `str`: SQLAlchemy's `quoted_name` keys are a
    str subclass that orjson refuses (`etl runs --format json` would crash)."""
    return {str(name): value for name, value in row._mapping.items()}


def _safe_url(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid URL>"


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error is not None and str(error) else "error"
