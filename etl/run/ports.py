"""What the run core needs from the state store, as a `Protocol`.

`etl.state.store.StateStore` is the real one; the unit tests of the run core
pass an in-memory one. Pure: types only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from etl.model import Shard, Watermark
from etl.state.store import (
    LastSent,
    LedgerEntry,
    PendingReject,
    Rejected,
    Sent,
    StreamState,
    TrackState,
)


class StatePort(Protocol):
    """The state reads and writes of one run (SPEC §7: writes only after an ack)."""

    def stream(self, name: str) -> StreamState | None:
        """What is known of a stream (watermark, mapping fingerprint, checkpoint)."""
        ...

    def rejected(self, stream: str | None = None) -> list[PendingReject]:
        """Pending rejects of a stream (or all streams), oldest first."""
        ...

    def last_sent(
        self, stream: str, keys: Sequence[str], *, with_payload: bool = False
    ) -> dict[str, LastSent]:
        """What was last acknowledged for these keys (one page of them)."""
        ...

    def any_sent(self, stream: str) -> bool:
        """Whether any key of the stream was ever acknowledged."""
        ...

    def sent_keys_unseen(self, stream: str, seen: Path) -> Iterator[str] | None:
        """Keys sent before and not in the key file `seen`, or None: walk sent_keys."""
        ...

    def sent_keys(self, stream: str) -> Iterator[str]:
        """Every key ever acknowledged for a stream."""
        ...

    def commit_batch(
        self,
        stream: str,
        sent: Sequence[Sent],
        rejected: Sequence[Rejected] = (),
        *,
        clear_rejects: bool = True,
    ) -> None:
        """Record one acknowledged batch, in one transaction."""
        ...

    def forget_rejects(self, stream: str, keys: Sequence[str]) -> None:
        """Drop pending rejects that need no retry."""
        ...

    def save_checkpoint(
        self, stream: str, checkpoint: Sequence[Any] | None, since: Watermark | None = None
    ) -> None:
        """Remember the last key a backfill had everything acknowledged up to, and the
        safe horizon its pages were read under."""
        ...

    def save_watermark(
        self,
        stream: str,
        watermark: Watermark | None,
        fingerprint: str,
        *,
        related: dict[str, Watermark | None] | None = None,
        full_read: bool = False,
    ) -> None:
        """Advance a stream after all of it was delivered (clears its checkpoint), with
        its related tables' watermarks; `full_read` restarts the full_every clock."""
        ...

    def start_run(self, command: str, mode: str, *, shard: Shard | None = None) -> int | None:
        """Open a run record (None when the store is read-only)."""
        ...

    def finish_run(
        self,
        run_id: int | None,
        *,
        status: str,
        streams: list[dict[str, Any]],
        error: str | None,
    ) -> None:
        """Close a run record with its status and per-stream counts."""
        ...


@runtime_checkable
class TrackStatePort(StatePort, Protocol):
    """What a track stream (SPEC §10) needs besides: its start, floor and backfill,
    and the ledger of keys it sent."""

    def track(self, name: str) -> TrackState | None:
        """The track state of a stream or shard, None before its first run."""
        ...

    def save_track(self, state: TrackState) -> None:
        """Write a stream's track state whole."""
        ...

    def save_backfill_checkpoint(self, name: str, checkpoint: Sequence[Any]) -> None:
        """A track backfill's position up to which everything was acknowledged."""
        ...

    def ledger(
        self, stream: str, keys: Sequence[str], *, with_payload: bool = False
    ) -> dict[str, LastSent]:
        """Which of these keys the stream sent and still remembers."""
        ...

    def commit_track_batch(
        self,
        stream: str,
        owner: str,
        sent: Sequence[LedgerEntry],
        rejected: Sequence[Rejected] = (),
    ) -> None:
        """Record one acknowledged batch of track events, in one transaction."""
        ...

    def prune_ledger(self, stream: str, owner: str, *, below: str, at_least: str = "") -> int:
        """Forget `owner`'s keys positioned in [at_least, below); how many."""
        ...
