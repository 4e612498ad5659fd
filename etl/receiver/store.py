"""The receiver's SQLite file: every request it answered and every event it
accepted, for tests, the demo and `read_events` (no server needed)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from etl.errors import UsageError
from etl.receiver.rules import Verdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    status INTEGER,  -- NULL: the connection was dropped without an answer
    n_events INTEGER NOT NULL,
    n_bytes INTEGER NOT NULL,
    fault TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL REFERENCES requests (id),
    received_at TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_event_id ON events (event_id);
"""
_REQUEST_COLUMNS = ("id", "received_at", "status", "n_events", "n_bytes", "fault")


def _event_columns(event: dict[str, Any], received_at: str) -> tuple[str, ...]:
    """The indexed columns of an accepted event, then its JSON body. A `_timestamp`
    the client sent is overwritten with the receive time, as Jitsu does: the time
    an event happened travels as `utc_time`. (The receive time of every event is
    in its own column, so bodies stay as sent otherwise.)"""
    keys = ("event_id", "event_type", "user_id", "account_id")
    stored = {**event, "_timestamp": received_at} if "_timestamp" in event else event
    return (*(event[key] for key in keys), orjson.dumps(stored).decode())


def _load_events(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT body FROM events ORDER BY id")
    return [orjson.loads(body) for (body,) in rows]


class Store:
    """The SQLite file of requests and accepted events: one connection shared by
    the handler threads under a lock (SQLite writes one at a time anyway)."""

    def __init__(self, path: Path) -> None:
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the server
            # Survives a crash of the receiver (not of the OS): enough for a test
            # double, and a commit per request no longer waits for an fsync.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise UsageError(f"{path}: cannot open the receiver store ({exc})") from exc
        self._lock = threading.Lock()

    def add(self, verdict: Verdict, n_bytes: int) -> None:
        """Log one request and store its accepted events, in one transaction."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        status = verdict.answer.status if verdict.answer else None
        with self._lock, self._conn:
            cursor = self._conn.execute(
                "INSERT INTO requests (received_at, status, n_events, n_bytes, fault)"
                " VALUES (?, ?, ?, ?, ?)",
                (now, status, verdict.n_events, n_bytes, verdict.fault),
            )
            self._conn.executemany(
                "INSERT INTO events (request_id, received_at, event_id, event_type, user_id,"
                " account_id, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(cursor.lastrowid, now, *_event_columns(e, now)) for e in verdict.accepted],
            )

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return _load_events(self._conn)

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {', '.join(_REQUEST_COLUMNS)} FROM requests ORDER BY id"
            )
            return [dict(zip(_REQUEST_COLUMNS, row, strict=True)) for row in rows]

    def stats(self) -> dict[str, Any]:
        """Counts for demos: events stored, requests by status and by fault."""
        with self._lock:
            (events,) = self._conn.execute("SELECT count(*) FROM events").fetchone()
            by_status = self._conn.execute("SELECT status, count(*) FROM requests GROUP BY status")
            statuses = {str(s) if s is not None else "dropped": n for s, n in by_status}
            by_fault = self._conn.execute(
                "SELECT fault, count(*) FROM requests WHERE fault IS NOT NULL GROUP BY fault"
            )
            faults = dict(by_fault.fetchall())
        requests = sum(statuses.values())
        return {"events": events, "requests": requests, "by_status": statuses, "by_fault": faults}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def read_events(store: Path) -> list[dict[str, Any]]:
    """The events a receiver store file holds, in arrival order; no server needed."""
    uri = store.resolve().as_uri() + "?mode=ro"  # read-only: never create a stray file
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return _load_events(conn)
    except sqlite3.Error as exc:
        raise UsageError(f"{store}: not a receiver store ({exc})") from exc
