"""The only place the stages meet: mapping -> extract -> classify -> send -> ledger -> state.

`run()` takes a list of mappings and the collaborators (source engine, state
store, HTTP client) and returns a RunReport; `run_stream()` does one stream:
its `plan`, the pages `extract` reads, `classify` (transform and diff), then
`send` with the `ledger` recording what was acknowledged, or a dry run's
`collect`. The same code path serves `sync`, `backfill` and the dry run
(`diff`), so the dry run reads and diffs exactly what a sync would, and only
skips the sending and the writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from structlog.typing import FilteringBoundLogger

from etl.errors import (
    EtlError,
    QueryError,
    SourceError,
    SourceLostError,
    StateError,
    StoppedError,
    UsageError,
)
from etl.model import (
    DeliveryStats,
    DiffReport,
    DiffStream,
    Mapping,
    RunReport,
    RunStatus,
    StreamReport,
    Watermark,
)
from etl.run.classify import (
    MAX_LISTED,
    ClassifiedPage,
    Counts,
    DuplicateKeys,
    RetriedRejects,
    Row,
    classify,
)
from etl.run.ledger import Ledger
from etl.run.options import Collaborators, Progress, RunOptions
from etl.run.plan import StreamPlan, plan_stream, state_name_of
from etl.run.send import send
from etl.run.transform import record_key
from etl.source import extract, resume
from etl.source.check import explain_failure
from etl.source.errors import SOURCE_ERRORS, driver_line, is_bad_query, source_error, translated
from etl.source.horizon import Horizon, lower_bound, safe_horizon
from etl.state.store import StreamState

# Imported where used: track streams, worker processes, full reads that find gone
# keys and dry runs are not every run's, and a no-change sync pays every import
# (~25 ms for these four and what they pull in: docs/performance.md, "Fixed cost").
if TYPE_CHECKING:
    from etl.run import parallel
    from etl.run.dryrun import DryRun

log: FilteringBoundLogger = structlog.get_logger("etl")


def run(
    mappings: Sequence[Mapping], *, command: str, options: RunOptions, io: Collaborators
) -> tuple[RunReport, DiffReport | None]:
    """Run every stream in order (accounts first: mapping.py sorted them)."""
    state = io.state
    if any(m.track is not None for m in mappings):
        from etl.run.track import check_track_run  # noqa: PLC0415 - see TYPE_CHECKING above

        check_track_run(mappings, options, io)
    run_id = (
        None if options.dry_run else state.start_run(command, options.mode, shard=options.shard)
    )
    reports: list[StreamReport] = []
    diffs: list[DiffStream] = []
    status: RunStatus = "ok"
    try:
        for mapping in mappings:
            report, diff = run_stream(mapping, options=options, io=io)
            reports.append(report)
            if diff is not None:
                diffs.append(diff)
    except EtlError as exc:
        error = _streams_done(exc, reports) if isinstance(exc, SourceError) else exc
        # A run that lost its state connection cannot record its end; the next
        # run marks it abandoned. The error that stopped it is the one to show.
        with contextlib.suppress(StateError):
            state.finish_run(
                run_id, status="failed", streams=_run_streams(reports), error=str(error)
            )
        if error is exc:
            raise
        raise error from None
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


def _streams_done(error: SourceError, reports: list[StreamReport]) -> SourceError:
    """A source failure after the check before sending (a table dropped mid-run, a
    connection lost for good), with the streams this run had finished."""
    done = ", ".join(r.stream for r in reports) or "none"
    message = f"{error} (streams already done in this run: {done})"
    if isinstance(error, SourceLostError):
        return SourceLostError(message, detail=error.detail)
    return SourceError(message)


def _run_streams(reports: list[StreamReport]) -> list[dict[str, Any]]:
    return [
        {
            "stream": r.stream,
            **r.counts(),
            "watermark": r.watermark,
            "full_read": r.full_read,
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
    # a track stream has its own path: no diff, a ledger of keys sent (SPEC §10)
    one_stream = _run_stream
    if mapping.track is not None:
        from etl.run.track import run_track_stream  # noqa: PLC0415 - see TYPE_CHECKING above

        one_stream = run_track_stream
    try:
        # Any source error not already classified where it happened (opening the
        # snapshot, the horizon, closing) is classified here: never a traceback.
        with translated(where=f"{mapping.path}: stream {mapping.stream}", doing="reading"):
            return one_stream(mapping, options=options, io=io)
    except QueryError as exc:
        raise explain_failure(io.source, mapping, exc) from None


def _run_stream(
    mapping: Mapping, *, options: RunOptions, io: Collaborators
) -> tuple[StreamReport, DiffStream | None]:
    started = time.monotonic()
    bound = log.bind(stream=mapping.stream)
    plan, previous = _plan(mapping, options=options, io=io, bound=bound)
    rejects = io.state.rejected(mapping.stream)  # read once per stream
    # In cursor order the pending rejects are re-read first, by key; a row also in
    # the cursor window comes twice, and RetriedRejects keeps the first sighting.
    retries = (
        RetriedRejects(r.key for r in rejects if plan.owns(r.key))
        if plan.order == "cursor"
        else None
    )
    counts = Counts()
    ledger = Ledger(
        state=io.state,
        stream=mapping.stream,
        state_name=plan.state_name,
        n_keys=len(mapping.key),
        clear_rejects=bool(rejects),
        checkpoints=plan.backfill,
    )
    retry_keys = [r.key_values for r in rejects if retries is not None and r.key in retries.keys]
    parts, total = _parts(plan, options=options, io=io, bound=bound)
    if parts > 1:
        read = _read_in_parts(
            plan,
            parts,
            counts,
            ledger,
            clear_rejects=bool(rejects),
            total=total,
            previous=previous,
            options=options,
            io=io,
            bound=bound,
        )
    else:
        read = _read(
            plan,
            retry_keys,
            retries,
            counts,
            ledger,
            previous=previous,
            options=options,
            io=io,
            bound=bound,
        )
    if io.stop.is_set():
        raise StoppedError(
            f"stream {mapping.stream}: stopped by a signal after the in-flight batches were "
            "acknowledged; state is consistent — run the same command again to continue"
        )
    if not plan.dry_run:
        settled = retries.settled() if retries is not None else []
        if settled:
            io.state.forget_rejects(mapping.stream, settled)
            bound.info("rejects.settled", count=len(settled))
        # related watermarks with the stream's, after the stream succeeded (SPEC §9)
        io.state.save_watermark(
            plan.state_name,
            read.horizon.value,
            mapping.fingerprint,
            related=read.related_marks if mapping.related else None,
            full_read=plan.full_read,
        )
    report = _report(plan, counts, ledger, read, seconds=time.monotonic() - started)
    _log_done(bound, report, dry_run=plan.dry_run)
    return report, (_diff_stream(report, read.dry) if read.dry else None)


@dataclass(frozen=True, slots=True)
class _Read:
    """What reading (and sending) one stream came to, besides the counts."""

    horizon: Horizon
    null_cursor: int | None  # dry run: rows an incremental sync never sees
    stats: DeliveryStats
    dry: DryRun | None
    related_marks: dict[str, Watermark | None]  # each related entry's new watermark


def _read(
    plan: StreamPlan,
    retry_keys: Sequence[Sequence[Any]],
    retries: RetriedRejects | None,
    counts: Counts,
    ledger: Ledger,
    *,
    previous: StreamState | None,
    options: RunOptions,
    io: Collaborators,
    bound: FilteringBoundLogger,
    part: bool = False,
) -> _Read:
    """Read the stream in a read-only transaction, classify its rows, and send
    them (or collect a dry run's records) before the transaction ends. A lost
    connection is opened again (`resume`): before the first page the reading
    starts over, after it the pages resume where they were, in a new snapshot
    but under this horizon."""
    mapping = plan.mapping
    reopen = resume.Snapshot(
        engine=io.source,
        snapshot=not plan.backfill,
        timezone=mapping.timezone,
        sharded=plan.shard is not None,
    )

    def prepare(conn: Connection) -> _Prepared:
        """Everything read before the first page."""
        src = _source_from(conn, mapping)
        if options.shard is not None and not part:
            _check_shard_text(conn, mapping, src)
        horizon = safe_horizon(conn, mapping, src, max_transaction_age=options.max_transaction_age)
        return _Prepared(
            src=src,
            horizon=horizon,
            # a part's progress is summed by the parent, against its own estimate
            total=extract.estimate_rows(conn, mapping, src) if io.progress and not part else None,
            null_cursor=(extract.count_null_cursors(conn, mapping, src) if plan.dry_run else None),
            related=_related_reads(
                conn,
                mapping,
                plan=plan,
                previous=previous,
                now=horizon.clock,
                options=options,
                exclude=retries.keys if retries is not None else frozenset(),
            ),
        )

    # Duplicate keys are judged within one snapshot: a row read again after a
    # resume (its cursor moved past the position) is not a duplicate.
    duplicates = DuplicateKeys()
    with resume.open_snapshot(
        mapping, reopen=reopen, prepare=prepare, policy=options.reconnect, sleep=io.sleep
    ) as (conn, prepared):
        src, total = prepared.src, prepared.total
        horizon = _resumed(prepared.horizon, plan.checkpoint_since)
        ledger.since = horizon.value
        null_cursor, related = prepared.null_cursor, prepared.related
        if not part:  # a part's limits are noted once, by the parent
            _note_limits(horizon, io=io, bound=bound)
        related_first = (
            RetriedRejects(record_key(values) for values in related.keys) if related.keys else None
        )
        pages = _pages(
            conn,
            mapping,
            src,
            plan=plan,
            now=horizon.clock,
            retry_keys=retry_keys,
            related_keys=related.keys,
            options=options,
            io=io,
            reopen=reopen,
            on_resume=duplicates.forget,
        )
        # closing(): whatever happens below, the prefetch thread is stopped (and
        # off the connection) before the read-only transaction is rolled back.
        with contextlib.closing(pages):
            classified = classify(
                pages,
                plan=plan,
                state=io.state,
                counts=counts,
                retries=retries,
                related=related_first,
                with_payload=plan.dry_run,
                stop=io.stop,
                duplicates=duplicates,
            )
            if plan.finds_gone:
                from etl.run.gone import with_gone  # noqa: PLC0415 - see TYPE_CHECKING above

                classified = with_gone(
                    classified, plan=plan, state=io.state, counts=counts, stop=io.stop
                )
            if io.progress:
                classified = _reported(classified, counts, io.progress, mapping.stream, total)
            dry, stats = _act(classified, plan=plan, ledger=ledger, options=options, io=io)
    return _Read(
        horizon=horizon,
        null_cursor=null_cursor,
        stats=stats,
        dry=dry,
        related_marks=related.marks,
    )


def _parts(
    plan: StreamPlan, *, options: RunOptions, io: Collaborators, bound: FilteringBoundLogger
) -> tuple[int, int | None]:
    """Into how many worker processes this stream's read is split (1: read here),
    and the rows estimated (for progress): a full read of at least
    `options.parallel_min_rows` rows, when `options.workers` allows more than one,
    of a key whose text the database and etl hash alike (`key_text_disagrees`)."""
    if options.workers <= 1 or not plan.full_read:  # parallel.can_split's first test
        return 1, None
    from etl.run import parallel  # noqa: PLC0415 - see TYPE_CHECKING above

    if parallel.can_split(plan, io) is not None:
        return 1, None
    mapping = plan.mapping
    with (
        io.source.connect() as conn,
        extract.read_only(conn, snapshot=False, timezone=mapping.timezone),
    ):
        src = _source_from(conn, mapping)
        total = None
        if options.parallel_min_rows > 0 or io.progress is not None:
            total = extract.estimate_rows(conn, mapping, src)
            if total is None or total < options.parallel_min_rows:
                return 1, total
        differs = extract.key_text_disagrees(conn, mapping, src)
    if differs is not None:
        bound.warning(
            "stream.parallel_skipped",
            reason="the key's text differs between the database and etl (e.g. char(n) "
            "padding, a timestamp): read in one process — make the key text in a query: "
            "to split it",
            key=[str(v) for v in differs],
        )
        return 1, total
    bound.info("stream.parallel", workers=options.workers, rows_estimated=total)
    return options.workers, total


def _check_shard_text(conn: Connection, mapping: Mapping, src: sa.FromClause) -> None:
    """`--shard`: the database and etl must hash each key alike, or a shard would
    judge keys it never reads (gone) and miss keys it reads (SPEC §9)."""
    differs = extract.key_text_disagrees(conn, mapping, src)
    if differs is not None:
        raise UsageError(
            f"{mapping.path}: stream {mapping.stream}: --shard: the key "
            f"{[str(v) for v in differs]} is hashed differently by the database and by etl "
            "(its text differs: char(n) padding, a timestamp, a float) — select the key as "
            "text in a `query:` (e.g. CAST(TRIM(code) AS TEXT) AS code), or run without --shard"
        )


@dataclass(frozen=True, slots=True)
class _PartRead:
    """What one worker process's part of a stream came to (`parallel.PartResult`)."""

    read: _Read
    counts: Counts
    rejected: int
    rejected_records: list[tuple[str, str]]


def _read_in_parts(
    plan: StreamPlan,
    parts: int,
    counts: Counts,
    ledger: Ledger,
    *,
    clear_rejects: bool,
    total: int | None,
    previous: StreamState | None,
    options: RunOptions,
    io: Collaborators,
    bound: FilteringBoundLogger,
) -> _Read:
    """`_read`, split between `parts` worker processes (`run.parallel`): each reads,
    classifies, sends and records its part; their counts, ledgers and horizons are
    merged here into `counts`, `ledger` and one `_Read` (the earliest horizon: the
    watermark must not pass what any part's snapshot saw)."""
    from etl.run import parallel  # noqa: PLC0415 - see TYPE_CHECKING above

    mapping = plan.mapping

    def work(part: parallel.Part) -> _PartRead:
        part_counts = Counts()
        part_ledger = Ledger(
            state=part.io.state,
            stream=mapping.stream,
            state_name=part.plan.state_name,
            n_keys=len(mapping.key),
            clear_rejects=clear_rejects,
            checkpoints=part.plan.backfill,
        )
        read = _read(
            part.plan,
            (),
            None,
            part_counts,
            part_ledger,
            previous=previous,
            options=options,
            io=part.io,
            bound=bound,
            part=True,
        )
        return _PartRead(read, part_counts, part_ledger.rejected, part_ledger.rejected_records)

    progress = io.progress
    results = parallel.read_in_parts(
        plan,
        parts=parts,
        work=work,
        options=options,
        io=io,
        on_progress=(lambda n: progress(mapping.stream, n, total)) if progress else None,
    )
    reads = [r.result for r in results]
    for part in reads:
        counts.merge(part.counts)
        ledger.rejected += part.rejected
        room = MAX_LISTED - len(ledger.rejected_records)
        ledger.rejected_records.extend(part.rejected_records[: max(0, room)])
    if any(r.stopped for r in results):
        io.stop.set()  # a part stopped early (signalled): the stream is not read to its end
    bound.info(
        "stream.parts",
        workers=parts,
        read=[p.counts.read for p in reads],
        peak_rss_mb=[r.peak_rss_mb for r in results],
        parent_rss_mb=parallel.peak_rss_mb(),
    )
    horizon = _earliest([p.read.horizon for p in reads])
    _note_limits(horizon, io=io, bound=bound)
    return _Read(
        horizon=horizon,
        null_cursor=None,
        stats=DeliveryStats(
            sent=sum(p.read.stats.sent for p in reads),
            rejected=sum(p.read.stats.rejected for p in reads),
            batches=sum(p.read.stats.batches for p in reads),
            requests=sum(p.read.stats.requests for p in reads),
            retries=sum(p.read.stats.retries for p in reads),
        ),
        dry=None,
        related_marks=_earliest_marks([p.read.related_marks for p in reads]),
    )


def _earliest(horizons: list[Horizon]) -> Horizon:
    """The horizon of the part whose snapshot saw least (None: no part saw a cursor),
    with every part's notes."""
    seen = [h for h in horizons if h.value is not None]
    earliest = min(seen, key=lambda h: _order(h.value)) if seen else horizons[0]
    notes = tuple(dict.fromkeys(n for h in horizons for n in h.notes))
    return dataclasses.replace(earliest, notes=notes)


def _earliest_marks(marks: list[dict[str, Watermark | None]]) -> dict[str, Watermark | None]:
    """Each related entry's earliest watermark over the parts (None: no part saw one)."""
    labels = dict.fromkeys(label for part in marks for label in part)
    out: dict[str, Watermark | None] = {}
    for label in labels:
        seen = [m for part in marks if (m := part.get(label)) is not None]
        out[label] = min(seen, key=_order) if seen else None
    return out


def _order(value: Watermark | None) -> Any:
    """A watermark as min() may compare it (all of one stream's are of one kind)."""
    return value


def _resumed(horizon: Horizon, since: Watermark | None) -> Horizon:
    """A resumed backfill's horizon: no later than the one its checkpointed pages were
    read under, or a row changed between the two runs, below the checkpoint, would
    be neither read again nor left above the watermark."""
    if since is None or (horizon.value is not None and _order(horizon.value) <= _order(since)):
        return horizon
    return dataclasses.replace(horizon, value=since)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What is read of a stream before its first page, in the snapshot it is read in."""

    src: sa.FromClause
    horizon: Horizon
    total: int | None  # progress: rows to read, estimated
    null_cursor: int | None  # dry run: rows an incremental sync never sees
    related: RelatedReads  # the keys related tables named, and their marks


def _report(
    plan: StreamPlan, counts: Counts, ledger: Ledger, read: _Read, *, seconds: float
) -> StreamReport:
    """The stream's canonical summary (SPEC §3)."""
    mapping, stats = plan.mapping, read.stats
    return StreamReport(
        stream=mapping.stream,
        event_type=mapping.event_type,
        read=counts.read,
        new=counts.new,
        changed=counts.changed,
        unchanged=counts.unchanged,
        invalid=counts.invalid,
        rejected=ledger.rejected,
        sent=stats.sent,
        batches=stats.batches,
        retries=stats.retries,
        gone=counts.gone,
        null_cursor=read.null_cursor,
        watermark=_iso(read.horizon.value),
        seconds=seconds,
        full=plan.full,
        full_read=plan.full_read and not plan.dry_run,
        invalid_records=tuple(counts.invalid_records),
        rejected_records=tuple(ledger.rejected_records),
    )


def _plan(
    mapping: Mapping, *, options: RunOptions, io: Collaborators, bound: FilteringBoundLogger
) -> tuple[StreamPlan, StreamState | None]:
    """The stream's plan, from what the state store knows of it; logs what it decided."""
    previous = io.state.stream(state_name_of(mapping, options.shard))
    plan = plan_stream(
        mapping,
        previous,
        options=options,
        api_key=io.identity.api_key,
        workspace_key=io.identity.workspace_key,
        now=dt.datetime.now(dt.UTC),
    )
    if plan.mapping_changed:
        bound.info("stream.mapping_changed", action="full diff")
    if plan.full_every_due and previous is not None:
        last = previous.full_read_at
        bound.info(
            "stream.full_read",
            reason="full_every",
            last_full_read=last.isoformat() if last else None,
        )
    if plan.checkpoint:
        bound.info("backfill.resume", after=list(plan.checkpoint))
    return plan, previous


@dataclass(frozen=True)
class RelatedReads:
    """What a stream's `related:` tables said this run: the stream keys to re-read
    (distinct key values, in the stream's key layout) and each entry's new watermark."""

    keys: list[tuple[Any, ...]]
    marks: dict[str, Watermark | None]


def _related_reads(
    conn: Connection,
    mapping: Mapping,
    *,
    plan: StreamPlan,
    previous: StreamState | None,
    now: dt.datetime | None,
    options: RunOptions,
    exclude: frozenset[str],
) -> RelatedReads:
    """Read each related table incrementally for keys only (SPEC §9).

    Each entry's watermark is its own safe horizon, taken in this snapshot. An
    entry without a watermark yet (new), or a read that considers every row
    anyway (a full read, a first run, a re-map), reads no keys: it only starts
    its watermark. Keys are deduplicated across entries; `exclude` (pending
    rejects, re-read anyway) are left out.
    """
    if not mapping.related:
        return RelatedReads([], {})
    marks: dict[str, Watermark | None] = {}
    keys: list[tuple[Any, ...]] = []
    seen: set[str] = set(exclude)
    known = previous.related if previous is not None else {}
    for related in mapping.related:
        as_stream = extract.related_mapping(mapping, related)
        src = extract.related_from(conn, related)
        mark = safe_horizon(
            conn, as_stream, src, max_transaction_age=options.max_transaction_age
        ).value
        marks[related.label] = mark
        before = known.get(related.label)
        if plan.order != "cursor" or plan.since is None or before is None:
            continue
        lower = lower_bound(conn, as_stream, before, now=now)
        for page in extract.read_related_keys(
            conn, mapping, related, src, lower=lower, page_size=options.page_size
        ):
            for values in page:
                key = record_key(values)
                if key not in seen and plan.owns(key):
                    seen.add(key)
                    keys.append(values)
    return RelatedReads(keys, marks)


def _act(
    pages: Iterator[ClassifiedPage],
    *,
    plan: StreamPlan,
    ledger: Ledger,
    options: RunOptions,
    io: Collaborators,
) -> tuple[DryRun | None, DeliveryStats]:
    """Send what changed (the ledger records it), or collect a dry run's records."""
    if plan.dry_run:
        from etl.run.dryrun import collect  # noqa: PLC0415 - see TYPE_CHECKING above

        dry = collect(
            pages,
            plan=plan,
            state=io.state,
            limit=options.diff_limit,
        )
        return dry, DeliveryStats()
    if io.client is None:
        raise ValueError("a run that sends needs an HTTP client")
    stats = send(
        pages,
        plan=plan,
        ledger=ledger,
        settings=io.delivery,
        client=io.client,
        stop=io.stop,
        sleep=io.sleep,
        limiter=io.pace,
    )
    return None, stats


def _note_limits(horizon: Horizon, *, io: Collaborators, bound: FilteringBoundLogger) -> None:
    """Warn of what held the watermark back, once a run per kind of note."""
    for note in horizon.notes:
        # once a run, not once a stream: the cause is the role, not the stream
        kind = re.sub(r"[0-9]+", "#", note)
        if kind not in io.noted:
            io.noted.add(kind)
            bound.warning("horizon.limited", note=note)


def _reported(
    pages: Iterator[ClassifiedPage],
    counts: Counts,
    progress: Progress,
    stream: str,
    total: int | None,
) -> Iterator[ClassifiedPage]:
    """The pages, with progress reported once each page was dealt with."""
    for page in pages:
        yield page
        progress(stream, counts.read, total)


def _log_done(bound: FilteringBoundLogger, report: StreamReport, *, dry_run: bool) -> None:
    """The one summary line of a stream (SPEC §3 `stream.done`)."""
    bound.info(
        "stream.done",
        **report.summary(),
        mode="full" if report.full else "incremental",
        dry_run=dry_run,
    )


def _diff_stream(report: StreamReport, dry: DryRun) -> DiffStream:
    """A dry run's stream in the diff report (SPEC §3 `etl diff` JSON)."""
    counts = {k: v for k, v in report.counts().items() if k not in ("rejected", "sent")}
    counts["null_cursor"] = report.null_cursor or 0
    return DiffStream(
        stream=report.stream,
        event_type=report.event_type,
        counts=counts,
        records=dry.records,
        truncated=dry.truncated,
        changed_traits=dry.changed_traits,
    )


def _source_from(conn: Connection, mapping: Mapping) -> sa.FromClause:
    try:
        return extract.source_from(conn, mapping)
    except SOURCE_ERRORS as exc:
        if not is_bad_query(exc):
            where = f"{mapping.path}: stream {mapping.stream}"
            raise source_error(exc, where=where, doing="preparing the query") from None
        raise _unreadable(mapping, exc) from None
    except Exception as exc:
        raise _unreadable(mapping, exc) from None


def _unreadable(mapping: Mapping, exc: Exception) -> SourceError:
    return SourceError(
        f"{mapping.path}: stream {mapping.stream}: cannot read the source: "
        f"{driver_line(exc)} — check source.table / source.query (etl validate --check-source)"
    )


def _pages(
    conn: Connection,
    mapping: Mapping,
    src: sa.FromClause,
    *,
    plan: StreamPlan,
    now: dt.datetime | None,
    retry_keys: Sequence[Sequence[Any]],
    related_keys: Sequence[Sequence[Any]],
    options: RunOptions,
    io: Collaborators,
    reopen: resume.Snapshot,
    on_resume: Callable[[], None],
) -> Generator[list[Row], None, None]:
    """Rows to consider: earlier rejects and invalid records first (re-read by key),
    then records related tables named (by key), then the cursor window's pages;
    read through a lost connection (`resume`), under this run's bound and horizon."""
    cursor_order = plan.order == "cursor"
    lower = (
        lower_bound(conn, mapping, plan.since, now=now)
        if cursor_order and plan.since is not None
        else None
    )
    yield from resume.read_resuming(
        mapping,
        first=(conn, src),
        reopen=reopen,
        order=plan.order,
        lower=lower,
        after=None if cursor_order else plan.checkpoint,
        retry_keys=retry_keys if cursor_order else (),
        related_keys=related_keys if cursor_order else (),
        page_size=options.page_size,
        shard=plan.shard,
        policy=options.reconnect,
        on_resume=on_resume,
        sleep=io.sleep,
    )


def _iso(value: Watermark | None) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)
