"""One background thread that runs state writes in the order they were submitted.

Why: committing an acknowledged batch to the state store (an SQLite upsert of
500 rows) costs as much as transforming them, and sqlite3 releases the GIL
while it works. Done on this thread, it overlaps with reading, transforming
and sending instead of stalling them.

What it keeps: writes run one at a time, first in first out, so a checkpoint
submitted after a batch is saved after that batch. At most `depth` writes
wait, so a crash can lose only those commits: their batches are re-sent with
the same event ids on the next run (at-least-once, as before). The first
error stops the writer; `submit` and `close` raise it in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class OrderedWriter:
    """Run submitted calls in order on one thread; raise their first error here."""

    def __init__(self, *, depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="etl-state-writer", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `call(*args, **kwargs)`; blocks while `depth` writes are waiting."""
        self._raise()
        self._queue.put((call, args, kwargs))

    def close(self) -> None:
        """Wait for every queued write, stop the thread, raise the first error."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing: the caller will raise
            call, args, kwargs = item
            try:
                call(*args, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
