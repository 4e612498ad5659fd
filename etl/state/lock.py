"""The run lock of a state store: one run at a time (one per shard), and who holds it.

SQLite stores lock a file next to the database (flock); PostgreSQL stores take
a session advisory lock and write its holder to etl_meta. Either dies with the
process, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.errors import LockedError, StateError
from etl.model import Shard
from etl.state.schema import LOCK_KEY, meta_table, upsert


class RunLock:
    """The lock handle of one StateStore: a file descriptor or a connection while held."""

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._file: int | None = None
        self._key = LOCK_KEY
        self._pid: int | None = None

    def acquire_file(
        self, database: str | None, holder: dict[str, Any], shard: Shard | None
    ) -> None:
        """Take the lock of a SQLite store: a flock on a file next to `database`."""
        suffix = f".{shard.index}-of-{shard.count}.lock" if shard else ".lock"
        path = f"{database}{suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise LockedError(_locked_message(current, path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._file = fd

    def acquire_advisory(
        self,
        engine: Engine,
        holder: dict[str, Any],
        shard: Shard | None,
        *,
        begin: Callable[[], AbstractContextManager[Connection]],
    ) -> None:
        """Take the lock of a PostgreSQL store; `begin` opens the store's transactions."""
        conn = engine.connect()
        # A session-level advisory lock dies with the connection, so with the process.
        self._key = LOCK_KEY if shard is None else _shard_lock_key(shard)
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar()
        conn.commit()
        if not got:
            current = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == _holder_name(shard))
            ).scalar()
            conn.close()
            raise LockedError(_locked_message(current or "", "PostgreSQL advisory lock"))
        with begin() as tx:
            row = {"name": _holder_name(shard), "value": json.dumps(holder)}
            upsert(tx, meta_table, [row], ["name"])
        self._conn = conn
        self._pid = _backend_pid(conn)

    @property
    def on_session(self) -> bool:
        """Held as a PostgreSQL session lock (state writes then go over that session)."""
        return self._conn is not None

    def session(self) -> Connection:
        """The session that holds the lock, for a state write; StateError when the
        lock was lost with its session (terminated, a failover, a network cut).

        A write on the lock's own session holds the lock until it commits: if
        the session dies the write fails, so no write happens without the lock.
        SQLAlchemy reconnects an invalidated connection silently on its next use;
        that new session holds no lock, hence the checks below.
        """
        conn = self._conn
        if conn is None:
            raise StateError("the run lock is not held")
        if conn.invalidated or _backend_pid(conn) != self._pid:
            raise StateError(lock_lost_message("its connection was closed"))
        return conn

    def release(self) -> None:
        """Let go of the lock, if held."""
        if self._file is not None:
            os.ftruncate(self._file, 0)
            os.close(self._file)  # closing drops the flock
            self._file = None
        if self._conn is not None:
            # A pooled connection outlives close(), and a session lock outlives
            # a rollback: unlock explicitly (the lock still dies with a crash).
            with contextlib.suppress(sa.exc.DBAPIError):
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
            self._conn.close()
            self._conn = None


def lock_lost_message(detail: str) -> str:
    """Why a run stopped when the session holding its PostgreSQL lock was lost."""
    return (
        f"the session holding the run lock was lost ({detail}); stopped before "
        "the next state write, so two runs never write side by side — batches acknowledged "
        "so far are recorded; run the same command again to carry on"
    )


def _backend_pid(conn: Connection) -> int | None:
    """The server process of a connection's session, as the driver knows it (no query)."""
    info = getattr(conn.connection.dbapi_connection, "info", None)
    pid = getattr(info, "backend_pid", None)
    return pid if isinstance(pid, int) else None


def _shard_lock_key(shard: Shard) -> int:
    # one lock per (index, count), clear of the two keys above
    return (LOCK_KEY << 32) + shard.count * 100_000 + shard.index


def _holder_name(shard: Shard | None) -> str:
    return f"lock_holder {shard.label}" if shard else "lock_holder"


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


class WriteTurns:
    """The writers of one SQLite store file take turns by a file lock next to it
    (`DATABASE.writer`), held for each write transaction.

    Worker processes (`run.parallel`) commit to one file at once. SQLite alone
    would make the loser of a race poll: its busy handler sleeps 1, 2, 5, 10 ...
    up to 100 ms between tries, and each batch keeps its delivery slot while its
    commit waits (14 ms a 500-row commit on average, 342 ms at worst, measured with
    two workers on 1,000,000 users). A blocking `flock` wakes the next writer as the
    lock is released. Uncontended, it costs two system calls a commit.
    """

    def __init__(self, database: str) -> None:
        self._path = f"{database}.writer"
        self._fd: int | None = None
        self._mutex = threading.Lock()  # the threads of one process: flock is per file

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._mutex:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
