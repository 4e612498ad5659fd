"""One track stream's way through (SPEC §10): rows of an append-only table
become events, each key sent once.

`check_track_run()` refuses, before anything is read, what cannot apply to a
track stream (`--full`, a second backfill without `--force`, a changed
`--since` on resume). `run_track_stream()` plans the read, classifies each row
("sent already?" is a ledger look-up, no diff), delivers the new events
through `load.deliver()`, commits acknowledged batches to the ledger, then
moves the watermark and the floor and prunes the ledger below the floor.

The plan, by state:

* first `sync`: the safe horizon becomes the stream's `start` and `floor`;
  rows with a cursor at or above it are read, nothing older.
* later `sync`s: rows with cursor >= max(watermark - lookback, floor).
* `backfill`: rows with `since` <= cursor < `start`, in (cursor, key) order,
  resumable from the last acknowledged page.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from etl.delivery import load
from etl.errors import SourceError, StoppedError, UsageError
from etl.mapping.fields import parse_lookback
from etl.model import (
    BatchResult,
    DeliveryStats,
    DiffRecord,
    DiffStream,
    Mapping,
    Outgoing,
    Record,
    StreamReport,
    Watermark,
)
from etl.redact import first_line
from etl.run.coerce import Invalid, as_datetime
from etl.run.diff import ABSENT, fingerprint
from etl.run.options import Collaborators, RunOptions
from etl.run.plan import state_name_of
from etl.run.ports import TrackStatePort
from etl.run.transform import (
    EventContext,
    make_transformer,
    record_key,
    to_event,
    track_event_id,
)
from etl.source import extract, resume
from etl.source.horizon import Horizon, as_bound, below_lookback, safe_horizon
from etl.state.store import LedgerEntry, Rejected, TrackState, ledger_position

log = structlog.get_logger("etl")

# Invalid/rejected keys kept per stream in a run record; the counts stay exact.
MAX_LISTED = 1000
CHANGED_AFTER_SENDING = "changed after sending: not sent again (a track event is sent once per key)"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def track_store(io: Collaborators) -> TrackStatePort:
    """The run's state store, which a track stream needs to have its ledger."""
    if not isinstance(io.state, TrackStatePort):
        raise TypeError(f"{type(io.state).__name__} keeps no track streams (TrackStatePort)")
    return io.state


def state_name(mapping: Mapping, options: RunOptions) -> str:
    """Where a stream (or this shard of it) keeps its watermark and track state."""
    return state_name_of(mapping, options.shard)


# ------------------------------------------------------------ usage checks


def check_track_run(mappings: Sequence[Mapping], options: RunOptions, io: Collaborators) -> None:
    """Refuse, before anything is read or sent, a run that cannot apply to the
    track streams in it (UsageError, exit 2), naming the fix."""
    problems = []
    for mapping in mappings:
        if mapping.track is None:
            continue
        name = state_name(mapping, options)
        if options.mode == "full":
            problems.append(
                f"{mapping.path}: stream {mapping.stream} is a track stream: --full does not "
                "apply (its events are sent once per key, never re-read below its floor) — "
                "leave it out with --stream NAME, or use `etl backfill` to send history"
            )
        if options.mode != "backfill":
            continue
        state = track_store(io).track(name)
        if state is None:
            continue
        if state.backfill_done_at is not None and not options.force and not _stopped(state):
            done = state.backfill_done_at.isoformat(timespec="seconds")
            problems.append(
                f"stream {mapping.stream}: its history was already sent by a backfill "
                f"finished {done} — pass --force to send it again (same event ids, so "
                "Hyperengage can drop the repeats), or leave the stream out with --stream"
            )
        elif _stopped(state) and not options.restart and state.backfill_since != _since(options):
            was = state.backfill_since or "(all history)"
            now = _since(options) or "(all history)"
            problems.append(
                f"stream {mapping.stream}: a stopped backfill with --since {was} is waiting "
                f"to resume, and this run asks --since {now} — run it again with --since "
                f"{state.backfill_since or '(none)'} to resume it, or add --restart to start "
                "over with the new --since"
            )
    if problems:
        raise UsageError("\n".join(problems))


def _stopped(state: TrackState) -> bool:
    """A backfill started and not finished."""
    return state.backfill_checkpoint is not None or (
        state.backfill_since is not None and state.backfill_done_at is None
    )


def _since(options: RunOptions) -> str:
    return (options.since or "").strip()


