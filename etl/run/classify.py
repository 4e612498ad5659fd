"""Pages of source rows -> pages of changes: transform and diff, for one stream.

`classify()` is a generator: one `ClassifiedPage` per page read, with the
verdict of every row that needs acting on (new, changed, invalid; unchanged
too when it is transformed). Its state has small owners: `Counts` (what the
report says), `DuplicateKeys` (a `query:` source may repeat a key),
`RetriedRejects` (rejects re-read first may come again in the cursor window).
Pure apart from one `last_sent` read of the state store per page.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from etl.model import Change, Record, key_part
from etl.run.diff import row_fingerprints, verdict
from etl.run.plan import StreamPlan
from etl.run.ports import StatePort
from etl.run.transform import record_key
from etl.state.store import LastSent

# Invalid/rejected keys kept per stream in a run record; the counts stay exact.
MAX_LISTED = 1000

Row = tuple[Any, ...]
# One verdict to act on: the change, the source row it was made from, the row's
# digest (`diff.row_fingerprint`). A plain tuple: one is made per row.
Classified = tuple[Change, Row, str]


@dataclass(slots=True)
class Counts:
    """What one stream's rows turned out to be, counted as they are classified."""

    read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    invalid: int = 0
    gone: int = 0  # keys sent before and not met by a full read (SPEC §9)
    invalid_records: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    def merge(self, other: Counts) -> None:
        """Add another reader's counts (a worker process's part of the stream)."""
        self.read += other.read
        self.new += other.new
        self.changed += other.changed
        self.unchanged += other.unchanged
        self.invalid += other.invalid
        self.gone += other.gone
        room = MAX_LISTED - len(self.invalid_records)
        self.invalid_records.extend(other.invalid_records[: max(0, room)])

    def add(self, change: Change) -> None:
        kind = change.kind
        if kind == "invalid":
            self.invalid += 1
            if len(self.invalid_records) < MAX_LISTED:
                self.invalid_records.append((change.record.key, change.record.reason or ""))
        elif kind == "new":
            self.new += 1
        elif kind == "changed":
            self.changed += 1
        else:
            self.unchanged += 1


class DuplicateKeys:
    """The keys read so far in this run, to tell a repeated one.

    Hashes of keys keep this small (8 bytes a key); a collision can only make
    a row look repeated within one run, and Python's str hash is 64-bit.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def forget(self) -> None:
        """A new snapshot starts (a resumed read): keys read again are not repeats."""
        self._seen.clear()

    def repeated(self, key: str) -> bool:
        """True when `key` was read before in this run (and remember it)."""
        digest = hash(key)
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


class RetriedRejects:
    """The pending rejects this run retries, re-read by key before the cursor
    window: which of them were read, and which turned out unchanged since last
    delivered (nothing left to retry)."""

    __slots__ = ("_read", "_unchanged", "keys")

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys: frozenset[str] = frozenset(keys)
        self._read: set[str] = set()
        self._unchanged: set[str] = set()

    def first_sightings(self, keyed: list[tuple[str, Row]]) -> list[tuple[str, Row]]:
        """The page without rows of retried rejects already read in this run: sent
        twice, they would be rejected (and counted) twice, or delivered twice."""
        keys, read = self.keys, self._read
        kept = []
        for key, row in keyed:
            if key in keys:
                if key in read:
                    continue
                read.add(key)
            kept.append((key, row))
        return kept

    def unchanged(self, key: str) -> None:
        """A retried reject's row is back to what was last delivered."""
        self._unchanged.add(key)

    def settled(self) -> list[str]:
        """Rejects that need no retry, once the stream was read: the row is gone
        from the source, or it is back to what was last delivered. Re-sent ones
        are settled by their batch; invalid ones stay pending."""
        return sorted((self.keys - self._read) | self._unchanged)


