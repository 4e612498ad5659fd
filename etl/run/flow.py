"""One stream's flow: pages of source rows -> changes -> events sent, or dry-run records.

`StreamFlow` turns the pages `pipeline.run_stream()` reads into verdicts
(`changes()`), then either delivers the events through `load.deliver()` while
committing acknowledged batches, rejects and backfill checkpoints to the state
store (`deliver()`), or collects the records of a dry run (`dry_run()`).
`Tally` holds the counters the stream report is built from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from etl.delivery import load
from etl.model import BatchResult, Change, DiffRecord, Mapping, Outgoing, Record
from etl.run.diff import ABSENT, fingerprint, row_fingerprint, verdict
from etl.run.options import Collaborators, RunOptions
from etl.run.transform import (
    TRANSFORM_VERSION,
    EventContext,
    event_id,
    make_transformer,
    record_key,
    to_event,
)
from etl.state.store import Rejected, Sent

# Invalid/rejected keys kept per stream in a run record; the counts stay exact.
MAX_LISTED = 1000


class _Ref(NamedTuple):
    """What the pipeline needs back about an acknowledged event."""

    sent: Sent
    key_values: list[Any]
    seq: int


@dataclass
class Tally:
    """Mutable counters of one stream while it runs."""

    read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    invalid: int = 0
    rejected: int = 0
    gone: int = 0
    invalid_records: list[tuple[str, str]] = field(default_factory=list)
    rejected_records: list[tuple[str, str]] = field(default_factory=list)
    diff_records: list[DiffRecord] = field(default_factory=list)
    truncated: int = 0


@dataclass
class StreamFlow:
    """Pages -> changes -> (events to send | dry-run records), for one stream."""

    mapping: Mapping
    options: RunOptions
    io: Collaborators
    tally: Tally
    total: int | None
    seen: set[int] = field(default_factory=set)
    seq: int = -1
    acked_seq: int = -1
    checkpoints: deque[tuple[int, list[Any]]] = field(default_factory=deque)
    state_name: str = ""
    had_rejects: bool = True  # any reject of this stream pending when it started
    seen_keys: set[str] | None = None  # dry run --full: every key read, to find the gone
    writer: ThreadPoolExecutor | None = None  # state writes of acknowledged batches
    writes: deque[Future[Any]] = field(default_factory=deque)  # submitted, not yet checked
    # Keys of pending rejects this run retries; those read so far; those found
    # unchanged since last delivered (nothing left to retry).
    retrying: set[str] = field(default_factory=set)
    retried: set[str] = field(default_factory=set)
    unchanged_rejects: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        config = self.io.delivery
        self.context = EventContext(
            event_type=self.mapping.event_type,
            api_key=config.api_key,
            workspace_key=config.workspace_key,
        )
        self.transform = make_transformer(self.mapping, self.context)
        # Salt of the row digests: a new mapping or a new transform re-maps every row.
        self.salt = f"{TRANSFORM_VERSION}:{self.mapping.fingerprint}:".encode()
        # Duplicate keys are possible only from a query; a table key is unique
        # by declaration. Hashes of keys keep this set small (8 bytes a key).
        self.check_duplicates = self.mapping.source.query is not None

    # ------------------------------------------------------------ changes

    def changes(
        self, pages: Iterator[list[tuple[Any, ...]]], *, with_payload: bool
    ) -> Iterator[tuple[Change, list[Any], str]]:
        """Every row's verdict, page by page, with its key values and row digest.

        A row whose digest equals the one stored with its last-sent payload is
        unchanged without being transformed (`diff.row_fingerprint`); `--force`
        transforms every row, since it sends unchanged records too.
        """
        n_keys = len(self.mapping.key)
        shortcut = not self.options.force
        stream = self.mapping.stream
        for rows in pages:
            if self.io.stop.is_set():
                return
            keyed = [(record_key(row[:n_keys]), row) for row in rows]
            if self.options.shard is not None:
                keyed = [(key, row) for key, row in keyed if self.owns(key)]
            if self.retrying:
                keyed = self._first_sightings(keyed)
            if not keyed:
                continue
            last = self.io.state.last_sent(
                stream, [key for key, _ in keyed], with_payload=with_payload
            )
            seen_keys = self.seen_keys
            for key, row in keyed:
                if seen_keys is not None:
                    seen_keys.add(key)
                digest = row_fingerprint(row, self.salt)
                previous = last.get(key)
                duplicate = self._duplicate(key)
                if shortcut and not duplicate and previous and previous.source == digest:
                    # Unchanged, known without transforming: counted here and not
                    # yielded (nothing downstream acts on it), the hot path of a
                    # no-change --full sync.
                    self.tally.unchanged += 1
                    if key in self.retrying:
                        self.unchanged_rejects.add(key)
                    continue
                record = self.transform(row)
                if duplicate:
                    record = _duplicate_key(record)
                change = verdict(record, previous)
                self._count(change)
                if change.kind == "unchanged" and key in self.retrying:
                    self.unchanged_rejects.add(key)
                yield change, list(row[:n_keys]), digest
            self.tally.read += len(keyed)
            if self.options.mode == "backfill":
                self.checkpoints.append((self.seq, list(rows[-1][:n_keys])))
                self._checkpoint()
            if self.io.progress:
                self.io.progress(stream, self.tally.read, self.total)

    def _first_sightings(
        self, keyed: list[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """The page without rows of retried rejects already read in this run: sent
        twice, they would be rejected (and counted) twice, or delivered twice."""
        kept = []
        for key, row in keyed:
            if key in self.retrying:
                if key in self.retried:
                    continue
                self.retried.add(key)
            kept.append((key, row))
        return kept

    def owns(self, key: str) -> bool:
        return self.options.shard is None or self.options.shard.owns(key)

    def _duplicate(self, key: str) -> bool:
        """Seen before in this run (only a `query:` source can repeat a key)."""
        if not self.check_duplicates:
            return False
        digest = hash(key)
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False

    def _count(self, change: Change) -> None:
        tally = self.tally
        if change.kind == "invalid":
            tally.invalid += 1
            if len(tally.invalid_records) < MAX_LISTED:
                tally.invalid_records.append((change.record.key, change.record.reason or ""))
        elif change.kind == "new":
            tally.new += 1
        elif change.kind == "changed":
            tally.changed += 1
        else:
            tally.unchanged += 1

    # ------------------------------------------------------------ sending

    def deliver(self, pages: Iterator[list[tuple[Any, ...]]]) -> Any:
        if self.io.client is None:
            raise ValueError("deliver needs an HTTP client")
        # State commits run on one writer thread: in order (one worker, FIFO) and
        # off the main thread (sqlite releases the GIL while it writes). Each batch
        # keeps its delivery slot until its commit is done (load.deliver waits on
        # the future _on_result returns), so a crash re-sends at most
        # `concurrency` batches, as before.
        with ThreadPoolExecutor(1, thread_name_prefix="etl-state-writer") as writer:
            self.writer = writer
            try:
                stats = load.deliver(
                    self._outgoing(pages),
                    config=self.io.delivery,
                    on_result=self._on_result,
                    client=self.io.client,
                    sleep=self.io.sleep,
                )
            finally:
                self.writer = None
        # leaving the `with` waited for every write, even after a failed delivery
        while self.writes:
            self.writes.popleft().result()  # the first failed write, if any
        return stats

    def _outgoing(self, pages: Iterator[list[tuple[Any, ...]]]) -> Iterator[Outgoing]:
        send_unchanged = self.options.force
        stop = self.io.stop
        for change, key_values, source_hash in self.changes(pages, with_payload=False):
            record = change.record
            if change.kind == "invalid" or (change.kind == "unchanged" and not send_unchanged):
                continue
            if stop.is_set():
                # A signal: queue nothing more, not even the rest of this page (a pod
                # has ~30 s of grace); the batches in flight finish, run_stream raises.
                return
            # changes() yields new/changed/unchanged only for valid records
            assert record.payload is not None  # noqa: S101
            assert record.canonical is not None  # noqa: S101
            digest = change.hash or fingerprint(record.canonical)
            eid = event_id(
                workspace_key=self.context.workspace_key,
                event_type=self.context.event_type,
                key=record.key,
                payload_hash=digest,
            )
            body = to_event(record.payload, event_id=eid, context=self.context)
            self.seq += 1
            yield Outgoing(
                key=record.key,
                event_id=eid,
                body=body,
                ref=_Ref(
                    Sent(record.key, digest, record.canonical, eid, source_hash),
                    key_values,
                    self.seq,
                ),
            )

    def _on_result(self, result: BatchResult) -> Future[Any] | None:
        sent = [o.ref.sent for o in result.acked]
        rejected = [
            Rejected(o.key, o.ref.key_values, o.event_id, message) for o, message in result.rejected
        ]
        committed = self._write(
            self.io.state.commit_batch,
            self.mapping.stream,
            sent,
            rejected,
            clear_rejects=self.had_rejects,
        )
        for outgoing, message in result.rejected:
            self.tally.rejected += 1
            if len(self.tally.rejected_records) < MAX_LISTED:
                self.tally.rejected_records.append((outgoing.key, message))
        refs = [o.ref.seq for o in result.acked] + [o.ref.seq for o, _ in result.rejected]
        if refs:
            self.acked_seq = max(self.acked_seq, *refs)
        self._checkpoint()
        return committed

    def settle_rejects(self, bound: Any) -> None:
        """After the stream was delivered: forget pending rejects that need no retry —
        the row is gone from the source, or it is back to what was last delivered.
        Re-sent ones were settled by their batch; invalid ones stay pending."""
        settled = (self.retrying - self.retried) | self.unchanged_rejects
        if settled:
            self.io.state.forget_rejects(self.mapping.stream, sorted(settled))
            bound.info("rejects.settled", count=len(settled))

    def _checkpoint(self) -> None:
        """Backfill: save the last key up to which everything was acknowledged."""
        latest = None
        while self.checkpoints and self.checkpoints[0][0] <= self.acked_seq:
            latest = self.checkpoints.popleft()[1]
        if latest is not None:
            self._write(
                self.io.state.save_checkpoint, self.state_name or self.mapping.stream, latest
            )

    def _write(self, call: Any, *args: Any, **kwargs: Any) -> Future[Any] | None:
        """A state write: on the writer thread while delivering, else right here."""
        if self.writer is None:
            call(*args, **kwargs)
            return None
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()  # a failed write stops the run here
        future = self.writer.submit(call, *args, **kwargs)
        self.writes.append(future)
        return future

    # ------------------------------------------------------------ dry run

    def dry_run(self, pages: Iterator[list[tuple[Any, ...]]], *, list_gone: bool) -> None:
        limit = self.options.diff_limit
        tally = self.tally
        seen_keys = self.seen_keys = set() if list_gone else None
        for change, _, _ in self.changes(pages, with_payload=True):
            if change.kind == "unchanged":
                continue
            if limit is not None and len(tally.diff_records) >= limit:
                tally.truncated += 1
                continue
            tally.diff_records.append(_diff_record(change))
        if seen_keys is None:
            return
        # Keys sent before and no longer in the source (information only).
        for key in self.io.state.sent_keys(self.mapping.stream):
            if key in seen_keys or not self.owns(key):
                continue
            tally.gone += 1
            if limit is not None and len(tally.diff_records) >= limit:
                tally.truncated += 1
            else:
                tally.diff_records.append(DiffRecord(key=key, kind="gone"))


def _duplicate_key(record: Record) -> Record:
    return Record(
        key=record.key,
        cursor=record.cursor,
        payload=None,
        reason="duplicate key: the query returned this key more than once in this "
        "run — make `key` unique (only the first row was used)",
    )


def _diff_record(change: Change) -> DiffRecord:
    record = change.record
    if change.kind == "invalid":
        return DiffRecord(key=record.key, kind="invalid", reason=record.reason)
    payload = record.payload or {}
    traits = dict(payload.get("traits", {}))
    if change.kind == "new":
        return DiffRecord(key=record.key, kind="new", traits=traits)
    return DiffRecord(
        key=record.key,
        kind="changed",
        traits=traits,
        changes={name: _sides(old, new) for name, (old, new) in change.fields.items()},
    )


def _sides(old: Any, new: Any) -> dict[str, Any]:
    """{"old", "new"} of one changed field; a side that is absent is left out."""
    sides = {}
    if old is not ABSENT:
        sides["old"] = old
    if new is not ABSENT:
        sides["new"] = new
    return sides
