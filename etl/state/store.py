"""The state store: watermarks, last-sent payloads, rejects, run history, the lock.

SQLAlchemy Core on SQLite (default, a file with owner-only permissions) or
PostgreSQL. Every write is one transaction, so a crash at any instant leaves
a state from which the next run delivers everything (SPEC §7):

* a record's hash/payload is written only after its batch was acknowledged;
* a stream's watermark only after the whole stream was delivered.

Opened with `readonly=True` (for `etl diff`) it never writes, never creates a
file or a table, and a missing store reads as empty. Opening and the tables
are `schema`'s, the run lock's mechanics `lock`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.errors import StateError, UsageError
from etl.model import Shard, Watermark
from etl.redact import first_line
from etl.state.lock import RunLock, WriteTurns, lock_lost_message
from etl.state.schema import (
    ledger_table,
    open_engine,
    records_table,
    rejects_table,
    related_table,
    runs_table,
    safe_url,
    streams_table,
    track_table,
    upsert,
)
from etl.state.wal import Checkpointer

UTC = dt.UTC


class LastSent(NamedTuple):
    """What the state store remembers of a record: its payload hash and, when
    asked for (field-level diffs), the payload itself as canonical JSON."""

    hash: str
    payload: bytes | None = None
    # row_fingerprint() of the source row it was made from: equal => unchanged
    source: str | None = None
    # the event_id it was sent with: the next event of this key chains it (SPEC §2)
    event_id: str = ""


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
    kind: str = "rejected"  # or "invalid": not sendable as read (the message is the reason)


@dataclass(frozen=True, slots=True)
class PendingReject:
    """A record the API refused, waiting to be retried: one row of the rejects
    table, decoded (`key_values` are the key's column values, to re-read the row)."""

    stream: str
    key: str
    key_values: tuple[Any, ...]
    event_id: str
    message: str
    attempts: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    kind: str = "rejected"  # or "invalid"


class LedgerEntry(NamedTuple):
    """One acknowledged track event: its key, the cursor position it was read at
    (`ledger_position()`), the payload hash and canonical payload, its event id."""

    key: str
    position: str
    hash: str
    payload: bytes
    event_id: str


@dataclass(frozen=True)
class TrackState:
    """What the store knows of one track stream (or shard), SPEC §10: `start`
    and `floor` as watermarks, its backfill's `--since`, lower bound, checkpoint
    and when it finished."""

    stream: str
    start: Watermark | None
    floor: Watermark | None
    backfill_since: str | None
    backfill_lower: Watermark | None
    backfill_checkpoint: list[Any] | None
    backfill_done_at: dt.datetime | None


def ledger_position(value: Watermark) -> str:
    """A cursor value as text that sorts like the values: integers offset and
    zero-padded, times in UTC with microseconds ("i..." and "t..." never mix in
    one stream, whose cursor is one kind)."""
    if isinstance(value, int):
        return f"i{value + 2**63:020d}"
    return "t" + value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _encode(value: Watermark | None) -> str | None:
    if value is None:
        return None
    text, kind = encode_watermark(value)
    return f"{kind}:{text}"


def _decode(text: str | None) -> Watermark | None:
    if not text:
        return None
    kind, _, value = text.partition(":")
    return decode_watermark(value, kind)


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the store knows of one stream."""

    stream: str
    watermark: Watermark | None
    fingerprint: str | None
    checkpoint: list[Any] | None
    updated_at: dt.datetime | None
    full_read_at: dt.datetime | None = None  # when the last full read ended (SPEC §9)
    # the safe horizon the pages up to `checkpoint` were read under (the earliest)
    checkpoint_since: Watermark | None = None
    first_run_at: dt.datetime | None = None
    related: dict[str, Watermark] = field(default_factory=dict)  # Related.label -> watermark

    @property
    def full_clock(self) -> dt.datetime | None:
        """Since when the `full_every` clock runs: the last full read, else the first run."""
        return self.full_read_at or self.first_run_at


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """One stream in `etl state show`: its watermark, how many records were sent,
    how many rejects are pending, a backfill's checkpoint."""

    stream: str
    watermark: Watermark | None
    records: int
    rejected: int
    checkpoint: list[Any] | None
    updated_at: dt.datetime | None
    invalid: int = 0  # invalid records remembered, re-read by every run (SPEC §4)
    last_full_read: dt.datetime | None = None  # SPEC §9


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run in the run history (`etl runs`); `streams` holds the per-stream
    counts and listed records it finished with."""

    id: int
    command: str
    mode: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str  # running | ok | partial | failed
    streams: list[dict[str, Any]]
    error: str | None
    host: str | None
    pid: int | None
    shard: str | None


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


@overload
def _aware(value: dt.datetime) -> dt.datetime: ...
@overload
def _aware(value: dt.datetime | None) -> dt.datetime | None: ...
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
        self._lock = RunLock()
        self._write_mutex = threading.Lock()  # the lock's session: one write at a time
        try:
            self._engine = open_engine(url, readonly=readonly)
        except sa.exc.DBAPIError as exc:
            raise StateError(
                f"state store {safe_url(url)}: cannot open it: {first_line(exc.orig)} "
                "— check --state / ETL_STATE_URL, or move a corrupted file aside"
            ) from None
        except OSError as exc:  # creating the file: a parent that is a file, no permission
            raise StateError(
                f"state store {safe_url(url)}: cannot create the file ({exc.strerror}: "
                f"{exc.filename}) — point --state / ETL_STATE_URL at a writable directory"
            ) from None
        except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a bad port
            raise UsageError(
                f"--state: {exc} — use sqlite:///PATH or postgresql+psycopg://user@host/db"
            ) from None
        # a SQLite store copies its WAL back on a thread of its own (etl.state.wal),
        # and its writers (worker processes too) take turns by a file lock
        engine = self._engine
        self._turns: WriteTurns | None = None
        self._checkpointer: Checkpointer | None = None
        if engine is not None and not readonly and engine.dialect.name == "sqlite":
            self._turns = WriteTurns(str(engine.url.database))
            self._checkpointer = Checkpointer(engine)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.release()
        if self._turns is not None:
            self._turns.close()
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
            if exc.connection_invalidated:
                raise StateError(
                    f"state store {safe_url(self.url)}: the connection was lost: "
                    f"{first_line(exc.orig)} — each acknowledged batch is recorded in one "
                    "transaction, so nothing is half-written; run the same command again"
                ) from None
            raise StateError(
                f"state store {safe_url(self.url)}: {first_line(exc.orig)} — check the "
                "disk, permissions and that nothing else rewrites the store"
            ) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction. While a PostgreSQL lock is held, on the lock's own
        session (one write at a time): a run that lost its lock cannot write."""
        if not self._lock.on_session:
            with (
                self._turns.turn() if self._turns else contextlib.nullcontext(),
                self._begin() as conn,
            ):
                yield conn
            return
        with self._write_mutex:
            conn = self._lock.session()
            try:
                with conn.begin():
                    yield conn
            except sa.exc.DBAPIError as exc:
                raise StateError(
                    f"state store {safe_url(self.url)}: " + lock_lost_message(first_line(exc.orig))
                ) from None

    def _written(self) -> None:
        """A batch was committed: a SQLite store's checkpoint thread copies it back."""
        if self._checkpointer is not None:
            self._checkpointer.nudge()

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
            self._lock.acquire_file(self._engine.url.database, holder, shard)
        else:
            try:
                self._lock.acquire_advisory(self._engine, holder, shard, begin=self._begin)
            except sa.exc.DBAPIError as exc:
                raise StateError(
                    f"state store {safe_url(self.url)}: cannot take the run lock: "
                    f"{first_line(exc.orig)} — check the server and --state / ETL_STATE_URL"
                ) from None
        self._close_abandoned_runs(shard)

    def release(self) -> None:
        self._lock.release()

    def check_lock(self) -> None:
        """StateError when a PostgreSQL store's run lock was lost with its session
        (`run.parallel` asks while worker processes write beside it); a SQLite
        store's lock is a file lock this process holds until it ends."""
        if not self._lock.on_session:
            return
        with self._write_mutex:
            try:
                conn = self._lock.session()
                with conn.begin():
                    conn.execute(sa.text("SELECT 1"))
            except sa.exc.DBAPIError as exc:
                raise StateError(
                    f"state store {safe_url(self.url)}: " + lock_lost_message(first_line(exc.orig))
                ) from None

    def _close_abandoned_runs(self, shard: Shard | None) -> None:
        """With the lock held no other run is alive: a run still `running` died
        without finishing (kill -9, OOM, a lost host). Say so, or `etl runs` shows
        it running forever."""
        with self._write() as conn:
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

    # ------------------------------------------------------------ streams

    def stream(self, name: str) -> StreamState | None:
        if self._engine is None:
            return None
        with self._begin() as conn:
            row = conn.execute(
                sa.select(streams_table).where(streams_table.c.stream == name)
            ).one_or_none()
            related = {
                r.related: decode_watermark(r.watermark, r.watermark_kind)
                for r in conn.execute(
                    sa.select(related_table).where(related_table.c.stream == name)
                )
            }
        if row is None:
            return None
        return StreamState(
            stream=row.stream,
            watermark=decode_watermark(row.watermark, row.watermark_kind),
            fingerprint=row.fingerprint,
            checkpoint=orjson.loads(row.checkpoint) if row.checkpoint else None,
            checkpoint_since=decode_watermark(row.checkpoint_since, row.checkpoint_since_kind),
            updated_at=_aware(row.updated_at),
            full_read_at=_aware(row.full_read_at),
            first_run_at=_aware(row.first_run_at),
            related={label: mark for label, mark in related.items() if mark is not None},
        )

    def save_watermark(
        self,
        stream: str,
        watermark: Watermark | None,
        fingerprint: str,
        *,
        related: dict[str, Watermark | None] | None = None,
        full_read: bool = False,
    ) -> None:
        """Advance a stream (after all of it was delivered) and clear its checkpoint
        and its parallel parts' (`run.parallel`), with its related tables' watermarks, in one
        transaction; `full_read` says the run read every row (SPEC §9), which restarts
        the `full_every` clock."""
        text, kind = encode_watermark(watermark) if watermark is not None else (None, None)
        now = _now()
        with self._write() as conn:
            old = conn.execute(
                sa.select(streams_table.c.full_read_at, streams_table.c.first_run_at).where(
                    streams_table.c.stream == stream
                )
            ).one_or_none()
            upsert(
                conn,
                streams_table,
                [
                    {
                        "stream": stream,
                        "watermark": text,
                        "watermark_kind": kind,
                        "fingerprint": fingerprint,
                        "checkpoint": None,
                        "checkpoint_since": None,
                        "checkpoint_since_kind": None,
                        "updated_at": now,
                        "full_read_at": now if full_read else (old.full_read_at if old else None),
                        "first_run_at": (old.first_run_at if old else None) or now,
                    }
                ],
                ["stream"],
            )
            # A parallel backfill's part checkpoints are spent once the stream was read
            # to its end, whoever read it: left, a later backfill would resume from them.
            conn.execute(sa.delete(streams_table).where(_parts_of(stream)))
            if related is not None:
                conn.execute(sa.delete(related_table).where(related_table.c.stream == stream))
                rows = []
                for label, mark in related.items():
                    mark_text, mark_kind = (
                        encode_watermark(mark) if mark is not None else (None, None)
                    )
                    rows.append(
                        {
                            "stream": stream,
                            "related": label,
                            "watermark": mark_text,
                            "watermark_kind": mark_kind,
                            "updated_at": now,
                        }
                    )
                if rows:
                    conn.execute(sa.insert(related_table), rows)

    def save_checkpoint(
        self,
        stream: str,
        checkpoint: Sequence[Any] | None,
        since: Watermark | None = None,
    ) -> None:
        """Remember the last key a backfill had delivered everything up to, and the
        safe horizon `since` its pages were read under (the earliest, over resumes)."""
        value = orjson.dumps(list(checkpoint), default=str).decode() if checkpoint else None
        text, kind = encode_watermark(since) if since is not None else (None, None)
        values = {
            "checkpoint": value,
            "checkpoint_since": text,
            "checkpoint_since_kind": kind,
            "updated_at": _now(),
        }
        with self._write() as conn:
            exists = conn.execute(
                sa.update(streams_table).where(streams_table.c.stream == stream).values(**values)
            ).rowcount
            if not exists:
                conn.execute(sa.insert(streams_table).values(stream=stream, **values))

    def reset(self, stream: str) -> int:
        """Forget everything about a stream; returns how many records it forgot."""
        with self._write() as conn:
            forgotten = conn.execute(
                sa.delete(records_table).where(records_table.c.stream == stream)
            ).rowcount
            conn.execute(sa.delete(rejects_table).where(rejects_table.c.stream == stream))
            # the stream, its shards (`STREAM#I/N`) and their backfill parts
            conn.execute(
                sa.delete(streams_table).where(
                    sa.or_(
                        streams_table.c.stream == stream,
                        streams_table.c.stream.startswith(f"{stream}#", autoescape=True),
                        _parts_of(stream),
                    )
                )
            )
            forgotten += conn.execute(
                sa.delete(ledger_table).where(ledger_table.c.stream == stream)
            ).rowcount
            conn.execute(
                sa.delete(track_table).where(
                    sa.or_(track_table.c.stream == stream, track_table.c.stream.like(stream + "#%"))
                )
            )
            conn.execute(
                sa.delete(related_table).where(
                    sa.or_(
                        related_table.c.stream == stream,
                        related_table.c.stream.startswith(f"{stream}#", autoescape=True),
                    )
                )
            )
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
        columns = "key, hash, source_hash, event_id" + (", payload" if with_payload else "")
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
            return {r[0]: LastSent(r[1], r[4].encode(), r[2], r[3]) for r in rows}
        # (hash, None, source_hash, event_id) is a LastSent as it is: _make builds it
        # in C, without the Python frame of LastSent(...) (this runs for every row read)
        make = LastSent._make
        return {r[0]: make((r[1], None, r[2], r[3])) for r in rows}

    def any_sent(self, stream: str) -> bool:
        """Whether any key of the stream was ever acknowledged."""
        if self._engine is None:
            return False
        with self._begin() as conn:
            first = conn.execute(
                sa.select(records_table.c.key).where(records_table.c.stream == stream).limit(1)
            ).first()
        return first is not None

    def sent_keys_unseen(self, stream: str, seen: Path) -> Iterator[str] | None:
        """Keys of the stream sent before and not in `seen` (a SQLite file with a
        table `seen(key)`: `run.gone.SeenKeys`), by one anti-join in SQLite; None
        for a PostgreSQL store (the caller walks `sent_keys`)."""
        if self._engine is None or self._engine.dialect.name != "sqlite":
            return None
        # the file as --state names it (a read-only engine's URL is a file: URI)
        database = sa.make_url(self.url).database
        return self._unseen(str(database), stream, seen)

    @staticmethod
    def _unseen(database: str, stream: str, seen: Path) -> Iterator[str]:
        # its own read-only connection: the pooled ones never carry the ATTACH
        db = sqlite3.connect(Path(database).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            db.execute("ATTACH DATABASE ? AS read_keys", (seen.resolve().as_uri() + "?mode=ro",))
            cursor = db.execute(
                "SELECT key FROM etl_records WHERE stream = ? "
                "AND key NOT IN (SELECT key FROM read_keys.seen)",
                (stream,),
            )
            while rows := cursor.fetchmany(10_000):
                for (key,) in rows:
                    yield key
        finally:
            db.close()

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
        with self._write() as conn:
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
        self._written()

    def forget_rejects(self, stream: str, keys: Sequence[str]) -> None:
        """Drop pending rejects that no longer need retrying, in one transaction."""
        with self._write() as conn:
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
                kind=r.kind,
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
                    kind=r.kind,
                )
            )

    def rejected(self, stream: str | None = None) -> list[PendingReject]:
        """Pending rejects (all streams, or one), oldest first."""
        if self._engine is None:
            return []
        query = sa.select(rejects_table).order_by(rejects_table.c.first_seen)
        if stream is not None:
            query = query.where(rejects_table.c.stream == stream)
        with self._begin() as conn:
            return [
                PendingReject(
                    stream=r.stream,
                    key=r.key,
                    key_values=tuple(orjson.loads(r.key_values)),
                    event_id=r.event_id,
                    message=r.message,
                    attempts=r.attempts,
                    first_seen=_aware(r.first_seen),
                    last_seen=_aware(r.last_seen),
                    kind=r.kind or "rejected",
                )
                for r in conn.execute(query)
            ]

    # ------------------------------------------------------------ track streams

    def track(self, name: str) -> TrackState | None:
        """The track state of one stream or shard (`name#I/N`), None before its first run."""
        if self._engine is None:
            return None
        with self._begin() as conn:
            row = conn.execute(
                sa.select(track_table).where(track_table.c.stream == name)
            ).one_or_none()
        if row is None:
            return None
        return TrackState(
            stream=row.stream,
            start=_decode(row.start),
            floor=_decode(row.floor),
            backfill_since=row.backfill_since,
            backfill_lower=_decode(row.backfill_lower),
            backfill_checkpoint=orjson.loads(row.backfill_checkpoint)
            if row.backfill_checkpoint
            else None,
            backfill_done_at=_aware(row.backfill_done_at),
        )

    def save_track(self, state: TrackState) -> None:
        """Write a stream's track state whole, in one transaction."""
        checkpoint = state.backfill_checkpoint
        with self._write() as conn:
            upsert(
                conn,
                track_table,
                [
                    {
                        "stream": state.stream,
                        "start": _encode(state.start),
                        "floor": _encode(state.floor),
                        "backfill_since": state.backfill_since,
                        "backfill_lower": _encode(state.backfill_lower),
                        "backfill_checkpoint": orjson.dumps(checkpoint, default=str).decode()
                        if checkpoint is not None
                        else None,
                        "backfill_done_at": state.backfill_done_at,
                        "updated_at": _now(),
                    }
                ],
                ["stream"],
            )

    def save_backfill_checkpoint(self, name: str, checkpoint: Sequence[Any]) -> None:
        """A track backfill's position ([cursor, *key]) up to which all was acknowledged."""
        value = orjson.dumps(list(checkpoint), default=str).decode()
        with self._write() as conn:
            conn.execute(
                sa.update(track_table)
                .where(track_table.c.stream == name)
                .values(backfill_checkpoint=value, updated_at=_now())
            )

    def ledger(
        self, stream: str, keys: Sequence[str], *, with_payload: bool = False
    ) -> dict[str, LastSent]:
        """Which of these keys a track stream sent (still in its ledger): one query."""
        if self._engine is None or not keys:
            return {}
        columns = [ledger_table.c.key, ledger_table.c.hash]
        if with_payload:
            columns.append(ledger_table.c.payload)
        out: dict[str, LastSent] = {}
        with self._begin() as conn:
            for start in range(0, len(keys), 1000):
                rows = conn.execute(
                    sa.select(*columns).where(
                        ledger_table.c.stream == stream,
                        ledger_table.c.key.in_(list(keys[start : start + 1000])),
                    )
                )
                for row in rows:
                    payload = row[2].encode() if with_payload else None
                    out[row[0]] = LastSent(row[1], payload)
        return out

    def commit_track_batch(
        self,
        stream: str,
        owner: str,
        sent: Sequence[LedgerEntry],
        rejected: Sequence[Rejected] = (),
    ) -> None:
        """Record one acknowledged batch of track events in one transaction."""
        now = _now()
        with self._write() as conn:
            if sent:
                upsert(
                    conn,
                    ledger_table,
                    [
                        {
                            "stream": stream,
                            "key": e.key,
                            "owner": owner,
                            "position": e.position,
                            "hash": e.hash,
                            "payload": e.payload.decode(),
                            "event_id": e.event_id,
                            "sent_at": now,
                        }
                        for e in sent
                    ],
                    ["stream", "key"],
                )
                conn.execute(
                    sa.delete(rejects_table).where(
                        rejects_table.c.stream == stream,
                        rejects_table.c.key.in_([e.key for e in sent]),
                    )
                )
            for r in rejected:
                self._reject(conn, stream, r, now)
        self._written()

    def prune_ledger(self, stream: str, owner: str, *, below: str, at_least: str = "") -> int:
        """Forget `owner`'s sent keys positioned in [at_least, below); how many."""
        with self._write() as conn:
            deleted = conn.execute(
                sa.delete(ledger_table).where(
                    ledger_table.c.stream == stream,
                    ledger_table.c.owner == owner,
                    ledger_table.c.position < below,
                    ledger_table.c.position >= at_least,
                )
            ).rowcount
        return int(deleted)

    def ledger_size(self, stream: str) -> int:
        """How many sent keys a track stream's ledger holds."""
        if self._engine is None:
            return 0
        with self._begin() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(ledger_table.c.stream == stream)
                ).scalar_one()
            )

    # ------------------------------------------------------------ runs

    def start_run(self, command: str, mode: str, *, shard: Shard | None = None) -> int | None:
        if self.readonly:
            return None
        with self._write() as conn:
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
        with self._write() as conn:
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

    def runs(self, limit: int = 20) -> list[RunRecord]:
        """The latest runs, newest first."""
        if self._engine is None:
            return []
        with self._begin() as conn:
            rows = conn.execute(
                sa.select(runs_table).order_by(runs_table.c.id.desc()).limit(limit)
            ).all()
        return [
            RunRecord(
                id=row.id,
                command=row.command,
                mode=row.mode,
                started_at=_aware(row.started_at),
                finished_at=_aware(row.finished_at),
                status=row.status,
                streams=orjson.loads(row.streams) if row.streams else [],
                error=row.error,
                host=row.host,
                pid=row.pid,
                shard=row.shard,
            )
            for row in rows
        ]

    def summary(self) -> list[StreamSummary]:
        """Per stream: watermark, records sent (track streams: keys in the ledger),
        pending rejects, checkpoint."""
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
            counts |= dict(
                conn.execute(
                    sa.select(ledger_table.c.stream, sa.func.count()).group_by(
                        ledger_table.c.stream
                    )
                ).all()
            )
            pending: dict[tuple[str, str], int] = {
                (stream, kind or "rejected"): int(n)
                for stream, kind, n in conn.execute(
                    sa.select(
                        rejects_table.c.stream, rejects_table.c.kind, sa.func.count()
                    ).group_by(rejects_table.c.stream, rejects_table.c.kind)
                )
            }
            streams = conn.execute(sa.select(streams_table).order_by(streams_table.c.stream)).all()
        rejects = {s: n for (s, kind), n in pending.items() if kind == "rejected"}
        invalid = {s: n for (s, kind), n in pending.items() if kind == "invalid"}
        names = sorted({s.stream for s in streams} | counts.keys() | {s for s, _ in pending})
        by_name = {s.stream: s for s in streams}
        out = []
        for name in names:
            row = by_name.get(name)
            out.append(
                StreamSummary(
                    stream=name,
                    watermark=decode_watermark(row.watermark, row.watermark_kind) if row else None,
                    records=counts.get(name, 0),
                    rejected=rejects.get(name, 0),
                    invalid=invalid.get(name, 0),
                    last_full_read=_aware(row.full_read_at) if row else None,
                    checkpoint=orjson.loads(row.checkpoint) if row and row.checkpoint else None,
                    updated_at=_aware(row.updated_at) if row else None,
                )
            )
        return out


def _parts_of(state_name: str) -> sa.ColumnElement[bool]:
    """The rows of a parallel backfill's part checkpoints (`STATE_NAME~partIofN`)."""
    return streams_table.c.stream.startswith(f"{state_name}~part", autoescape=True)


_UPSERT_RECORDS = (
    "INSERT INTO etl_records (stream, key, hash, source_hash, payload, event_id, sent_at) "
    "VALUES ({marks}) ON CONFLICT (stream, key) DO UPDATE SET hash = excluded.hash, "
    "source_hash = excluded.source_hash, payload = excluded.payload, "
    "event_id = excluded.event_id, sent_at = excluded.sent_at"
)


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