def resolve_since(text: str, *, clock: dt.datetime, zone: str) -> dt.datetime:
    """`--since`: a duration back from the database's clock (`90d`, `12h`), or a
    date / ISO datetime (naive: in the stream's time zone). UsageError if not."""
    if _DATE.match(text):
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            value = None
        if value is not None:
            return value if value.tzinfo else value.replace(tzinfo=ZoneInfo(zone))
    try:
        return clock - dt.timedelta(seconds=parse_lookback(text))
    except (ValueError, OverflowError):
        raise UsageError(
            f"--since: {text!r} is neither a duration nor a date — write e.g. 90d, 12h "
            "or 2024-01-31"
        ) from None


# ------------------------------------------------------------ the plan


@dataclass(frozen=True)
class TrackPlan:
    """What one run of a track stream reads: cursor in [lower, upper), after a
    keyset position (a resumed backfill), and the state it leaves when done."""

    lower: Watermark | None
    upper: Watermark | None
    after: list[Any] | None
    state: TrackState  # the state to save before reading (start, backfill progress)
    first: bool = False


def _start_of(horizon: Horizon) -> Watermark | None:
    """Where a new track stream starts: the safe horizon; past the largest
    integer cursor, which already existed."""
    value = horizon.value
    return value + 1 if isinstance(value, int) else value


def plan_track(
    mapping: Mapping,
    *,
    options: RunOptions,
    previous: TrackState | None,
    watermark: Watermark | None,
    horizon: Horizon,
    name: str,
) -> TrackPlan:
    """The read of this run, from the stream's state and this run's horizon."""
    fresh = TrackState(name, None, None, None, None, None, None)
    if previous is None:
        start = _start_of(horizon)
        previous = replace(fresh, start=start, floor=start)
        if options.mode != "backfill":
            return TrackPlan(lower=start, upper=None, after=None, state=previous, first=True)
    if options.mode == "backfill":
        if previous.start is None:  # started on an empty table: every row was new to sync
            return TrackPlan(lower=None, upper=None, after=None, state=previous)
        resume = _stopped(previous) and not options.restart
        since = _since(options)
        lower: Watermark | None
        if resume:
            lower = previous.backfill_lower
        elif since and isinstance(previous.start, int):
            raise UsageError(
                f"{mapping.path}: stream {mapping.stream}: --since needs a timestamp cursor; "
                f"cursor {mapping.cursor} holds integers — leave --since out"
            )
        elif since:
            clock = horizon.clock or dt.datetime.now(dt.UTC)
            lower = resolve_since(since, clock=clock, zone=mapping.timezone)
        else:
            lower = None
        state = replace(
            previous,
            backfill_since=previous.backfill_since if resume else since,
            backfill_lower=lower,
            backfill_checkpoint=previous.backfill_checkpoint if resume else None,
            backfill_done_at=None,
        )
        after = previous.backfill_checkpoint if resume else None
        return TrackPlan(lower=lower, upper=previous.start, after=after, state=state)
    lower = previous.floor
    if watermark is not None:
        back = below_lookback(mapping, watermark, now=horizon.clock)
        lower = back if lower is None else max(lower, back)
    return TrackPlan(lower=lower, upper=None, after=None, state=previous)


# ------------------------------------------------------------ classify and send


class _Ref(NamedTuple):
    entry: LedgerEntry
    key_values: list[Any]
    seq: int


@dataclass
class TrackTally:
    """Mutable counters of one track stream while it runs."""

    read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    invalid: int = 0
    rejected: int = 0
    future: int = 0
    invalid_records: list[tuple[str, str]] = field(default_factory=list)
    rejected_records: list[tuple[str, str]] = field(default_factory=list)
    diff_records: list[DiffRecord] = field(default_factory=list)
    truncated: int = 0


