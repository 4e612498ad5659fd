"""How one stream is read and turned into events this time: a frozen `StreamPlan`.

Built once per stream from the mapping, what the state store knows of the
stream and the run's options; everything after it only reads it. Pure: no
connection, no clock, no logging.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from etl.model import Mapping, Record, Shard, Watermark
from etl.run.options import RunOptions
from etl.run.transform import TRANSFORM_VERSION, EventContext, make_transformer
from etl.source.extract import Order
from etl.state.store import StreamState


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """One stream's read order and bounds, and what its rows become.

    `order="key"`: every row, NULL cursors included (`--full`, `backfill`, a
    mapping without a cursor), after `checkpoint` when a backfill resumes.
    `order="cursor"`: rows whose cursor is at or above `since - lookback`; with
    `since=None` every row that has a cursor (the first run, or the mapping
    changed) — incremental sync never sees NULL cursors (SPEC §5).
    """

    mapping: Mapping
    # A shard keeps its own watermark and checkpoint under this name; records
    # and rejects are shared (each key belongs to exactly one shard).
    state_name: str
    order: Order
    since: Watermark | None
    checkpoint: tuple[Any, ...] | None
    mapping_changed: bool  # the stored fingerprint differs: every row is re-mapped
    context: EventContext
    transform: Callable[[Sequence[Any]], Record]
    # Salt of the row digests: a new mapping or a new transform re-maps every row.
    salt: bytes
    # Only a `query:` source can repeat a key; a table key is unique by declaration.
    duplicates_possible: bool
    shard: Shard | None
    force: bool  # send (and so transform) records even when unchanged
    dry_run: bool
    backfill: bool  # save a checkpoint as pages are acknowledged
    # A resumed backfill: the safe horizon the pages before `checkpoint` were read
    # under. The stream's watermark must not pass it (what changed since was read).
    checkpoint_since: Watermark | None = None
    full_every_due: bool = False  # a sync made a full read by `full_every` (SPEC §9)

    @property
    def full(self) -> bool:
        """Every row is considered (not only those past the watermark)."""
        return self.order == "key" or self.since is None

    @property
    def full_read(self) -> bool:
        """A full read in SPEC §9's sense once it reads to its end: every row in key
        order, NULL cursors included (`--full`, `full_every`, a backfill, a mapping
        without a cursor). Restarts the `full_every` clock."""
        return self.order == "key"

    @property
    def finds_gone(self) -> bool:
        """Gone keys are found when the whole pass is this run's: a backfill resumed
        after a checkpoint read only part of the keys."""
        return self.full_read and self.checkpoint is None

    def owns(self, key: str) -> bool:
        """Whether this worker handles the record (always, without a shard)."""
        return self.shard is None or self.shard.owns(key, composite=len(self.mapping.key) > 1)


def plan_stream(
    mapping: Mapping,
    previous: StreamState | None,
    *,
    options: RunOptions,
    api_key: str,
    workspace_key: str,
    now: dt.datetime | None = None,
) -> StreamPlan:
    """The plan of one stream, from what the state store knows of it (`previous`);
    `now` (the state side's clock) decides whether `full_every` is due."""
    shard = options.shard
    order, since, changed = _read_bounds(mapping, previous, options)
    due = order == "cursor" and since is not None and full_every_due(mapping, previous, now)
    if due:
        order, since = "key", None
    checkpoint = (
        tuple(previous.checkpoint)
        if options.mode == "backfill" and previous and previous.checkpoint and not options.restart
        else None
    )
    context = EventContext(
        event_type=mapping.event_type, api_key=api_key, workspace_key=workspace_key
    )
    return StreamPlan(
        mapping=mapping,
        state_name=state_name_of(mapping, shard),
        order=order,
        since=since,
        checkpoint=checkpoint,
        mapping_changed=changed,
        context=context,
        transform=make_transformer(mapping, context),
        salt=f"{TRANSFORM_VERSION}:{mapping.fingerprint}:".encode(),
        duplicates_possible=mapping.source.query is not None,
        shard=shard,
        force=options.force,
        dry_run=options.dry_run,
        backfill=options.mode == "backfill",
        full_every_due=due,
        checkpoint_since=previous.checkpoint_since if checkpoint and previous else None,
    )


def full_every_due(mapping: Mapping, previous: StreamState | None, now: dt.datetime | None) -> bool:
    """Whether the stream's last full read (else its first run) is older than
    `full_every` (SPEC §9). The clock starts at a stream's first run, so a first
    sync is not made a full read by it."""
    if mapping.full_every_seconds is None or previous is None or now is None:
        return False
    clock = previous.full_clock
    if clock is None:
        return False
    return (now - clock).total_seconds() >= mapping.full_every_seconds


def state_name_of(mapping: Mapping, shard: Shard | None) -> str:
    """The name a stream's watermark and checkpoint are kept under (per shard)."""
    return f"{mapping.stream}#{shard.label}" if shard else mapping.stream


def _read_bounds(
    mapping: Mapping, previous: StreamState | None, options: RunOptions
) -> tuple[Order, Watermark | None, bool]:
    """(order, since, mapping changed) of this run's read."""
    if options.mode != "incremental" or mapping.cursor is None:
        return "key", None, False
    if previous is None or previous.watermark is None:
        return "cursor", None, False
    if previous.fingerprint and previous.fingerprint != mapping.fingerprint:
        # SPEC §5: old rows must be re-mapped with the new definition.
        return "cursor", None, True
    return "cursor", previous.watermark, False
