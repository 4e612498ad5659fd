"""The only place the stages meet: mapping -> extract -> transform -> diff -> load -> state.

`run()` takes a list of mappings and the collaborators (source engine, state
store, HTTP client) and returns a RunReport; `run_stream()` does one stream.
The same code path serves `sync`, `backfill` and the dry run (`diff`), so the
dry run reads and diffs exactly what a sync would, and only skips the sending
and the writing. What happens to the rows once read is `flow.StreamFlow`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
from sqlalchemy.engine import Connection

from etl.errors import EtlError, QueryError, SourceError, StoppedError
from etl.model import (
    DiffReport,
    DiffStream,
    Mapping,
    RunReport,
    StreamReport,
    Watermark,
)
from etl.run.flow import StreamFlow, Tally
from etl.run.options import Collaborators, RunOptions
from etl.source import extract
from etl.source.check import explain_failure
from etl.source.horizon import lower_bound, safe_horizon
from etl.state.store import StateStore

log = structlog.get_logger("etl")


def run(
    mappings: Sequence[Mapping], *, command: str, options: RunOptions, io: Collaborators
) -> tuple[RunReport, DiffReport | None]:
    """Run every stream in order (accounts first: mapping.py sorted them)."""
    state = io.state
    run_id = (
        None if options.dry_run else state.start_run(command, options.mode, shard=options.shard)
    )
    reports: list[StreamReport] = []
    diffs: list[DiffStream] = []
    status: Literal["ok", "partial", "failed"] = "ok"
    try:
        for mapping in mappings:
            report, diff = run_stream(mapping, options=options, io=io)
            reports.append(report)
            if diff is not None:
                diffs.append(diff)
    except EtlError as exc:
        state.finish_run(run_id, status="failed", streams=_run_streams(reports), error=str(exc))
        raise
    except BaseException as exc:
        state.finish_run(
            run_id, status="failed", streams=_run_streams(reports), error=type(exc).__name__
        )
        raise
    if any(r.invalid or r.rejected for r in reports):
        status = "partial"
    state.finish_run(run_id, status=status, streams=_run_streams(reports), error=None)
    diff_report = (
        DiffReport(
            mode="incremental" if options.mode == "incremental" else "full", streams=tuple(diffs)
        )
        if options.dry_run
        else None
    )
    return RunReport(
        run_id=run_id, command=command, streams=tuple(reports), status=status
    ), diff_report


def _run_streams(reports: list[StreamReport]) -> list[dict[str, Any]]:
    return [
        {
            "stream": r.stream,
            **r.counts(),
            "watermark": r.watermark,
            "seconds": round(r.seconds, 3),
            "invalid_records": [list(x) for x in r.invalid_records[:100]],
            "rejected_records": [list(x) for x in r.rejected_records[:100]],
        }
        for r in reports
    ]


def run_stream(
    mapping: Mapping, *, options: RunOptions, io: Collaborators
) -> tuple[StreamReport, DiffStream | None]:
    """One stream: read what may have changed, diff it, send it, remember it."""
    try:
        return _run_stream(mapping, options=options, io=io)
    except QueryError as exc:
        raise explain_failure(io.source, mapping, exc) from None


def _run_stream(
    mapping: Mapping, *, options: RunOptions, io: Collaborators
) -> tuple[StreamReport, DiffStream | None]:
    started = time.monotonic()
    bound = log.bind(stream=mapping.stream)
    # A shard keeps its own watermark and checkpoint; records and rejects are
    # shared (each key belongs to exactly one shard).
    state_name = f"{mapping.stream}#{options.shard.label}" if options.shard else mapping.stream
    previous = io.state.stream(state_name)
    plan = _plan(mapping, previous, options, bound)
    full = plan.order == "key" or plan.since is None
    checkpoint = (
        previous.checkpoint
        if options.mode == "backfill" and previous and not options.restart
        else None
    )
    if checkpoint:
        bound.info("backfill.resume", after=checkpoint)
    tally = Tally()
    with (
        io.source.connect() as conn,
        extract.read_only(conn, snapshot=options.mode != "backfill", timezone=mapping.timezone),
    ):
        src = _source_from(conn, mapping)
        horizon = safe_horizon(conn, mapping, src, max_transaction_age=options.max_transaction_age)
        for note in horizon.notes:
            # once a run, not once a stream: the cause is the role, not the stream
            kind = re.sub(r"[0-9]+", "#", note)
            if kind not in io.noted:
                io.noted.add(kind)
                bound.warning("horizon.limited", note=note)
        total = extract.estimate_rows(conn, mapping, src) if io.progress else None
        null_cursor = extract.count_null_cursors(conn, mapping, src) if options.dry_run else None
        # closing(): whatever happens below, the prefetch thread is stopped (and
        # off the connection) before the read-only transaction is rolled back.
        with contextlib.closing(
            _pages(
                conn,
                mapping,
                src,
                plan=plan,
                now=horizon.clock,
                after=checkpoint,
                options=options,
                state=io.state,
            )
        ) as pages:
            flow = StreamFlow(
                mapping=mapping,
                options=options,
                io=io,
                tally=tally,
                total=total,
                state_name=state_name,
            )
            flow.had_rejects = bool(io.state.rejected(mapping.stream))
            if plan.order == "cursor":
                # _pages() re-reads these first; a row also in the cursor window comes twice.
                flow.retrying = {
                    r["key"] for r in io.state.rejected(mapping.stream) if flow.owns(r["key"])
                }
            if options.dry_run:
                flow.dry_run(pages, list_gone=options.mode == "full")
                stats = None
            else:
                stats = flow.deliver(pages)
    if io.stop.is_set():
        raise StoppedError(
            f"stream {mapping.stream}: stopped by a signal after the in-flight batches were "
            "acknowledged; state is consistent — run the same command again to continue"
        )
    watermark = horizon.value if horizon.value is not None else None
    if not options.dry_run:
        flow.settle_rejects(bound)
        io.state.save_watermark(state_name, watermark, mapping.fingerprint)
    report = StreamReport(
        stream=mapping.stream,
        event_type=mapping.event_type,
        read=tally.read,
        new=tally.new,
        changed=tally.changed,
        unchanged=tally.unchanged,
        invalid=tally.invalid,
        rejected=tally.rejected,
        sent=stats.sent if stats else 0,
        batches=stats.batches if stats else 0,
        retries=stats.retries if stats else 0,
        gone=tally.gone,
        null_cursor=null_cursor,
        watermark=_iso(watermark),
        seconds=time.monotonic() - started,
        full=full,
        invalid_records=tuple(tally.invalid_records),
        rejected_records=tuple(tally.rejected_records),
    )
    bound.info(
        "stream.done",
        read=report.read,
        new=report.new,
        changed=report.changed,
        unchanged=report.unchanged,
        invalid=report.invalid,
        rejected=report.rejected,
        sent=report.sent,
        batches=report.batches,
        retries=report.retries,
        watermark=report.watermark,
        seconds=round(report.seconds, 3),
        mode="full" if full else "incremental",
        dry_run=options.dry_run,
    )
    diff = None
    if options.dry_run:
        counts = {k: v for k, v in report.counts().items() if k not in ("rejected", "sent")}
        counts["null_cursor"] = null_cursor or 0
        diff = DiffStream(
            stream=mapping.stream,
            event_type=mapping.event_type,
            counts=counts,
            records=tuple(tally.diff_records),
            truncated=tally.truncated,
        )
    return report, diff


@dataclass(frozen=True)
class _Plan:
    """How a stream is read this time.

    `order="key"`: every row, NULL cursors included (`--full`, `backfill`, a
    mapping without a cursor). `order="cursor"`: rows whose cursor is at or
    above `since - lookback`; with `since=None` every row that has a cursor
    (the first run, or the mapping changed) — incremental sync never sees NULL
    cursors (SPEC §5).
    """

    order: extract.Order
    since: Watermark | None


def _plan(mapping: Mapping, previous: Any, options: RunOptions, bound: Any) -> _Plan:
    if options.mode != "incremental" or mapping.cursor is None:
        return _Plan(order="key", since=None)
    if previous is None or previous.watermark is None:
        return _Plan(order="cursor", since=None)
    if previous.fingerprint and previous.fingerprint != mapping.fingerprint:
        # SPEC §5: old rows must be re-mapped with the new definition.
        bound.info("stream.mapping_changed", action="full diff")
        return _Plan(order="cursor", since=None)
    return _Plan(order="cursor", since=previous.watermark)


def _source_from(conn: Connection, mapping: Mapping) -> Any:
    try:
        return extract.source_from(conn, mapping)
    except Exception as exc:
        orig = getattr(exc, "orig", exc)
        raise SourceError(
            f"{mapping.path}: stream {mapping.stream}: cannot read the source: "
            f"{str(orig).strip().splitlines()[0] if str(orig) else type(orig).__name__} — "
            "check source.table / source.query (etl validate --check-source)"
        ) from None


def _pages(
    conn: Connection,
    mapping: Mapping,
    src: Any,
    *,
    plan: _Plan,
    now: dt.datetime | None,
    after: Sequence[Any] | None,
    options: RunOptions,
    state: StateStore,
) -> Generator[list[tuple[Any, ...]], None, None]:
    """Rows to consider: earlier rejects first (re-read by key), then the pages."""
    if plan.order == "key":
        yield from extract.prefetch(
            extract.read_pages(
                conn, mapping, src, order="key", after=after, page_size=options.page_size
            )
        )
        return
    keys = [orjson.loads(r["key_values"]) for r in state.rejected(mapping.stream)]
    for start in range(0, len(keys), options.page_size):
        rows = extract.read_keys(conn, mapping, src, keys[start : start + options.page_size])
        if rows:
            yield rows
    lower = lower_bound(conn, mapping, plan.since, now=now) if plan.since is not None else None
    yield from extract.prefetch(
        extract.read_pages(
            conn, mapping, src, order="cursor", lower=lower, page_size=options.page_size
        )
    )


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)