@dataclass
class TrackFlow:
    """Pages -> (events to send | dry-run records) for one track stream."""

    mapping: Mapping
    options: RunOptions
    io: Collaborators
    name: str
    clock: dt.datetime  # the run's clock (the database's): later event times count as future
    total: int | None = None
    tally: TrackTally = field(default_factory=TrackTally)
    retrying: set[str] = field(default_factory=set)  # rejected keys re-read first
    retried: set[str] = field(default_factory=set)
    seq: int = -1
    acked_seq: int = -1
    checkpoints: deque[tuple[int, list[Any]]] = field(default_factory=deque)
    writer: ThreadPoolExecutor | None = None
    writes: deque[Future[Any]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.context = EventContext(
            event_type=self.mapping.event_type,
            api_key=self.io.identity.api_key,
            workspace_key=self.io.identity.workspace_key,
            track=True,
        )
        self.transform = make_transformer(self.mapping, self.context)
        self.tz = ZoneInfo(self.mapping.timezone)
        self.n_keys = len(self.mapping.key)
        self.seen: set[int] = set()

    def classify(
        self, pages: Iterator[list[tuple[Any, ...]]], *, with_payload: bool
    ) -> Iterator[tuple[str, Record, Any, list[Any]]]:
        """(verdict, record, previous payload, key values) of each row owned here:
        "new", "changed" (after sending), "unchanged" or "invalid"."""
        n_keys = self.n_keys
        check_duplicates = self.mapping.source.query is not None
        for rows in pages:
            if self.io.stop.is_set():
                return
            keyed = []
            for row in rows:
                key = record_key(row[:n_keys])
                shard = self.options.shard
                if shard is not None and not shard.owns_values(row[:n_keys]):
                    continue  # a reject re-read by key (pages hold only this shard's rows)
                if key in self.retrying:
                    if key in self.retried:
                        continue  # re-read first as a reject, now again in the window
                    self.retried.add(key)
                keyed.append((key, row))
            if keyed:
                sent = track_store(self.io).ledger(
                    self.mapping.stream, [k for k, _ in keyed], with_payload=with_payload
                )
                invalid: list[Rejected] = []
                for key, row in keyed:
                    record = self.transform(row)
                    if check_duplicates and self._duplicate(key):
                        record = record._replace(
                            payload=None,
                            reason="duplicate key: the query returned this key more than "
                            "once in this run — make `key` unique (only the first row was used)",
                        )
                    verdict, old = self._verdict(record, sent.get(key))
                    if verdict == "invalid" and None not in row[:n_keys]:
                        invalid.append(
                            Rejected(key, list(row[:n_keys]), "", record.reason or "", "invalid")
                        )
                    yield verdict, record, old, list(row[:n_keys])
                self.tally.read += len(keyed)
                if invalid and not self.options.dry_run:
                    # SPEC §4: remembered and re-read by key by every run, so a row fixed
                    # without moving its cursor (it must not move) is still sent
                    self._write(
                        track_store(self.io).commit_track_batch,
                        self.mapping.stream,
                        self.name,
                        [],
                        invalid,
                    )
            if self.options.mode == "backfill" and rows and None not in rows[-1][:n_keys]:
                last = rows[-1]
                position = [_cursor_text(last[n_keys], self.tz), *last[:n_keys]]
                self.checkpoints.append((self.seq, position))
                self._checkpoint()
            if self.io.progress:
                self.io.progress(self.mapping.stream, self.tally.read, self.total)

    def _duplicate(self, key: str) -> bool:
        digest = hash(key)
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False

    def _verdict(self, record: Record, previous: Any) -> tuple[str, Any]:
        tally = self.tally
        if record.payload is None or record.canonical is None:
            tally.invalid += 1
            if len(tally.invalid_records) < MAX_LISTED:
                tally.invalid_records.append((record.key, record.reason or ""))
            return "invalid", None
        if previous is None:
            tally.new += 1
            if _utc(record.payload["utc_time"]) > self.clock:
                tally.future += 1
            return "new", None
        if previous.hash == fingerprint(record.canonical):
            tally.unchanged += 1
            return "unchanged", None
        tally.changed += 1
        old = orjson.loads(previous.payload) if previous.payload is not None else None
        return "changed", old

    # ------------------------------------------------------------ sending

    def deliver(self, pages: Iterator[list[tuple[Any, ...]]]) -> DeliveryStats:
        if self.io.client is None:
            raise ValueError("deliver needs an HTTP client")
        # Ledger commits on one writer thread, in order; each batch keeps its
        # delivery slot until its commit is done (see load.deliver), so a crash
        # re-sends at most `concurrency` batches, with the same event ids.
        with ThreadPoolExecutor(1, thread_name_prefix="etl-state-writer") as writer:
            self.writer = writer
            try:
                stats = load.deliver(
                    self._outgoing(pages),
                    settings=self.io.delivery,
                    on_result=self._on_result,
                    client=self.io.client,
                    sleep=self.io.sleep,
                )
            finally:
                self.writer = None
        while self.writes:
            self.writes.popleft().result()
        return stats

    def _outgoing(self, pages: Iterator[list[tuple[Any, ...]]]) -> Iterator[Outgoing[_Ref]]:
        stream = self.mapping.stream
        for verdict, record, _, key_values in self.classify(pages, with_payload=False):
            if verdict != "new":
                continue
            if self.io.stop.is_set():
                return
            assert record.payload is not None  # noqa: S101 - "new" is valid
            assert record.canonical is not None  # noqa: S101
            eid = track_event_id(
                workspace_key=self.context.workspace_key, stream=stream, key=record.key
            )
            self.seq += 1
            entry = LedgerEntry(
                key=record.key,
                position=ledger_position(_cursor_value(record.cursor, self.tz)),
                hash=fingerprint(record.canonical),
                payload=record.canonical,
                event_id=eid,
            )
            yield Outgoing(
                key=record.key,
                event_id=eid,
                body=to_event(record.payload, event_id=eid, context=self.context),
                ref=_Ref(entry, key_values, self.seq),
            )

    def _on_result(self, result: BatchResult[_Ref]) -> Future[Any] | None:
        sent = [o.ref.entry for o in result.acked]
        rejected = [
            Rejected(o.key, o.ref.key_values, o.event_id, message) for o, message in result.rejected
        ]
        committed = self._write(
            track_store(self.io).commit_track_batch, self.mapping.stream, self.name, sent, rejected
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

    def _checkpoint(self) -> None:
        """Backfill: save the position up to which everything was acknowledged."""
        latest = None
        while self.checkpoints and self.checkpoints[0][0] <= self.acked_seq:
            latest = self.checkpoints.popleft()[1]
        if latest is not None:
            self._write(track_store(self.io).save_backfill_checkpoint, self.name, latest)

    def _write(self, call: Any, *args: Any) -> Future[Any] | None:
        if self.writer is None:
            call(*args)
            return None
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()
        future = self.writer.submit(call, *args)
        self.writes.append(future)
        return future

    # ------------------------------------------------------------ dry run

    def dry_run(self, pages: Iterator[list[tuple[Any, ...]]]) -> None:
        limit = self.options.diff_limit
        for verdict, record, old, _ in self.classify(pages, with_payload=True):
            if verdict == "unchanged":
                continue
            if limit is not None and len(self.tally.diff_records) >= limit:
                self.tally.truncated += 1
                continue
            self.tally.diff_records.append(_diff_record(verdict, record, old))


def _diff_record(verdict: str, record: Record, old: dict[str, Any] | None) -> DiffRecord:
    if verdict == "invalid" or record.payload is None:
        return DiffRecord(key=record.key, kind="invalid", reason=record.reason)
    payload = record.payload
    event = {name: payload[name] for name in _EVENT_FIELDS if name in payload}
    properties = dict(payload["properties"])
    if verdict == "new":
        return DiffRecord(key=record.key, kind="new", traits=properties, event=event)
    return DiffRecord(
        key=record.key,
        kind="changed",
        traits=properties,
        event=event,
        changes=_changes(old or {}, payload),
        reason=CHANGED_AFTER_SENDING,
    )


_EVENT_FIELDS = ("event_type", "utc_time", "user_id", "account_id", "anonymous_id", "url")


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Event fields and properties whose value differs from what was sent."""
    pairs = [(name, old.get(name, ABSENT), new.get(name, ABSENT)) for name in _EVENT_FIELDS]
    before, after = old.get("properties", {}), new.get("properties", {})
    pairs += [
        (name, before.get(name, ABSENT), after.get(name, ABSENT))
        for name in sorted(before.keys() | after.keys())
    ]
    out = {}
    for name, a, b in pairs:
        if a is ABSENT and b is ABSENT:
            continue
        if a is not ABSENT and b is not ABSENT and orjson.dumps(a) == orjson.dumps(b):
            continue
        sides = {}
        if a is not ABSENT:
            sides["old"] = a
        if b is not ABSENT:
            sides["new"] = b
        out[name] = sides
    return out


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _cursor_value(value: Any, tz: dt.tzinfo) -> Watermark:
    """A row's cursor as an integer or an aware time (text and naive values read
    in the stream's zone), to place it in the ledger."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return _utc(as_datetime(value, tz))
    except Invalid:
        return dt.datetime.min.replace(tzinfo=dt.UTC)  # sorts first: pruned at the next run


def _cursor_text(value: Any, tz: dt.tzinfo) -> Any:
    """A row's cursor as JSON can keep it for a checkpoint."""
    cursor = _cursor_value(value, tz)
    return cursor if isinstance(cursor, int) else cursor.isoformat()


def _checkpoint_position(conn: Connection, mapping: Mapping, saved: list[Any]) -> list[Any]:
    """A saved checkpoint as the keyset position the database compares with."""
    cursor = saved[0]
    value = cursor if isinstance(cursor, int) else dt.datetime.fromisoformat(cursor)
    return [as_bound(conn, mapping, value), *saved[1:]]


# ------------------------------------------------------------ the stream


def run_track_stream(
    mapping: Mapping, *, options: RunOptions, io: Collaborators
) -> tuple[StreamReport, DiffStream | None]:
    """One track stream: plan, read, send what is new, remember it, move on."""
    started = time.monotonic()
    bound = log.bind(stream=mapping.stream)
    name = state_name(mapping, options)
    previous = track_store(io).track(name)
    stream_state = io.state.stream(name)
    watermark = stream_state.watermark if stream_state else None
    backfill = options.mode == "backfill"
    with (
        io.source.connect() as conn,
        extract.read_only(
            conn,
            snapshot=not backfill,
            timezone=mapping.timezone,
            sharded=options.shard is not None,
        ),
    ):
        src = _source_from(conn, mapping)
        horizon = safe_horizon(conn, mapping, src, max_transaction_age=options.max_transaction_age)
        for note in horizon.notes:
            kind = re.sub(r"[0-9]+", "#", note)
            if kind not in io.noted:
                io.noted.add(kind)
                bound.warning("horizon.limited", note=note)
        plan = plan_track(
            mapping,
            options=options,
            previous=previous,
            watermark=watermark,
            horizon=horizon,
            name=name,
        )
        if plan.first:
            bound.info("track.start", start=_iso(plan.state.start), note="history: etl backfill")
        if backfill and plan.after:
            bound.info("backfill.resume", after=plan.after)
        elif backfill and previous is not None and previous.backfill_done_at is not None:
            # --force (check_track_run refused it otherwise): say what it does
            bound.warning(
                "backfill.resend",
                finished=previous.backfill_done_at.isoformat(timespec="seconds"),
                note="--force: sending the history again, with the same event ids",
            )
        if backfill and plan.upper is None:
            bound.info("backfill.nothing", reason="the stream started on an empty table")
        if not options.dry_run and (backfill or previous is None):
            track_store(io).save_track(plan.state)
        clock = horizon.clock or dt.datetime.now(dt.UTC)
        flow = TrackFlow(
            mapping=mapping,
            options=options,
            io=io,
            name=name,
            clock=clock,
            total=_count(conn, mapping, src, plan) if io.progress else None,
        )
        null_cursor = extract.count_null_cursors(conn, mapping, src) if options.dry_run else None
        if not backfill:
            flow.retrying = {
                r.key
                for r in io.state.rejected(mapping.stream)
                if options.shard is None or options.shard.owns_values(r.key_values)
            }
        reads = _pages(
            conn=conn, mapping=mapping, src=src, plan=plan, flow=flow, options=options, io=io
        )
        with contextlib.closing(reads) as pages:
            if backfill and plan.upper is None:
                pages.close()
            if options.dry_run:
                flow.dry_run(pages)
                stats = None
            else:
                stats = flow.deliver(pages)
    if io.stop.is_set():
        raise StoppedError(
            f"stream {mapping.stream}: stopped by a signal after the in-flight batches were "
            "acknowledged; state is consistent — run the same command again to continue"
        )
    pruned = 0
    new_watermark = watermark
    if not options.dry_run:
        if backfill:
            pruned = _finish_backfill(
                mapping=mapping, plan=plan, io=io, name=name, horizon=horizon, watermark=watermark
            )
        else:
            new_watermark = horizon.value if horizon.value is not None else watermark
            pruned = _advance(
                mapping=mapping,
                plan=plan,
                io=io,
                name=name,
                watermark=new_watermark,
                horizon=horizon,
            )
    tally = flow.tally
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
        null_cursor=null_cursor,
        watermark=_iso(new_watermark),
        seconds=time.monotonic() - started,
        future=tally.future,
        invalid_records=tuple(tally.invalid_records),
        rejected_records=tuple(tally.rejected_records),
    )
    bound.info(
        "stream.done",
        **report.summary(),
        mode="backfill" if backfill else "incremental",
        kind="track",
        future=report.future,
        pruned=pruned,
        dry_run=options.dry_run,
    )
    if report.changed:
        bound.warning(
            "track.changed_after_sending", count=report.changed, note=CHANGED_AFTER_SENDING
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
            kind="track",
        )
    return report, diff


def _pages(
    *,
    conn: Connection,
    mapping: Mapping,
    src: Any,
    plan: TrackPlan,
    flow: TrackFlow,
    options: RunOptions,
    io: Collaborators,
) -> Generator[list[tuple[Any, ...]], None, None]:
    """Rows to consider: earlier rejects first (re-read by key), then the window;
    read through a lost connection (`resume`: a new snapshot, from the last page)."""
    keys = [list(r.key_values) for r in io.state.rejected(mapping.stream)] if flow.retrying else []
    after = _checkpoint_position(conn, mapping, plan.after) if plan.after else None
    yield from resume.read_resuming(
        mapping,
        first=(conn, src),
        reopen=resume.Snapshot(
            engine=io.source, snapshot=options.mode != "backfill", timezone=mapping.timezone
        ),
        order="cursor",
        lower=as_bound(conn, mapping, plan.lower) if plan.lower is not None else None,
        upper=as_bound(conn, mapping, plan.upper) if plan.upper is not None else None,
        after=after,
        retry_keys=keys,
        page_size=options.page_size,
        shard=options.shard,
        policy=options.reconnect,
        on_resume=flow.seen.clear,  # duplicate keys are judged within one snapshot
        sleep=io.sleep,
    )


def _count(conn: Connection, mapping: Mapping, src: Any, plan: TrackPlan) -> int:
    """How many rows the plan reads (the total of a backfill's progress)."""
    cursor = src.c[mapping.cursor]
    query = sa.select(sa.func.count()).select_from(src).where(cursor.is_not(None))
    if mapping.source.where:
        query = query.where(extract.raw_sql(f"({mapping.source.where}\n)"))
    if plan.lower is not None:
        query = query.where(cursor >= as_bound(conn, mapping, plan.lower))
    if plan.upper is not None:
        query = query.where(cursor < as_bound(conn, mapping, plan.upper))
    return int(extract.execute(conn, mapping, query).scalar_one())


def _advance(
    *,
    mapping: Mapping,
    plan: TrackPlan,
    io: Collaborators,
    name: str,
    watermark: Watermark | None,
    horizon: Horizon,
) -> int:
    """After a sync delivered everything: the watermark, then the floor at
    watermark - lookback, then the ledger pruned below the floor (this shard's
    keys only; a stopped backfill's keys, below `start`, stay)."""
    state = plan.state
    floor = state.floor
    if watermark is not None:
        back = below_lookback(mapping, watermark, now=horizon.clock)
        floor = back if floor is None else max(floor, back)
    io.state.save_watermark(name, watermark, mapping.fingerprint)
    track_store(io).save_track(replace(state, floor=floor))
    if floor is None:
        return 0
    at_least = ledger_position(state.start) if state.start is not None else ""
    return track_store(io).prune_ledger(
        mapping.stream, name, below=ledger_position(floor), at_least=at_least
    )


def _finish_backfill(
    *,
    mapping: Mapping,
    plan: TrackPlan,
    io: Collaborators,
    name: str,
    horizon: Horizon,
    watermark: Watermark | None,
) -> int:
    """After a backfill delivered everything: mark it done and forget its keys
    (all below `start`, which no sync reads). A stream backfilled before its
    first sync starts its syncs where the backfill ended."""
    state = replace(plan.state, backfill_checkpoint=None, backfill_done_at=dt.datetime.now(dt.UTC))
    track_store(io).save_track(state)
    if watermark is None and state.start is not None:
        first = horizon.value if horizon.value is not None else state.start
        io.state.save_watermark(name, first, mapping.fingerprint)
    if state.start is None:
        return 0
    return track_store(io).prune_ledger(mapping.stream, name, below=ledger_position(state.start))


def _source_from(conn: Connection, mapping: Mapping) -> Any:
    try:
        return extract.source_from(conn, mapping)
    except Exception as exc:
        orig = getattr(exc, "orig", exc)
        raise SourceError(
            f"{mapping.path}: stream {mapping.stream}: cannot read the source: "
            f"{first_line(orig)} — "
            "check source.table / source.query (etl validate --check-source)"
        ) from None


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)
