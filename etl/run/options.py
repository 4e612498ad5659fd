"""What a run is asked to do (`RunOptions`) and the I/O it is given (`Collaborators`).

Built by the caller (`api`, a test), read by `run.pipeline` and `run.plan`;
`Collaborators.state` is anything that fulfils `run.ports.StatePort`.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sqlalchemy.engine import Engine

from etl.delivery.load import RateLimiter
from etl.model import Shard
from etl.run.ports import StatePort
from etl.settings import DELIVERY, READ, DeliverySettings, EventIdentity
from etl.source.resume import Reconnect

if TYPE_CHECKING:
    from etl.delivery.load import Client  # names httpx: loaded by what sends only

Mode = Literal["incremental", "full", "backfill"]
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class RunOptions:
    """What kind of run, and its knobs."""

    mode: Mode = "incremental"
    dry_run: bool = False
    force: bool = False  # backfill: send records even when unchanged
    restart: bool = False  # backfill: ignore the checkpoint
    page_size: int = READ.page_size
    diff_limit: int | None = None  # dry run: records listed per stream
    shard: Shard | None = None  # this worker's share of every stream
    max_transaction_age: dt.timedelta = READ.max_transaction_age
    since: str | None = None  # backfill of track streams: how far back (90d, 2024-01-31)
    # a lost source connection: how hard to try again
    reconnect: Reconnect = field(default_factory=Reconnect)
    # full reads of at least parallel_min_rows rows (estimated) are split between
    # this many worker processes (run.parallel); 1 reads in this process
    workers: int = 1
    parallel_min_rows: int = READ.parallel_min_rows


@dataclass
class Collaborators:
    """The I/O a run needs, built by the caller (the CLI or a test)."""

    source: Engine
    state: StatePort
    identity: EventIdentity  # the keys every event carries
    delivery: DeliverySettings = DELIVERY
    client: Client | None = None  # a load.LazyClient (or a client); None: a dry run
    progress: Progress | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    sleep: Callable[[float], None] = time.sleep
    noted: set[str] = field(default_factory=set)  # horizon notes already logged this run
    # --max-rps for the whole run: one limiter shared by every stream's delivery
    pace: RateLimiter | None = None
