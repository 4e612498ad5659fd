"""The library API: `sync`, `backfill`, `diff` and `validate` as plain functions.

Orchestrators (Airflow, Dagster, Prefect) call these directly, as
`etl.sync(...)` etc.; the CLI is a thin shell over them. Keyword-only arguments
mirror the CLI options. Left out, the token, the API and workspace keys and the
endpoint are read from the CLI's environment variables (HYPERENGAGE_TOKEN, ...);
everything else defaults to `etl.settings` (as the CLI does), not to ETL_*. `sync`/`backfill` return
the RunReport (status "ok", or "partial" where the CLI exits 3), `diff` also the
DiffReport; every failure raises an `etl.errors.EtlError`. Monitoring
(`--metrics-file`, `--notify-url`) and logging set-up are the CLI's; an
orchestrator has its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import redact
from etl.delivery import load
from etl.errors import MappingError, SourceError, UsageError
from etl.mapping.fields import parse_lookback
from etl.mapping.parse import load_mappings
from etl.mapping.schema import SCHEMA_FILE, mapping_schema_text
from etl.model import DiffReport, Mapping, RunReport, Secret, Shard
from etl.run.options import Collaborators, Progress, RunOptions
from etl.run.pipeline import run
from etl.settings import (
    DELIVERY,
    JOB,
    MAX_WORKERS,
    MIN_BATCH_BYTES,
    READ,
    DeliverySettings,
    EventIdentity,
    default_workers,
)
from etl.source import check, extract
from etl.source import drivers as sourcedb
from etl.source.resume import Reconnect
from etl.state.store import StateStore

if TYPE_CHECKING:
    from etl.source.scaffold import Draft

# A duration as the API takes it: "30s", "10m", "2h", "1d", seconds, or a timedelta.
Duration = str | float | dt.timedelta


def sync(
    *,
    source_url: str,
    state_url: str = JOB.state_url,
    mappings_dir: str | Path = JOB.mappings_dir,
    streams: Sequence[str] | None = None,
    full: bool = False,
    page_size: int = READ.page_size,
    shard: str | Shard | None = None,
    max_transaction_age: Duration = READ.max_transaction_age,
    reconnect_attempts: int = READ.reconnect_attempts,
    reconnect_time: Duration = READ.reconnect_time,
    endpoint: str | None = None,
    token: str | Secret | None = None,
    token_file: str | Path | None = None,
    api_key: str | None = None,
    workspace_key: str | None = None,
    batch_size: int = DELIVERY.batch_size,
    batch_bytes: int = DELIVERY.batch_bytes,
    concurrency: int = DELIVERY.concurrency,
    max_rps: float | None = DELIVERY.max_rps,
    workers: int | None = None,
    stop: threading.Event | None = None,
) -> RunReport:
    """Incremental sync of every stream (accounts first); `full` re-reads all rows;
    a full read of a big stream is split between `workers` processes (default: one
    per CPU, at most settings.AUTO_WORKERS_MAX)."""
    mappings = load_mappings(Path(mappings_dir), streams=streams)
    sending = _sending(
        endpoint=endpoint,
        token=token,
        token_file=token_file,
        api_key=api_key,
        workspace_key=workspace_key,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        concurrency=concurrency,
        max_rps=max_rps,
    )
    options = RunOptions(
        mode="full" if full else "incremental",
        page_size=page_size,
        shard=parse_shard(shard),
        max_transaction_age=parse_age(max_transaction_age),
        reconnect=parse_reconnect(reconnect_attempts, reconnect_time),
        workers=parse_workers(workers),
        parallel_min_rows=READ.parallel_min_rows if workers is None else 0,
    )
    return _send(
        "sync",
        mappings,
        options,
        source_url=source_url,
        state_url=state_url,
        sending=sending,
        stop=stop,
    )


def backfill(
    *,
    source_url: str,
    state_url: str = JOB.state_url,
    mappings_dir: str | Path = JOB.mappings_dir,
    streams: Sequence[str] | None = None,
    force: bool = False,
    restart: bool = False,
    since: str | None = None,
    page_size: int = READ.page_size,
    shard: str | Shard | None = None,
    max_transaction_age: Duration = READ.max_transaction_age,
    reconnect_attempts: int = READ.reconnect_attempts,
    reconnect_time: Duration = READ.reconnect_time,
    endpoint: str | None = None,
    token: str | Secret | None = None,
    token_file: str | Path | None = None,
    api_key: str | None = None,
    workspace_key: str | None = None,
    batch_size: int = DELIVERY.batch_size,
    batch_bytes: int = DELIVERY.batch_bytes,
    concurrency: int = DELIVERY.concurrency,
    max_rps: float | None = DELIVERY.max_rps,
    workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> RunReport:
    """Full historical load, resumable from the last acknowledged page; track
    streams send their history once (`since`: 90d, 12h or a date; `force`: again).
    A big stream is read by `workers` processes (default: one per CPU, at most 4)."""
    mappings = load_mappings(Path(mappings_dir), streams=streams)
    sending = _sending(
        endpoint=endpoint,
        token=token,
        token_file=token_file,
        api_key=api_key,
        workspace_key=workspace_key,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        concurrency=concurrency,
        max_rps=max_rps,
    )
    options = RunOptions(
        mode="backfill",
        force=force,
        restart=restart,
        since=since or None,
        page_size=page_size,
        shard=parse_shard(shard),
        max_transaction_age=parse_age(max_transaction_age),
        reconnect=parse_reconnect(reconnect_attempts, reconnect_time),
        workers=parse_workers(workers),
        parallel_min_rows=READ.parallel_min_rows if workers is None else 0,
    )
    return _send(
        "backfill",
        mappings,
        options,
        source_url=source_url,
        state_url=state_url,
        sending=sending,
        stop=stop,
        progress=progress,
    )


def diff(
    *,
    source_url: str,
    state_url: str = JOB.state_url,
    mappings_dir: str | Path = JOB.mappings_dir,
    streams: Sequence[str] | None = None,
    full: bool = False,
    limit: int | None = None,
    page_size: int = READ.page_size,
    shard: str | Shard | None = None,
    max_transaction_age: Duration = READ.max_transaction_age,
    reconnect_attempts: int = READ.reconnect_attempts,
    reconnect_time: Duration = READ.reconnect_time,
    api_key: str | None = None,
    workspace_key: str | None = None,
) -> tuple[RunReport, DiffReport]:
    """Dry run: what `sync` would send, record by record. Sends and writes nothing."""
    mappings = load_mappings(Path(mappings_dir), streams=streams)
    # Sends nothing: no endpoint, no token; the keys only go into the event ids shown.
    identity = event_identity(api_key=api_key, workspace_key=workspace_key, required=False)
    options = RunOptions(
        mode="full" if full else "incremental",
        dry_run=True,
        diff_limit=limit,
        page_size=page_size,
        shard=parse_shard(shard),
        max_transaction_age=parse_age(max_transaction_age),
        reconnect=parse_reconnect(reconnect_attempts, reconnect_time),
    )
    with _source(source_url) as source, _state(state_url, readonly=True) as state:
        check.prepare(source, mappings)
        io = Collaborators(source=source, state=state, identity=identity)
        report, diff_report = run(mappings, command="diff", options=options, io=io)
    if diff_report is None:  # pragma: no cover - run() returns one for dry runs
        raise RuntimeError("dry run returned no diff")
    return report, diff_report


def validate(
    *,
    mappings_dir: str | Path = JOB.mappings_dir,
    source_url: str | None = None,
    streams: Sequence[str] | None = None,
) -> list[str]:
    """Check every mapping file, and with `source_url` the source too.

    Raises MappingError listing every problem; returns informational notes
    (e.g. how many rows have a NULL cursor).
    """
    mappings = load_mappings(Path(mappings_dir), streams=streams)
    if source_url is None:
        return []
    from etl.run import sample  # noqa: PLC0415 - only validate samples rows: no import cost elsewhere

    with _source(source_url) as source:
        notes = check.check_source(source, mappings)
        # SPEC §11: real rows through the transform, before any run
        problems, sampled = sample.sample_source(source, mappings, rows=READ.sample_rows)
    if problems:
        raise MappingError([*problems, *(f"note: {line}" for line in sampled)])
    return [*notes, *sampled]


def init(
    *,
    source_url: str,
    out_dir: str | Path = JOB.mappings_dir,
    force: bool = False,
) -> tuple[Draft, ...]:
    """Write mapping files for the users and workspaces tables found in the source, and
    the mapping JSON Schema next to them (`mapping.schema.json`, for editors).

    Never overwrites a file unless `force` (UsageError naming the files, before
    anything is written). Returns the drafts written, each with its to-dos.
    """
    from etl.source import introspect, scaffold  # noqa: PLC0415 - only init drafts mappings

    with _source(source_url) as source:
        tables = introspect.inspect_tables(source)
        dialect = source.dialect.name
    drafts = scaffold.draft_mappings(tables, dialect=dialect)
    if not drafts:
        names = ", ".join(t.name for t in tables) or "none"
        raise UsageError(
            f"source {_safe_url(source_url)}: no table looks like the users table (tables: "
            f"{names}) — write the mapping by hand from the example in docs/mappings.md"
        )
    out = Path(out_dir)
    files = {out / d.filename: d.text for d in drafts}
    files[out / SCHEMA_FILE] = mapping_schema_text()
    existing = [str(p) for p, text in files.items() if p.exists() and p.read_text() != text]
    if existing and not force:
        raise UsageError(
            f"{', '.join(existing)}: already exists — pass --force to overwrite, or --out DIR"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"{out}: cannot write the mapping files ({exc.strerror}) — use --out DIR"
        ) from None
    return drafts


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(the URL)"


# ---------------------------------------------------------------- plumbing


def _send(
    command: str,
    mappings: list[Mapping],
    options: RunOptions,
    *,
    source_url: str,
    state_url: str,
    sending: _Sending,
    stop: threading.Event | None,
    progress: Progress | None = None,
) -> RunReport:
    """Open the source and the state (locked), ready the HTTP client (made on the
    first request: nothing to send, no client); run; close them all."""
    with (
        _source(source_url) as source,
        _state(state_url, readonly=False) as state,
        load.LazyClient(sending.settings, sending.token) as client,
    ):
        check.prepare(source, mappings)  # a configuration error: exit 2, nothing sent
        state.acquire(command, shard=options.shard)
        io = Collaborators(
            source=source,
            state=state,
            identity=sending.identity,
            delivery=sending.settings,
            client=client,
            progress=progress,
            stop=stop or threading.Event(),
            pace=load.RateLimiter(sending.settings.max_rps) if sending.settings.max_rps else None,
        )
        report, _ = run(mappings, command=command, options=options, io=io)
    return report


def parse_workers(value: int | None) -> int:
    """`--workers`: not given, one per CPU (at most AUTO_WORKERS_MAX), for full reads
    of READ.parallel_min_rows rows or more; given, that many for every full read, as
    asked (the callers set RunOptions.parallel_min_rows so). UsageError when out of
    range."""
    if value is None:
        return default_workers()
    if not 1 <= value <= MAX_WORKERS:
        raise UsageError(f"--workers: {value} — use 1 to {MAX_WORKERS} (1: one process)")
    return value


def parse_age(value: Duration) -> dt.timedelta:
    """`--max-transaction-age`: 30s, 10m, 2h, 1d, seconds or a timedelta -> timedelta
    (UsageError if not)."""
    if isinstance(value, dt.timedelta):
        return value
    try:
        return dt.timedelta(seconds=parse_lookback(value))
    except ValueError as exc:
        raise UsageError(
            f"--max-transaction-age: {exc} — use 30s, 10m, 2h, 1d or a number of seconds"
        ) from None


def parse_reconnect(attempts: int, time: Duration) -> Reconnect:
    """`--reconnect-attempts` and `--reconnect-time` -> the budget for a lost source
    connection (UsageError if not)."""
    if attempts < 0:
        raise UsageError(f"--reconnect-attempts: {attempts} — use 0 (never) or more")
    if isinstance(time, dt.timedelta):
        seconds = time.total_seconds()
    else:
        try:
            seconds = parse_lookback(time)
        except ValueError as exc:
            raise UsageError(
                f"--reconnect-time: {exc} — use 30s, 10m, 2h, 1d or a number of seconds"
            ) from None
    return Reconnect(attempts=attempts, seconds=seconds)


def parse_shard(shard: str | Shard | None) -> Shard | None:
    """`"I/N"` (or a Shard, or None) -> Shard; a UsageError says how to write it."""
    if shard is None or isinstance(shard, Shard):
        return shard
    try:
        return Shard.parse(shard)
    except ValueError as exc:
        raise UsageError(f"--shard {exc}") from None


@dataclass(frozen=True)
class _Sending:
    """What a sending run needs beyond reading: checked before anything is read."""

    settings: DeliverySettings
    token: Secret
    identity: EventIdentity


def _sending(
    *,
    endpoint: str | None,
    token: str | Secret | None,
    token_file: str | Path | None,
    api_key: str | None,
    workspace_key: str | None,
    batch_size: int,
    batch_bytes: int,
    concurrency: int,
    max_rps: float | None,
) -> _Sending:
    """The token, the HTTP settings and the event identity, each checked (exit 2 if not)."""
    return _Sending(
        token=delivery_token(token, token_file),
        settings=delivery_settings(
            endpoint=endpoint,
            batch_size=batch_size,
            batch_bytes=batch_bytes,
            concurrency=concurrency,
            max_rps=max_rps,
        ),
        identity=event_identity(api_key=api_key, workspace_key=workspace_key, required=True),
    )


def delivery_settings(
    *,
    endpoint: str | None = None,
    batch_size: int = DELIVERY.batch_size,
    batch_bytes: int = DELIVERY.batch_bytes,
    concurrency: int = DELIVERY.concurrency,
    max_rps: float | None = DELIVERY.max_rps,
) -> DeliverySettings:
    """How to send (the endpoint from HYPERENGAGE_ENDPOINT when not given), checked:
    an endpoint the token must not go to, or sizes out of range, are a UsageError."""
    endpoint = _env(endpoint, "HYPERENGAGE_ENDPOINT") or DELIVERY.endpoint
    load.check_endpoint(endpoint)
    if batch_size < 1 or batch_bytes < MIN_BATCH_BYTES or concurrency < 1:
        raise UsageError(
            "--batch-size and --concurrency must be at least 1, "
            f"--batch-bytes at least {MIN_BATCH_BYTES}"
        )
    return dataclasses.replace(
        DELIVERY,
        endpoint=endpoint,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        concurrency=concurrency,
        max_rps=max_rps,
    )


def event_identity(
    *, api_key: str | None = None, workspace_key: str | None = None, required: bool
) -> EventIdentity:
    """The keys every event carries, given or from HYPERENGAGE_API_KEY and
    HYPERENGAGE_WORKSPACE_KEY; `required` (to send): a UsageError names the missing."""
    api_key = _env(api_key, "HYPERENGAGE_API_KEY")
    workspace_key = _env(workspace_key, "HYPERENGAGE_WORKSPACE_KEY")
    missing = [
        name
        for name, value in (
            ("HYPERENGAGE_API_KEY", api_key),
            ("HYPERENGAGE_WORKSPACE_KEY", workspace_key),
        )
        if not value
    ]
    if required and missing:
        raise UsageError(
            f"{' and '.join(missing)} not set — export them (Hyperengage → Settings → API keys)"
        )
    return EventIdentity(api_key=api_key or "", workspace_key=workspace_key or "")


def delivery_token(token: str | Secret | None, token_file: str | Path | None) -> Secret:
    """The server token: given, from a file, or from HYPERENGAGE_TOKEN (never argv)."""
    if isinstance(token, Secret):
        value = token.reveal()
    elif token:
        value = token
    elif token_file:
        try:
            value = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(
                f"--token-file {token_file}: cannot read it ({exc.strerror}) — check the path "
                "and its permissions"
            ) from None
    else:
        value = os.environ.get("HYPERENGAGE_TOKEN", "").strip()
    if not value:
        raise UsageError(
            "no Hyperengage server token — export HYPERENGAGE_TOKEN or pass --token-file PATH "
            "(never on the command line: process lists are public)"
        )
    redact.register_secret(value)
    return Secret(value)


def _env(value: str | None, name: str) -> str | None:
    return value if value else os.environ.get(name) or None


@contextlib.contextmanager
def _source(url: str) -> Iterator[Engine]:
    if not url:
        raise UsageError("no source database — pass --source URL or set ETL_SOURCE_URL")
    try:
        engine = extract.create_source_engine(url)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:  # ValueError: a bad port
        raise UsageError(
            f"--source: {exc} — use a SQLAlchemy URL such as "
            "postgresql+psycopg://user@host/db, mysql+pymysql://user@host/db or sqlite:///app.db"
        ) from None
    database = engine.url.database or ""
    if engine.dialect.name == "sqlite" and _missing_file(database):
        engine.dispose()
        # SQLite would create an empty database there: every table "missing"
        raise SourceError(
            f"source {url}: no such file {database} — check --source / ETL_SOURCE_URL"
        )
    # ±infinity timestamps, invalid UTF-8: invalid records, not a failed read
    sourcedb.install(engine)
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        safe = engine.url.render_as_string(hide_password=True)
        raise SourceError(
            f"source {safe}: cannot connect: {redact.first_line(exc.orig)} — check the URL, the "
            "server and the credentials"
        ) from None
    try:
        yield engine
    finally:
        engine.dispose()


def _missing_file(database: str) -> bool:
    """A SQLite database path (not `:memory:`, not a `file:` URI) with no file there."""
    return (
        database not in ("", ":memory:")
        and not database.startswith("file:")
        and not Path(database).is_file()
    )


@contextlib.contextmanager
def _state(url: str, *, readonly: bool) -> Iterator[StateStore]:
    store = StateStore(url, readonly=readonly)
    try:
        yield store
    finally:
        store.close()


__all__ = [
    "backfill",
    "delivery_settings",
    "diff",
    "event_identity",
    "init",
    "sync",
    "validate",
]