@dataclass(frozen=True, slots=True)
class ClassifiedPage:
    """One page read, its verdicts streamed: `changes` is consumed before the next
    page is asked for (so a page's records are never all held at once)."""

    # in read order; unchanged rows known by their digest are left out
    changes: Iterator[Classified]
    keyed: list[tuple[str, Row]]  # every row considered (after shard and retry filters)
    last_key_values: Row  # the key of the page's last row as read (a backfill checkpoint)


def classify(
    pages: Iterable[list[Row]],
    *,
    plan: StreamPlan,
    state: StatePort,
    counts: Counts,
    retries: RetriedRejects | None = None,
    related: RetriedRejects | None = None,
    with_payload: bool = False,
    stop: threading.Event | None = None,
    duplicates: DuplicateKeys | None = None,
) -> Iterator[ClassifiedPage]:
    """Every row's verdict, page by page, against what was last sent for its key.

    A row whose digest equals the one stored with its last-sent payload is
    unchanged without being transformed (`diff.row_fingerprint`); `force`
    transforms every row, since it sends unchanged records too. A page left
    empty by the shard or retry filters is skipped. Stops between pages once
    `stop` is set. `related` are keys a related table named, re-read by key before
    the cursor window like `retries`: a key is considered once per run.
    `duplicates` is the caller's when it must forget the keys read so far (a
    read resumed in a new snapshot).
    """
    mapping = plan.mapping
    stream = mapping.stream
    n_keys = len(mapping.key)
    shortcut = not plan.force
    salt = plan.salt
    transform = plan.transform
    if not plan.duplicates_possible:
        duplicates = None
    elif duplicates is None:
        duplicates = DuplicateKeys()
    retries = retries if retries is not None else RetriedRejects(())
    retrying = retries.keys
    related_keys = related.keys if related is not None else frozenset()

    def verdicts(
        keyed: list[tuple[str, Row]], last: dict[str, LastSent], digests: list[str]
    ) -> Iterator[Classified]:
        # A generator, not a list: one page of Records held at once costs more in
        # garbage collection than the generator's resumes (measured, ~3 us a row).
        for (key, row), digest in zip(keyed, digests, strict=True):
            previous = last.get(key)
            repeated = duplicates is not None and duplicates.repeated(key)
            if shortcut and not repeated and previous and previous.source == digest:
                # Unchanged, known without transforming: counted here and not
                # yielded (nothing downstream acts on it), the hot path of a
                # no-change --full sync.
                counts.unchanged += 1
                if key in retrying:
                    retries.unchanged(key)
                continue
            record = transform(row)
            if repeated:
                record = _duplicate_key(record)
            change = verdict(record, previous)
            counts.add(change)
            if change.kind == "unchanged" and key in retrying:
                retries.unchanged(key)
            yield change, row, digest

    for rows in pages:
        if stop is not None and stop.is_set():
            return
        # Every read of a shard (pages, re-reads by key, NULL keys) carries the shard
        # predicate in its SQL (extract.build_query): no row of another shard comes.
        if n_keys == 1:  # record_key of one column, without a slice and a call a row
            keyed = [(key_part(row[0]), row) for row in rows]
        else:
            keyed = [(record_key(row[:n_keys]), row) for row in rows]
        if retrying:
            keyed = retries.first_sightings(keyed)
        if related is not None and related_keys:
            keyed = related.first_sightings(keyed)
        if not keyed:
            continue
        last = state.last_sent(stream, [key for key, _ in keyed], with_payload=with_payload)
        counts.read += len(keyed)
        digests = row_fingerprints([row for _, row in keyed], salt)
        yield ClassifiedPage(verdicts(keyed, last, digests), keyed, rows[-1][:n_keys])


def _duplicate_key(record: Record) -> Record:
    return Record(
        key=record.key,
        cursor=record.cursor,
        payload=None,
        reason="duplicate key: the query returned this key more than once in this "
        "run — make `key` unique (only the first row was used)",
    )
