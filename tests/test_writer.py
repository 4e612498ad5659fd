"""The ordered background writer that commits acknowledged batches."""

from __future__ import annotations

import threading
import time

import pytest

from etl.writer import OrderedWriter


def test_writes_run_in_submission_order_and_close_waits_for_them() -> None:
    """Every submitted write has run, in order, when close() returns."""
    done: list[int] = []
    writer = OrderedWriter(depth=2)
    for i in range(50):
        writer.submit(done.append, i)
    writer.close()
    assert done == list(range(50))


def test_writes_run_off_the_callers_thread() -> None:
    """The work happens on the writer's own thread."""
    threads: list[str] = []
    writer = OrderedWriter()
    writer.submit(lambda: threads.append(threading.current_thread().name))
    writer.close()
    assert threads == ["etl-state-writer"]


def test_the_first_error_is_raised_in_the_caller_and_later_writes_are_skipped() -> None:
    """A failing commit (disk full) surfaces here; nothing after it is written."""
    done: list[int] = []

    def fail() -> None:
        raise OSError("database or disk is full")

    writer = OrderedWriter(depth=1)
    writer.submit(done.append, 1)
    writer.submit(fail)
    writer.submit(done.append, 2)
    with pytest.raises(OSError, match="disk is full"):
        writer.close()
    assert done == [1]


def test_submit_blocks_while_depth_writes_wait() -> None:
    """At most `depth` writes queue up: memory and what a crash can lose stay bounded."""
    release = threading.Event()
    writer = OrderedWriter(depth=1)
    writer.submit(release.wait)  # taken by the thread, blocks it
    time.sleep(0.05)
    writer.submit(lambda: None)  # fills the queue
    blocked = threading.Thread(target=writer.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive()
    release.set()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    writer.close()
