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
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.errors import LockedError
from etl.model import Shard
from etl.state.schema import LOCK_KEY, meta_table, upsert


class RunLock:
    """The lock handle of one StateStore: a file descriptor or a connection while held."""

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._file: int | None = None
        self._key = LOCK_KEY

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
