"""Keys sent before and no longer in the source, found by a full read (SPEC §9).

A full read passes over every row of the stream's source; `with_gone()` notes
each key it reads in a `SeenKeys` file, then walks the state store's keys of
the stream in chunks and asks the file which of them were not read: those are
*gone*. Memory stays flat: no set of every key is held, only one page or one
chunk at a time. The comparison is exact and needs no common sort order, so
the source database's collation and the state store's key order may differ
(a merge of two sorted streams would need both to sort alike).

With `on_gone`, a gone key's last-sent payload gets the `on_gone` traits merged
in and becomes a `gone` change to send, unless that very payload was already
sent (once per gone key). Its row is gone, so no row digest is stored with it:
a key that comes back maps to a different payload and is sent as a change.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from etl.model import Change, Record
from etl.run.classify import ClassifiedPage, Counts
from etl.run.diff import fingerprint
from etl.run.plan import StreamPlan
from etl.run.ports import StatePort
from etl.run.transform import canonical

CHUNK = 5000  # state keys asked about at a time


class SeenKeys:
    """The keys a full read met, in a private temporary SQLite file.

    A class for the file it owns; `close()` deletes it. Only the thread that
    reads the pages writes to it; the lookups come after the last page.
    """

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="etl-seen-", suffix=".db")  # mode 0600
        os.close(handle)
        self._path = Path(name)
        self._db = sqlite3.connect(name, check_same_thread=False)
        self._lock = threading.Lock()
        # a scratch file: nothing to recover after a crash, so no journal or fsync
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, keys: list[str]) -> None:
        """Note the keys of one page."""
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((k,) for k in keys))

    def missing(self, keys: list[str]) -> list[str]:
        """Those of `keys` that were not seen, in the order given."""
        if not keys:
            return []
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
                part = keys[start : start + 500]
                marks = ",".join("?" * len(part))
                query = f"SELECT key FROM seen WHERE key IN ({marks})"
                found.update(row[0] for row in self._db.execute(query, part))
        return [key for key in keys if key not in found]

    @property
    def path(self) -> Path:
        """The file, once `written()`: another connection may read its table `seen`."""
        return self._path

    def written(self) -> None:
        """Commit the keys noted so far, for another connection to read the file."""
        with self._lock:
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with contextlib.suppress(OSError):
            self._path.unlink()


def with_gone(
    pages: Iterator[ClassifiedPage],
    *,
    plan: StreamPlan,
    state: StatePort,
    counts: Counts,
    stop: threading.Event,
) -> Iterator[ClassifiedPage]:
    """`pages`, then (when the read ran to its end) one page of `gone` changes per
    chunk of gone keys. Counts every gone key in `counts.gone`. A stream with no
    key sent before this read (a first backfill) has nothing that can be gone:
    every key in the state store then was sent by this read, so was read."""
    if not state.any_sent(plan.mapping.stream):
        yield from pages
        return
    seen = SeenKeys()
    try:
        for page in pages:
            seen.add([key for key, _ in page.keyed])
            yield page
        if stop.is_set():
            return  # a stopped read is not a full read: nothing is gone
        seen.written()
        # A SQLite store answers in one anti-join (C speed, no key of this read comes
        # back); another walks every key it holds and asks the file by chunks.
        unseen = state.sent_keys_unseen(plan.mapping.stream, seen.path)
        keys = state.sent_keys(plan.mapping.stream) if unseen is None else unseen
        if plan.shard is not None:  # another shard's (or part's) keys are its own to judge
            keys = (key for key in keys if plan.owns(key))
        for chunk in _chunks(keys):
            gone = seen.missing(chunk) if unseen is None else chunk
            if gone:
                counts.gone += len(gone)
                yield ClassifiedPage(iter(_gone_changes(gone, plan=plan, state=state)), [], ())
    finally:
        seen.close()


def _chunks(keys: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _gone_changes(
    keys: list[str], *, plan: StreamPlan, state: StatePort
) -> list[tuple[Change, tuple[Any, ...], str]]:
    """One `gone` change per key; with `on_gone`, the payload to send (None when the
    gone payload was sent already, or without on_gone)."""
    mapping = plan.mapping
    n_keys = len(mapping.key)
    last = state.last_sent(mapping.stream, keys, with_payload=True) if mapping.on_gone else {}
    out: list[tuple[Change, tuple[Any, ...], str]] = []
    for key in keys:
        row = _key_values(key, n_keys)
        previous = last.get(key)
        if previous is None or previous.payload is None:
            out.append((Change(kind="gone", record=Record(key, None, None)), row, ""))
            continue
        payload: dict[str, Any] = orjson.loads(previous.payload)
        payload["traits"] = {**payload.get("traits", {}), **dict(mapping.on_gone)}
        body = canonical(payload)
        digest = fingerprint(body)
        if digest == previous.hash:  # sent as gone before: once per gone key
            out.append((Change(kind="gone", record=Record(key, None, None)), row, ""))
            continue
        record = Record(key=key, cursor=None, payload=payload, canonical=body)
        change = Change(
            kind="gone",
            record=record,
            hash=digest,
            old=orjson.loads(previous.payload),
            previous_event_id=previous.event_id,
        )
        out.append((change, row, ""))
    return out


def _key_values(key: str, n_keys: int) -> tuple[Any, ...]:
    """A record key's column values, as far as its text tells (composite keys are
    JSON arrays): kept with a refused gone event, whose row cannot be re-read."""
    if n_keys == 1:
        return (key,)
    try:
        values = orjson.loads(key)
    except orjson.JSONDecodeError:
        return (key,) * n_keys
    return tuple(values) if isinstance(values, list) else (key,) * n_keys
