"""A stream's pages read through a lost source connection: reconnect, new snapshot, resume.

A failover, a restart, `idle_in_transaction_session_timeout` or an
administrator's `pg_terminate_backend` ends the read-only transaction a stream
is read in. `read_resuming()` then reconnects with backoff (bounded by
attempts and time, `Reconnect`), opens a new snapshot, and goes on from the
last keyset position it handed out, under the bound and horizon fixed at the
start of the run. Nothing already read is read again (rows a later snapshot
moved past the position aside), so nothing already sent is sent again.

Why resuming under the original horizon is safe: the watermark saved at the
end is the horizon taken in the *first* snapshot. A row the first snapshot
could not see was written by a transaction still open then or begun later, so
its cursor is at or above that horizon (SPEC §5); the next run reads from the
horizon minus the lookback and sees it, even when the new snapshot's read had
already passed its key. Taking a new horizon from the new snapshot would skip
exactly those rows.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from etl.errors import SourceLostError
from etl.model import Mapping, Shard
from etl.settings import READ
from etl.source import extract
from etl.source.errors import SOURCE_ERRORS, classify, driver_line, source_error

log = structlog.get_logger("etl")

Row = tuple[Any, ...]
BACKOFF_BASE = 0.5  # seconds before the first reconnect, doubled each time
BACKOFF_CAP = 10.0


@dataclass(frozen=True)
class Reconnect:
    """How hard to try when the source connection is lost: at most `attempts`
    reconnects in at most `seconds` per outage (the budget is whole again once a
    page was read on the new connection)."""

    attempts: int = READ.reconnect_attempts
    seconds: float = READ.reconnect_time.total_seconds()


@dataclass(frozen=True)
class Snapshot:
    """How each (re)opened read-only transaction is set up."""

    engine: sa.Engine
    snapshot: bool  # one consistent view (sync) or read-committed pages (backfill)
    timezone: str
    sharded: bool = False  # the pages carry a shard predicate (extract.read_only)


@dataclass
class _Position:
    """Where the read has got to: what the pages handed out so far cover."""

    key_chunks: set[tuple[int, int]] = field(default_factory=set)  # (phase, start) read
    after: Sequence[Any] | None = None  # the last keyset position
    null_rows: int = 0  # rows with a NULL key handed out (read last, unordered)


def read_resuming(
    mapping: Mapping,
    *,
    first: tuple[Connection, sa.FromClause],
    reopen: Snapshot,
    order: extract.Order,
    lower: Any = None,
    upper: Any = None,
    after: Sequence[Any] | None = None,
    retry_keys: Sequence[Sequence[Any]] = (),
    related_keys: Sequence[Sequence[Any]] = (),
    page_size: int = READ.page_size,
    shard: Shard | None = None,
    policy: Reconnect = Reconnect(),
    on_resume: Callable[[], None] = lambda: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[list[Row]]:
    """The stream's rows: rejects re-read by key first (`retry_keys`), then the
    keys related tables named (`related_keys`), then the keyset pages from
    `after`; on a lost connection, resumed on a new one.

    With `shard`, only that shard's rows are read. `first` is the connection (in
    its read-only transaction) and FROM the run opened; reconnections are this
    generator's own and closed with it. `on_resume` is called when a new
    snapshot starts (duplicate keys are judged within one snapshot). Raises
    SourceLostError when the budget runs out.
    """
    where = f"{mapping.path}: stream {mapping.stream}"
    position = _Position(after=after)
    conn, src = first
    outage: _Outage | None = None
    with contextlib.ExitStack() as owned:
        while True:
            try:
                pages = _read_from(
                    conn,
                    src,
                    mapping=mapping,
                    position=position,
                    order=order,
                    lower=lower,
                    upper=upper,
                    by_key=(retry_keys, related_keys),
                    page_size=page_size,
                    shard=shard,
                )
                with contextlib.closing(pages):
                    for page in pages:
                        outage = None  # progress: the next outage has a whole budget
                        yield page
                return
            except SourceLostError as exc:
                detail = exc.detail
            except SOURCE_ERRORS as exc:  # a streamed fetch, outside extract.execute
                if classify(exc) != "transient":
                    raise source_error(exc, where=where, doing="reading rows") from None
                detail = driver_line(exc)
            owned.close()  # the previous reconnection, if any (dead: closing is safe)
            outage = outage or _Outage(started=clock())
            conn, src = _reconnect(
                mapping,
                reopen=reopen,
                owned=owned,
                detail=detail,
                policy=policy,
                outage=outage,
                sleep=sleep,
                clock=clock,
            )
            on_resume()


@dataclass
class _Outage:
    """The reconnect budget spent since the connection was last lost."""

    started: float
    attempts: int = 0


_Prepared = TypeVar("_Prepared")


@contextlib.contextmanager
def open_snapshot(
    mapping: Mapping,
    *,
    reopen: Snapshot,
    prepare: Callable[[Connection], _Prepared],
    policy: Reconnect = Reconnect(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[tuple[Connection, _Prepared]]:
    """A connection in a read-only snapshot and what `prepare` made of it (the FROM,
    the horizon...), for the run to read a stream in; nothing was read yet, so a
    connection lost while opening or preparing is simply opened again (with
    backoff, within `policy`). Errors inside the `with` body are not retried."""
    where = f"{mapping.path}: stream {mapping.stream}"
    outage: _Outage | None = None
    while True:
        with contextlib.ExitStack() as owned:
            try:
                conn = owned.enter_context(reopen.engine.connect())
                owned.enter_context(
                    extract.read_only(
                        conn,
                        snapshot=reopen.snapshot,
                        timezone=reopen.timezone,
                        sharded=reopen.sharded,
                    )
                )
                prepared = prepare(conn)
            except SourceLostError as exc:
                detail = exc.detail
            except SOURCE_ERRORS as exc:
                if classify(exc) != "transient":
                    raise source_error(exc, where=where, doing="opening its snapshot") from None
                detail = driver_line(exc)
            else:
                yield conn, prepared
                return
        outage = outage or _Outage(started=clock())
        _back_off(mapping, detail=detail, policy=policy, outage=outage, sleep=sleep, clock=clock)


def _read_from(
    conn: Connection,
    src: sa.FromClause,
    *,
    mapping: Mapping,
    position: _Position,
    order: extract.Order,
    lower: Any,
    upper: Any,
    by_key: tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]]],
    page_size: int,
    shard: Shard | None,
) -> Generator[list[Row], None, None]:
    """The pages from `position` on, on `conn`; `position` moves as each is handed out."""
    n_keys = len(mapping.key)
    # Chunks of keys read by key: pending rejects, then keys related tables named
    # (those with their cursor, SPEC §9). A chunk counts as read once handed out.
    done = position.key_chunks
    for phase, keys in enumerate(by_key):
        for start in range(0, len(keys), page_size):
            if (phase, start) in done:
                continue
            chunk = keys[start : start + page_size]
            rows = extract.read_keys(conn, mapping, src, chunk, shard=shard, with_cursor=phase == 1)
            done.add((phase, start))
            if rows:
                yield rows
    skip = position.null_rows
    pages = extract.prefetch(
        extract.read_pages(
            conn,
            mapping,
            src,
            order=order,
            lower=lower,
            upper=upper,
            after=position.after,
            page_size=page_size,
            shard=shard,
            keyset=skip == 0,
        )
    )
    with contextlib.closing(pages):
        for page in pages:
            last = page[-1]
            if not _null_key(last, n_keys):
                position.after = last[:n_keys] if order == "key" else (last[n_keys], *last[:n_keys])
                yield page
                continue
            # NULL-key rows come unordered after the keyset pages; those handed out
            # before the connection was lost are skipped by count.
            dropped, skip = min(skip, len(page)), max(0, skip - len(page))
            if page[dropped:]:
                position.null_rows += len(page) - dropped
                yield page[dropped:]


def _null_key(row: Row, n_keys: int) -> bool:
    return any(value is None for value in row[:n_keys])


def _reconnect(
    mapping: Mapping,
    *,
    reopen: Snapshot,
    owned: contextlib.ExitStack,
    detail: str,
    policy: Reconnect,
    outage: _Outage,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> tuple[Connection, sa.FromClause]:
    """A new connection in a new read-only snapshot, after backing off; or the
    SourceLostError that says the budget ran out."""
    where = f"{mapping.path}: stream {mapping.stream}"
    while True:
        _back_off(mapping, detail=detail, policy=policy, outage=outage, sleep=sleep, clock=clock)
        try:
            conn = owned.enter_context(reopen.engine.connect())
            owned.enter_context(
                extract.read_only(
                    conn,
                    snapshot=reopen.snapshot,
                    timezone=reopen.timezone,
                    sharded=reopen.sharded,
                )
            )
            src = extract.source_from(conn, mapping)
        except SOURCE_ERRORS as exc:
            owned.close()
            if classify(exc) != "transient":
                raise source_error(exc, where=where, doing="reconnecting") from None
            detail = driver_line(exc)
            continue
        log.info("source.resumed", stream=mapping.stream, attempt=outage.attempts)
        return conn, src


def _back_off(
    mapping: Mapping,
    *,
    detail: str,
    policy: Reconnect,
    outage: _Outage,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> None:
    """Wait before the next reconnect (exponential, jittered, logged); raise the
    SourceLostError that ends the run when the outage's budget is spent."""
    outage.attempts += 1
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (outage.attempts - 1))
    delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy
    elapsed = clock() - outage.started
    if outage.attempts > policy.attempts or elapsed + delay > policy.seconds:
        raise SourceLostError(
            f"{mapping.path}: stream {mapping.stream}: the source connection was lost and "
            f"could not be re-established ({outage.attempts - 1} reconnect attempt(s) in "
            f"{elapsed:.1f} s; last error: {detail}) — nothing is lost: acknowledged batches "
            "are recorded and the watermark did not move, so the next run picks up where "
            "this one stopped",
            detail=detail,
        )
    log.warning(
        "source.reconnect",
        stream=mapping.stream,
        attempt=outage.attempts,
        of=policy.attempts,
        delay=round(delay, 3),
        error=detail,
    )
    sleep(delay)
