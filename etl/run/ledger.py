"""What one stream has sent and what the state store has recorded of it.

The `Ledger` numbers each outgoing event, takes the loader's acknowledgements
(`on_result`), commits acknowledged batches and rejects, and saves a
backfill's checkpoint only up to the highest sequence number below which every
event was acknowledged. While `writing()`, state writes run on one writer
thread: in order (one worker, FIFO) and off the main thread (SQLite releases
the GIL while it writes).
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, ParamSpec

from etl.model import BatchResult, Watermark
from etl.run.classify import MAX_LISTED
from etl.run.ports import StatePort
from etl.state.store import Rejected, Sent

P = ParamSpec("P")


class Ref(NamedTuple):
    """What the ledger needs back about an event the loader reports on."""

    sent: Sent  # what the state records once the event is acknowledged
    row: tuple[Any, ...]  # the source row: its key values are kept if the event is refused
    seq: int


class Ledger:
    """Sequence numbers, acknowledgements, checkpoints and state writes of one stream.

    A class for the state it owns across the loader's callbacks; built once per
    stream, used by the main thread only (the writer thread runs the writes).
    """

    def __init__(
        self,
        *,
        state: StatePort,
        stream: str,
        state_name: str,
        n_keys: int,
        clear_rejects: bool,
        checkpoints: bool,
    ) -> None:
        """`clear_rejects=False` says no reject of the stream was pending when it
        started (a DELETE a batch saved); `checkpoints` saves backfill checkpoints."""
        self._state = state
        self._stream = stream
        self._state_name = state_name
        self._n_keys = n_keys
        self._clear_rejects = clear_rejects
        self._checkpoints_on = checkpoints
        self._seq = -1  # the last number handed out
        self._acked = -1  # every event up to this number was acknowledged or refused
        self._early: list[tuple[int, int]] = []  # reported (first, last) ranges past a gap
        self._checkpoints: deque[tuple[int, tuple[Any, ...]]] = deque()
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()  # submitted, not yet checked
        # the safe horizon this backfill's pages are read under, saved with each
        # checkpoint (set once the read's snapshot is open: `pipeline._read`)
        self.since: Watermark | None = None
        self.rejected = 0
        self.rejected_records: list[tuple[str, str]] = []  # (key, message), the first MAX_LISTED

    # ------------------------------------------------------------ numbering

    def ref(self, sent: Sent, row: tuple[Any, ...]) -> Ref:
        """The next event's reference, numbered in the order events are sent."""
        self._seq += 1
        return Ref(sent, row, self._seq)

    def page_done(self, key_values: tuple[Any, ...]) -> None:
        """Every event of a page read up to `key_values` was numbered: once they are
        all acknowledged, a backfill can resume after that key."""
        if self._checkpoints_on:
            self._checkpoints.append((self._seq, key_values))
            self._checkpoint()

    # ------------------------------------------------------------ acknowledgements

    def on_result(self, result: BatchResult[Ref]) -> Future[None] | None:
        """Record one batch's outcome; a Future while the writer thread commits it."""
        sent = [o.ref.sent for o in result.acked]
        n_keys = self._n_keys
        rejected = [
            Rejected(o.key, list(o.ref.row[:n_keys]), o.event_id, message)
            for o, message in result.rejected
        ]
        committed = self._write(
            self._state.commit_batch,
            self._stream,
            sent,
            rejected,
            clear_rejects=self._clear_rejects,
        )
        for outgoing, message in result.rejected:
            self.rejected += 1
            if len(self.rejected_records) < MAX_LISTED:
                self.rejected_records.append((outgoing.key, message))
        seqs = [o.ref.seq for o in result.acked] + [o.ref.seq for o, _ in result.rejected]
        if seqs:
            self._acknowledge(min(seqs), max(seqs))
        self._checkpoint()
        return committed

    def invalid(self, records: list[tuple[str, tuple[Any, ...], str]]) -> None:
        """Remember a page's invalid records (key, source row, reason) in the state
        store, to be re-read by key and counted by every run while they stay invalid
        (SPEC §4). A record whose key has a NULL part cannot be re-read: not kept."""
        n_keys = self._n_keys
        kept = [
            Rejected(key, list(row[:n_keys]), "", reason, kind="invalid")
            for key, row, reason in records
            if None not in row[:n_keys]
        ]
        if kept:
            self._write(self._state.commit_batch, self._stream, [], kept, clear_rejects=False)

    def _acknowledge(self, first: int, last: int) -> None:
        """Advance `_acked` over a batch's numbers, once no gap is left below them
        (the loader reports batches in order; this does not depend on it)."""
        heapq.heappush(self._early, (first, last))
        while self._early and self._early[0][0] <= self._acked + 1:
            self._acked = max(self._acked, heapq.heappop(self._early)[1])

    def _checkpoint(self) -> None:
        """Backfill: save the last key up to which everything was acknowledged."""
        latest = None
        while self._checkpoints and self._checkpoints[0][0] <= self._acked:
            latest = self._checkpoints.popleft()[1]
        if latest is not None:
            self._write(self._state.save_checkpoint, self._state_name, latest, self.since)

    # ------------------------------------------------------------ writes

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """State writes go to one writer thread until the block ends; leaving it
        waits for every write, and raises the first that failed (after a failed
        delivery, the delivery's error is the one raised)."""
        with ThreadPoolExecutor(1, thread_name_prefix="etl-state-writer") as writer:
            self._writer = writer
            try:
                yield
            finally:
                self._writer = None
        while self._writes:
            self._writes.popleft().result()

    def _write(
        self, call: Callable[P, None], *args: P.args, **kwargs: P.kwargs
    ) -> Future[None] | None:
        """A state write: on the writer thread while `writing()`, else right here."""
        if self._writer is None:
            call(*args, **kwargs)
            return None
        while self._writes and self._writes[0].done():
            self._writes.popleft().result()  # a failed write stops the run here
        future = self._writer.submit(call, *args, **kwargs)
        self._writes.append(future)
        return future
