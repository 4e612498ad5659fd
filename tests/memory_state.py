"""An in-memory state store for unit tests of the run core (`etl.run.ports.StatePort`).

It keeps what the real store keeps, as plain dicts, and logs every call so a
test can say what was read and written, and in which order.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etl.model import Shard, Watermark
from etl.state.store import LastSent, PendingReject, Rejected, Sent, StreamState

T0 = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


@dataclass
class MemoryState:
    """The state of one run in dicts; `calls` lists (method, stream, thread name)."""

    streams: dict[str, StreamState] = field(default_factory=dict)
    records: dict[tuple[str, str], Sent] = field(default_factory=dict)
    rejects: dict[tuple[str, str], PendingReject] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    commits: list[tuple[str, ...]] = field(default_factory=list)  # keys of each commit, in order
    fail_commits: BaseException | None = None  # raised by commit_batch when set

    def _called(self, method: str, stream: str) -> None:
        self.calls.append((method, stream, threading.current_thread().name))

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call[0] == method)

    # reads

    def stream(self, name: str) -> StreamState | None:
        self._called("stream", name)
        return self.streams.get(name)

    def rejected(self, stream: str | None = None) -> list[PendingReject]:
        self._called("rejected", stream or "")
        return [r for r in self.rejects.values() if stream is None or r.stream == stream]

    def last_sent(
        self, stream: str, keys: Sequence[str], *, with_payload: bool = False
    ) -> dict[str, LastSent]:
        self._called("last_sent", stream)
        out = {}
        for key in keys:
            sent = self.records.get((stream, key))
            if sent is not None:
                payload = sent.payload if with_payload else None
                out[key] = LastSent(sent.hash, payload, sent.source_hash, sent.event_id)
        return out

    def any_sent(self, stream: str) -> bool:
        self._called("any_sent", stream)
        return any(name == stream for name, _ in self.records)

    def sent_keys_unseen(self, stream: str, seen: Path) -> Iterator[str] | None:
        self._called("sent_keys_unseen", stream)
        return None  # no file to join with: the caller walks sent_keys

    def sent_keys(self, stream: str) -> Iterator[str]:
        self._called("sent_keys", stream)
        return iter([key for (name, key) in self.records if name == stream])

    # writes

    def commit_batch(
        self,
        stream: str,
        sent: Sequence[Sent],
        rejected: Sequence[Rejected] = (),
        *,
        clear_rejects: bool = True,
    ) -> None:
        self._called("commit_batch", stream)
        if self.fail_commits is not None:
            raise self.fail_commits
        self.commits.append(tuple(s.key for s in sent) + tuple(r.key for r in rejected))
        for s in sent:
            self.records[stream, s.key] = s
            if clear_rejects:
                self.rejects.pop((stream, s.key), None)
        for r in rejected:
            old = self.rejects.get((stream, r.key))
            self.rejects[stream, r.key] = PendingReject(
                stream=stream,
                key=r.key,
                key_values=tuple(r.key_values),
                event_id=r.event_id,
                message=r.message,
                attempts=old.attempts + 1 if old else 1,
                first_seen=old.first_seen if old else T0,
                last_seen=T0,
                kind=r.kind,
            )

    def forget_rejects(self, stream: str, keys: Sequence[str]) -> None:
        self._called("forget_rejects", stream)
        for key in keys:
            self.rejects.pop((stream, key), None)

    def save_checkpoint(
        self, stream: str, checkpoint: Sequence[Any] | None, since: Watermark | None = None
    ) -> None:
        self._called("save_checkpoint", stream)
        old = self.streams.get(stream)
        self.streams[stream] = StreamState(
            stream=stream,
            watermark=old.watermark if old else None,
            fingerprint=old.fingerprint if old else None,
            checkpoint=list(checkpoint) if checkpoint else None,
            updated_at=T0,
            checkpoint_since=since if checkpoint else None,
        )

    def save_watermark(
        self,
        stream: str,
        watermark: Watermark | None,
        fingerprint: str,
        *,
        related: dict[str, Watermark | None] | None = None,
        full_read: bool = False,
    ) -> None:
        self._called("save_watermark", stream)
        old = self.streams.get(stream)
        marks = {k: v for k, v in (related or {}).items() if v is not None}
        self.streams[stream] = StreamState(
            stream,
            watermark,
            fingerprint,
            None,
            T0,
            # the full_every clock compares with the real clock, as the real store's does
            full_read_at=dt.datetime.now(dt.UTC)
            if full_read
            else (old.full_read_at if old else None),
            first_run_at=(old.first_run_at if old else None) or dt.datetime.now(dt.UTC),
            related=marks if related is not None else (old.related if old else {}),
        )
        for name in [n for n in self.streams if n.startswith(f"{stream}~part")]:
            del self.streams[name]  # a parallel backfill's parts, as the real store

    def start_run(self, command: str, mode: str, *, shard: Shard | None = None) -> int | None:
        self.runs.append({"command": command, "mode": mode, "status": "running"})
        return len(self.runs)

    def finish_run(
        self,
        run_id: int | None,
        *,
        status: str,
        streams: list[dict[str, Any]],
        error: str | None,
    ) -> None:
        if run_id is not None:
            self.runs[run_id - 1].update(status=status, streams=streams, error=error)
