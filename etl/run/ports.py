"""What the run core needs from the state store, as a `Protocol`.

`etl.state.store.StateStore` is the real one; the unit tests of the run core
pass an in-memory one. Pure: types only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from etl.model import Shard, Watermark
from etl.state.store import LastSent, PendingReject, Rejected, Sent, StreamState


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

    def save_checkpoint(self, stream: str, checkpoint: Sequence[Any] | None) -> None:
        """Remember the last key a backfill had everything acknowledged up to."""
        ...

    def save_watermark(self, stream: str, watermark: Watermark | None, fingerprint: str) -> None:
        """Advance a stream after all of it was delivered (clears its checkpoint)."""
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
