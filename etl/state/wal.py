"""Copying a SQLite store's write-ahead log back into the database file on a
thread of its own, while the run goes on.

SQLite checkpoints a WAL database at two moments a run waits for: inside the
commit that fills the WAL to `wal_autocheckpoint` pages (a commit on the state
writer thread, whose batch keeps its delivery slot until it is done), and when
the store's last connection closes (the process waits for that). An
incremental sync writes scattered records, each dirtying a page of its own: a
1% churn of 1,000,000 users left ~10,000 pages (~40 MB) for the close to copy
back and sync, ~150 ms. `Checkpointer` runs a PASSIVE checkpoint after each
commit on its own thread and connection instead: it never blocks a commit or a
read (WAL lets them run beside it), so the copying and the disk syncs overlap
the reading and sending, and the close finds little left.

A checkpoint that fails or finds the log busy is not an error: SQLite
checkpoints at the next commit that fills the log, or at close, as before.

Forking (`--workers`): a child must not start with a SQLite lock held by a
checkpoint the parent was running on another thread, so `os.fork()` waits for
a running checkpoint to end (`_before_fork`).
"""

from __future__ import annotations

import os
import threading
import weakref

import sqlalchemy as sa


class Checkpointer:
    """The checkpoint thread of one SQLite state engine: started by the first
    `nudge()`, stopped by `stop()` (the store's close)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._wanted = threading.Condition()
        self._asked = 0  # nudges so far
        self._done = 0  # nudges the checkpoints have covered
        self._stopping = False
        self._running = threading.Lock()  # held during a checkpoint; a fork waits for it
        self._thread: threading.Thread | None = None

    def nudge(self) -> None:
        """Something was committed: checkpoint it soon (one checkpoint covers every
        nudge before it starts)."""
        with self._wanted:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="etl-state-checkpoint", daemon=True
                )
                self._thread.start()
                _LIVE.add(self)
            self._asked += 1
            self._wanted.notify_all()

    def settle(self) -> None:
        """Wait until every commit nudged so far was checkpointed (or tried)."""
        with self._wanted:
            self._wanted.wait_for(
                lambda: (
                    self._done >= self._asked or self._thread is None or not self._thread.is_alive()
                )
            )

    def stop(self) -> None:
        """End the thread after the checkpoint it may be running; idempotent."""
        with self._wanted:
            thread, self._stopping = self._thread, True
            self._wanted.notify_all()
        if thread is not None:
            thread.join()
        with self._wanted:
            self._thread = None
            self._wanted.notify_all()
        _LIVE.discard(self)

    def _loop(self) -> None:
        try:
            while True:
                with self._wanted:
                    self._wanted.wait_for(lambda: self._stopping or self._asked > self._done)
                    if self._stopping:
                        return
                    covered = self._asked
                with self._running:
                    self._checkpoint()
                with self._wanted:
                    self._done = covered
                    self._wanted.notify_all()
        finally:
            with self._wanted:
                self._wanted.notify_all()

    def _checkpoint(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").close()
        except sa.exc.DBAPIError:
            pass  # best effort: SQLite checkpoints at a later commit or at close anyway


# Every checkpointer whose thread runs: os.fork() waits for their checkpoints.
_LIVE: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def _before_fork() -> None:
    for checkpointer in list(_LIVE):
        checkpointer._running.acquire()
        checkpointer._wanted.acquire()


def _after_fork() -> None:
    for checkpointer in list(_LIVE):
        checkpointer._wanted.release()
        checkpointer._running.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
