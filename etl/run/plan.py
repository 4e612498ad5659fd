"""How one stream is read and turned into events this time: a frozen `StreamPlan`.

Built once per stream from the mapping, what the state store knows of the
stream and the run's options; everything after it only reads it. Pure: no
connection, no clock, no logging.
"""

from __future__ import annotations

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

    @property
    def full(self) -> bool:
        """Every row is considered (not only those past the watermark)."""
        return self.order == "key" or self.since is None

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
) -> StreamPlan:
    """The plan of one stream, from what the state store knows of it (`previous`)."""
    shard = options.shard
    order, since, changed = _read_bounds(mapping, previous, options)
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
    )


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
