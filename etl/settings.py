"""Every default of the job, once, as frozen settings objects.

The CLI's option defaults, the library API's keyword defaults, the dataclass
defaults of the stages and the docs' options table (checked by a test) all read
them from here. Pure data: nothing here reads the environment or does I/O; the
environment variables are the CLI's (and, for the secrets and the endpoint,
`etl.api`'s).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

LogFormat = Literal["console", "json"]


@dataclass(frozen=True)
class JobSettings:
    """Where the job keeps its state and finds its mappings, and how it logs."""

    state_url: str = "sqlite:///etl-state.db"
    mappings_dir: Path = Path("mappings")
    # None: console on a TTY, json otherwise (etl.logs.configure decides)
    log_format: LogFormat | None = None


@dataclass(frozen=True)
class ReadSettings:
    """How the source is read (SPEC §5)."""

    # rows per keyset page, at most; and about this many bytes of values per page
    # (memory is a few pages per stream: wide rows make shorter pages)
    page_size: int = 2000
    page_bytes: int = 2_000_000
    # a mapping's `lookback:` when it has none
    lookback_seconds: float = 600.0
    # an older open transaction no longer holds the watermark back
    max_transaction_age: dt.timedelta = dt.timedelta(hours=1)
    # a lost source connection: reconnects per outage, and the time they may take
    reconnect_attempts: int = 5
    reconnect_time: dt.timedelta = dt.timedelta(minutes=1)
    # a mapping's `full_every:` when it has none (SPEC §9): a sync becomes a full read
    # when the last one is older. A week: deletions and changes no cursor sees reach
    # Hyperengage within days, for one full pass per stream per week.
    full_every_seconds: float | None = 7 * 86400.0
    # `validate --check-source`: rows read from each end of the key and cursor orders
    sample_rows: int = 50
    # `--workers`: a full read of at least this many rows (estimated) is split between
    # worker processes; below it, forking and the extra connections do not pay
    parallel_min_rows: int = 50_000


@dataclass(frozen=True)
class DeliverySettings:
    """How to talk to the Hyperengage events API over HTTP (SPEC §6).

    Holds no secret: the token travels apart, as a `Secret`.
    """

    endpoint: str = "https://events.hyperengage.io/api/v1/s2s/event"
    batch_size: int = 500
    batch_bytes: int = 450_000
    concurrency: int = 2
    max_rps: float | None = None  # None: unlimited
    timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0
    # retries of one request: bounded by attempts and by total time
    max_attempts: int = 8
    max_retry_seconds: float = 300.0


@dataclass(frozen=True)
class EventIdentity:
    """Whose events these are: the keys every event carries (SPEC §2).

    Apart from the HTTP settings, so a dry run, which sends nothing, needs no
    endpoint or token to build the events it shows.
    """

    api_key: str
    workspace_key: str


# `etl diff` as text on a terminal lists at most this many records per stream
# (invalid first); `--all`, `--limit`, a pipe or `--output` list more.
DIFF_TERMINAL_LIMIT: Final = 25


@dataclass(frozen=True)
class ReceiverSettings:
    """Where `etl receiver` (the local stand-in for the API) listens and stores.

    The receiver package keeps its own keyword defaults, as it keeps its own copy
    of the API's rules; these are the command's.
    """

    host: str = "127.0.0.1"
    port: int = 8001
    store: Path = Path("received.db")


# Limits of the sending options, shared by the CLI's ranges and the API's checks.
MIN_BATCH_BYTES: Final = 1024
MAX_BATCH_SIZE: Final = 10_000
MAX_CONCURRENCY: Final = 32
# `--workers`: at most this many processes for a full read; its default is one per
# CPU this process may use, at most AUTO_WORKERS_MAX (more connections to the source
# and the state store than that rarely pay on the machines cron jobs run on)
MAX_WORKERS: Final = 64
AUTO_WORKERS_MAX: Final = 4


def default_workers() -> int:
    """`--workers` when not given: one per usable CPU, at most AUTO_WORKERS_MAX."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no sched_getaffinity
        cpus = os.cpu_count() or 1
    return max(1, min(AUTO_WORKERS_MAX, cpus))


JOB: Final = JobSettings()
READ: Final = ReadSettings()
DELIVERY: Final = DeliverySettings()
RECEIVER: Final = ReceiverSettings()

_UNITS: Final = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def duration_text(value: dt.timedelta) -> str:
    """A duration as the options spell it: `1h`, `10m`, `90s` (largest whole unit)."""
    seconds = value.total_seconds()
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
