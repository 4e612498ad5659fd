"""One full read split between worker processes (`--workers`), each reading its part.

A full read (a backfill, `sync --full`, a `full_every` pass) of a big stream is
bound by Python's interpreter lock: transform, digests, event ids, request
bodies and state rows all run under one lock, whatever the threads. So
`read_in_parts()` forks `workers` processes, and worker `w` reads the rows whose
key falls in part `w` — the SQL shard predicate of `--shard` (`part_shard`:
the run's own shard, split further), so each worker's queries read only its
share. Every worker runs the same read -> classify -> send -> ledger path as a
one-process run (`work`, given by the pipeline), on its own source connection,
state connection and HTTP client; the records it commits are its own keys.

The parent holds the run lock, sums the workers' progress, forwards a stop
(SIGINT/SIGTERM) to them, and returns what each part reported for the pipeline
to merge into the stream's one report. It saves nothing itself: the pipeline
saves the stream's watermark only once every part ran to its end. A backfill's
part keeps its own checkpoint (`part_state_name`), so a stopped parallel
backfill resumes each part where it was (with the same number of workers).

Why fork and not spawn: a forked worker starts with the parsed mappings, the
compiled transforms and the engines' configuration (the PostgreSQL loaders,
SQLite's shard function) in place, in milliseconds; a spawned one would import
and build them again (~0.5 s). The inherited connections are never used: the
worker's engines are given fresh pools (`Engine.dispose(close=False)`, as
SQLAlchemy documents for forked processes), and it leaves with `os._exit` so
nothing of the parent's is closed or flushed from the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait
from typing import Any, Generic, TypeVar, cast

import structlog
from structlog.typing import FilteringBoundLogger

from etl import redact
from etl.delivery.load import LazyClient, RateLimiter
from etl.errors import EtlError, StateError
from etl.model import Shard
from etl.run.options import Collaborators, RunOptions
from etl.run.plan import StreamPlan
from etl.state.store import StateStore

log: FilteringBoundLogger = structlog.get_logger("etl")

R = TypeVar("R")

# How often the parent looks at its stop event while the workers run (seconds),
# and at the session holding a PostgreSQL store's run lock.
POLL_SECONDS = 0.2
LOCK_CHECK_SECONDS = 1.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Linux's prctl(PR_SET_PDEATHSIG): a worker is killed when the parent dies.
PR_SET_PDEATHSIG = 1


def part_shard(shard: Shard | None, part: int, parts: int) -> Shard:
    """Part `part` of `parts` of the run's share: the keys whose bucket is I modulo
    N (the run's `--shard I/N`; 0/1 without one) and `part` modulo `parts` after
    that, which is bucket ≡ I + N·part modulo N·parts — itself a shard, so the
    same SQL predicate and `Shard.owns` decide it (rows with a NULL key go to
    part 0 of shard 0, as they go to shard 0)."""
    index, count = (shard.index, shard.count) if shard is not None else (0, 1)
    return Shard(index + count * part, count * parts)


def part_state_name(state_name: str, part: int, parts: int) -> str:
    """Where part `part` of a parallel backfill keeps its checkpoint."""
    return f"{state_name}~part{part}of{parts}"


def can_split(plan: StreamPlan, io: Collaborators) -> str | None:
    """Why this stream's read cannot be split between processes, or None if it can:
    only a full read that sends (a dry run collects one report), not a backfill
    resumed from a one-process checkpoint, with a state store and an HTTP client
    another process can open again (not an in-memory store or a test transport)."""
    if not plan.full_read:
        return "not a full read"
    if plan.dry_run:
        return "a dry run"
    if plan.checkpoint is not None:
        return "resumes a one-process backfill"
    if not isinstance(io.state, StateStore):
        return "the state store is not a database another process can open"
    if not isinstance(io.client, LazyClient) or not io.client.forkable:
        return "the HTTP client cannot be made again in another process"
    if not hasattr(os, "fork"):  # pragma: no cover - etl runs on Linux and macOS
        return "this platform cannot fork"
    return None


@dataclass(frozen=True)
class Part:
    """What one worker is given: its part of the plan and its own I/O."""

    index: int
    parts: int
    plan: StreamPlan
    io: Collaborators


@dataclass(frozen=True)
class PartResult(Generic[R]):
    """What one worker reported: the pipeline's result for its part, whether a stop
    ended it early, and its peak RSS."""

    index: int
    result: R
    stopped: bool
    peak_rss_mb: float


def read_in_parts(
    plan: StreamPlan,
    *,
    parts: int,
    work: Callable[[Part], R],
    options: RunOptions,
    io: Collaborators,
    on_progress: Callable[[int], None] | None = None,
) -> list[PartResult[R]]:
    """Run `work` on each of `parts` parts of the stream, each in a forked worker;
    the parts' results in part order. The first worker error to arrive is raised
    (as the worker raised it) once every worker has ended: the others are stopped as
    by a signal, after their in-flight batches. A PostgreSQL store's run lock is
    checked while they run: if its session is lost, the workers are killed at once
    (another run may hold the lock by now). `on_progress` gets the rows read so
    far, summed over the parts."""
    store = io.state
    assert isinstance(store, StateStore)  # noqa: S101 - can_split() checked it
    context = multiprocessing.get_context("fork")
    workers: dict[Pipe, _Worker] = {}
    read = [0] * parts
    results: list[PartResult[R] | None] = [None] * parts
    failures: list[BaseException] = []
    try:
        for index in range(parts):
            ours, theirs = context.Pipe(duplex=False)
            part = _part(plan, index, parts, restart=options.restart, io=io)
            process = context.Process(
                target=_worker_main,
                args=(part, work, theirs, os.getpid()),
                name=f"etl-{plan.mapping.stream}-part{index}",
                daemon=False,
            )
            # A signal between the fork and the worker's own handlers would reach the
            # parent's handler in the worker, and be lost: held until the worker is ready.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            theirs.close()
            workers[ours] = _Worker(index, process)
        stopping = False
        checked = time.monotonic()
        while workers:
            for ready in wait(list(workers), timeout=POLL_SECONDS):
                pipe = cast(Pipe, ready)
                worker = workers[pipe]
                message = _receive(pipe, worker)
                kind = message[0]
                if kind == "progress":
                    read[worker.index] = message[1]
                    if on_progress is not None:
                        on_progress(sum(read))
                    continue
                del workers[pipe]
                pipe.close()
                worker.process.join()
                if kind == "done":
                    results[worker.index] = message[1]
                else:
                    failures.append(_rebuilt(*message[1]))
            if time.monotonic() - checked >= LOCK_CHECK_SECONDS:
                checked = time.monotonic()
                try:
                    store.check_lock()
                except StateError as exc:
                    failures.insert(0, exc)
                    for worker in workers.values():
                        worker.signal(signal.SIGKILL)
                    stopping = True
            if (failures or io.stop.is_set()) and not stopping:
                stopping = True  # let the others finish their in-flight batches, then stop
                for worker in workers.values():
                    worker.signal(signal.SIGTERM)
    finally:
        for pipe, worker in workers.items():  # only after an error in the parent itself
            worker.signal(signal.SIGKILL)
            worker.process.join()
            pipe.close()
    if failures:
        raise failures[0]
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class _Worker:
    index: int
    process: Any  # multiprocessing's forked Process (its type is private)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(self.process.pid, signum)


def _part(plan: StreamPlan, index: int, parts: int, *, restart: bool, io: Collaborators) -> Part:
    """Part `index`'s plan: its shard, and its own checkpoint when a backfill resumes."""
    name = part_state_name(plan.state_name, index, parts)
    checkpoint = since = None
    if plan.backfill and not restart:
        previous = io.state.stream(name)
        if previous is not None and previous.checkpoint:
            checkpoint, since = tuple(previous.checkpoint), previous.checkpoint_since
            log.info(
                "backfill.resume",
                stream=plan.mapping.stream,
                part=f"{index}/{parts}",
                after=list(checkpoint),
            )
    part_plan = dataclasses.replace(
        plan,
        shard=part_shard(plan.shard, index, parts),
        state_name=name,
        checkpoint=checkpoint,
        checkpoint_since=since,
    )
    return Part(index=index, parts=parts, plan=part_plan, io=io)


def _receive(pipe: Pipe, worker: _Worker) -> tuple[Any, ...]:
    """One message of a worker; a worker that ended without reporting is an error."""
    try:
        message: tuple[Any, ...] = pipe.recv()
    except (EOFError, OSError):
        worker.process.join()
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        text = (
            f"worker {worker.index} ({worker.process.name}) ended without a report ({how}) "
            "— what it had delivered is recorded; run the same command again to continue"
        )
        return ("failed", (EtlError, (text,), {}))
    return message


# ---------------------------------------------------------------- in the worker


def _worker_main(part: Part, work: Callable[[Part], Any], pipe: Pipe, parent: int) -> None:
    """A forked worker's whole life: fresh I/O, the work, one report, `os._exit`."""
    code = 0
    try:
        _die_with_parent(parent)
        stop = threading.Event()

        def on_signal(_signum: int, _frame: Any) -> None:
            stop.set()  # like the CLI's first signal: finish in-flight batches, then stop

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the fork
        # every log line of the worker says which part it is (the libraries' too)
        structlog.contextvars.bind_contextvars(part=f"{part.index}/{part.parts}")
        with _worker_io(part, stop, pipe) as io:
            result = work(dataclasses.replace(part, io=io))
        pipe.send(("done", PartResult(part.index, result, stop.is_set(), peak_rss_mb())))
    except BaseException as exc:  # every failure, a bug too, goes to the parent
        code = 1
        with contextlib.suppress(BaseException):
            pipe.send(("failed", _portable(exc)))
    finally:
        with contextlib.suppress(BaseException):
            pipe.close()
        os._exit(code)


@contextlib.contextmanager
def _worker_io(part: Part, stop: threading.Event, pipe: Pipe) -> Iterator[Collaborators]:
    """The worker's own connections: the source engine with a fresh pool, a state
    store opened again (without the parent's lock), a new HTTP client; a rate
    limit is shared out between the parts."""
    io = part.io
    io.source.dispose(close=False)
    state = io.state
    client = io.client
    assert isinstance(state, StateStore)  # noqa: S101 - can_split() checked it
    assert isinstance(client, LazyClient)  # noqa: S101
    store = StateStore(state.url)
    fresh = client.fresh()

    def progress(_stream: str, read: int, _total: int | None) -> None:
        pipe.send(("progress", read))

    rate = io.delivery.max_rps
    pace = RateLimiter(rate / part.parts) if io.pace is not None and rate else None
    try:
        yield dataclasses.replace(
            io,
            state=store,
            client=fresh,
            progress=progress if io.progress is not None else None,
            stop=stop,
            noted=set(io.noted),
            pace=pace,
        )
    finally:
        fresh.close()
        store.close()


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when the parent (pid `parent`) dies (kill -9,
    OOM): a worker must not go on writing a state store whose run lock is gone.
    Elsewhere the parent's `finally` is all there is. (The parent may be PID 1 in a
    container: compare with its pid, not with 1.)"""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


def peak_rss_mb() -> float:
    import resource  # noqa: PLC0415 - once a stream's parts are done, not on every start

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _portable(exc: BaseException) -> tuple[type[EtlError], tuple[Any, ...], dict[str, Any]]:
    """An error as the pipe can carry it and the parent raise it again (`_rebuilt`):
    an EtlError keeps its class, message and attributes (some take keyword-only
    arguments, which plain pickling would not pass back); anything else (a bug)
    becomes an EtlError carrying the worker's traceback."""
    if isinstance(exc, EtlError):
        return type(exc), exc.args, dict(vars(exc))
    # a bug's text is foreign: masked like any other (a URL in it may carry the token)
    text = redact.foreign("".join(traceback.format_exception(exc)).rstrip())
    message = f"a worker failed unexpectedly: {type(exc).__name__}: {redact.foreign(str(exc))}"
    return EtlError, (f"{message} — please report it with this traceback:\n{text}",), {}


def _rebuilt(cls: type[EtlError], args: tuple[Any, ...], attrs: dict[str, Any]) -> EtlError:
    """The worker's error, of its own class, without calling that class's __init__."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(attrs)
    return exc
