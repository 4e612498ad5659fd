"""The `etl` command line: parse options, configure logging, call the library, render.

The only module that imports click or exits. Every option has an environment
variable (flags win); the token is read from HYPERENGAGE_TOKEN or
--token-file only, never from argv. `EXIT_CODES` maps errors to exit codes in
one place (SPEC §3).
"""

from __future__ import annotations

import contextvars

# Longer than STYLE's split point on purpose: it must stay the only click module.
import dataclasses
import functools
import gc
import inspect
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson
import structlog

from etl import __version__, api, logs, redact
from etl.errors import (
    EtlError,
    LockedError,
    MappingError,
    UsageError,
)
from etl.mapping.schema import SCHEMA_FILE, mapping_schema_text
from etl.model import RunReport
from etl.report import render as report
from etl.report.common import MORE_HINT
from etl.settings import (
    AUTO_WORKERS_MAX,
    DELIVERY,
    DIFF_TERMINAL_LIMIT,
    JOB,
    MAX_BATCH_SIZE,
    MAX_CONCURRENCY,
    MAX_WORKERS,
    MIN_BATCH_BYTES,
    READ,
    RECEIVER,
    duration_text,
)
from etl.state.store import StateStore, StreamSummary, encode_watermark

if TYPE_CHECKING:  # imported by a monitored run only (_monitored): every import costs every run
    from etl.monitor import outcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_CODES: tuple[tuple[type[EtlError], int], ...] = (
    (UsageError, EXIT_USAGE),
    (MappingError, EXIT_USAGE),
    (LockedError, EXIT_LOCKED),
    (EtlError, EXIT_FAILED),
)
F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("etl")


# ---------------------------------------------------------------- shared options


def _options(*options: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying several click options, in the order listed."""

    def apply(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


# Every command's logging options (the name predates --quiet).
_log_format = _options(
    click.option(
        "--log-format",
        envvar="ETL_LOG_FORMAT",
        type=click.Choice(["console", "json"]),
        default=JOB.log_format,
        help="Log lines: console on a TTY, json otherwise. [env ETL_LOG_FORMAT]",
    ),
    click.option(
        "--quiet",
        "-q",
        envvar="ETL_QUIET",
        is_flag=True,
        help="Only the final summary (stdout) and errors (stderr): no log lines, no "
        "progress, e.g. for a cron mail. [env ETL_QUIET]",
    ),
)
# --quiet of the running command, for the helpers that print progress
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet", default=False)

_state = click.option(
    "--state",
    "state_url",
    envvar="ETL_STATE_URL",
    default=JOB.state_url,
    show_default=True,
    metavar="URL",
    help="State store: a SQLite file or PostgreSQL. [env ETL_STATE_URL]",
)

# Options every data command takes.
_common = _options(
    click.option(
        "--source",
        "source_url",
        envvar="ETL_SOURCE_URL",
        metavar="URL",
        help="Source database (SQLAlchemy URL), e.g. postgresql+psycopg://app@db/app. "
        "[env ETL_SOURCE_URL]",
    ),
    _state,
    click.option(
        "--mappings",
        "mappings_dir",
        envvar="ETL_MAPPINGS",
        default=JOB.mappings_dir,
        show_default=True,
        metavar="DIR",
        type=click.Path(path_type=Path),
        help="Directory of mapping files (*.yml). [env ETL_MAPPINGS]",
    ),
    click.option(
        "--stream",
        "streams",
        multiple=True,
        metavar="NAME",
        help="Only this stream (repeatable). Default: every stream.",
    ),
    _log_format,
)


# Options of the commands that read rows (sync, backfill, diff).
_reading = _options(
    click.option(
        "--page-size",
        envvar="ETL_PAGE_SIZE",
        default=READ.page_size,
        show_default=True,
        type=click.IntRange(1, 1_000_000),
        help="Rows per keyset page read from the source. [env ETL_PAGE_SIZE]",
    ),
    click.option(
        "--shard",
        envvar="ETL_SHARD",
        metavar="I/N",
        help="Be worker I of N (0-based): handle the records whose key hashes to I, "
        "with an own watermark and lock. [env ETL_SHARD]",
    ),
    click.option(
        "--max-transaction-age",
        envvar="ETL_MAX_TRANSACTION_AGE",
        default=duration_text(READ.max_transaction_age),
        show_default=True,
        metavar="DURATION",
        help="A source transaction open longer than this (30s, 10m, 2h, 1d) no longer "
        "holds the watermark back; it is logged. [env ETL_MAX_TRANSACTION_AGE]",
    ),
    click.option(
        "--reconnect-attempts",
        envvar="ETL_RECONNECT_ATTEMPTS",
        default=READ.reconnect_attempts,
        show_default=True,
        type=click.IntRange(0, 1000),
        help="A lost source connection is opened again up to N times (with backoff), "
        "and the read resumes where it was. [env ETL_RECONNECT_ATTEMPTS]",
    ),
    click.option(
        "--reconnect-time",
        envvar="ETL_RECONNECT_TIME",
        default=duration_text(READ.reconnect_time),
        show_default=True,
        metavar="DURATION",
        help="The time those reconnects may take in all, per outage (30s, 10m). "
        "[env ETL_RECONNECT_TIME]",
    ),
)


# Options of the commands that send (sync, backfill).
_sending = _options(
    click.option(
        "--endpoint",
        envvar="HYPERENGAGE_ENDPOINT",
        default=DELIVERY.endpoint,
        show_default=True,
        metavar="URL",
        help="Hyperengage events endpoint (HTTPS, or http to loopback). [env HYPERENGAGE_ENDPOINT]",
    ),
    click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        metavar="PATH",
        help="Read the server token from this file instead of HYPERENGAGE_TOKEN.",
    ),
    click.option(
        "--batch-size",
        envvar="ETL_BATCH_SIZE",
        default=DELIVERY.batch_size,
        show_default=True,
        type=click.IntRange(1, MAX_BATCH_SIZE),
        help="Events per request at most. [env ETL_BATCH_SIZE]",
    ),
    click.option(
        "--batch-bytes",
        envvar="ETL_BATCH_BYTES",
        default=DELIVERY.batch_bytes,
        show_default=True,
        type=click.IntRange(MIN_BATCH_BYTES),
        help="Bytes per request at most. [env ETL_BATCH_BYTES]",
    ),
    click.option(
        "--concurrency",
        envvar="ETL_CONCURRENCY",
        default=DELIVERY.concurrency,
        show_default=True,
        type=click.IntRange(1, MAX_CONCURRENCY),
        help="Requests in flight. [env ETL_CONCURRENCY]",
    ),
    click.option(
        "--max-rps",
        envvar="ETL_MAX_RPS",
        default=DELIVERY.max_rps,
        type=click.FloatRange(min=0.1),
        help="Requests per second at most (default: unlimited). [env ETL_MAX_RPS]",
    ),
)


# Worker processes for full reads (sync, backfill).
_workers = click.option(
    "--workers",
    envvar="ETL_WORKERS",
    type=click.IntRange(1, MAX_WORKERS),
    metavar="N",
    help="Split each full read (backfill, sync --full, a full_every pass) between N "
    "processes, each reading its share of the keys; 1: one process. Default: one per "
    f"CPU (at most {AUTO_WORKERS_MAX}) for streams of {READ.parallel_min_rows:,}+ rows. "
    "[env ETL_WORKERS]",
)


# Options that report a sending run to monitoring (sync, backfill).
_monitoring = _options(
    click.option(
        "--metrics-file",
        envvar="ETL_METRICS_FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="PATH",
        help="After the run (ok or not), write its figures here in the Prometheus text "
        "format, for node_exporter's textfile collector. [env ETL_METRICS_FILE]",
    ),
    click.option(
        "--notify-url",
        envvar="ETL_NOTIFY_URL",
        metavar="URL",
        help="After the run (ok or not), POST a JSON summary here; {exit_code} in the URL "
        "is replaced (healthchecks.io: https://hc-ping.com/UUID/{exit_code}). "
        "[env ETL_NOTIFY_URL]",
    ),
)


def _handled(func: F) -> F:
    """Run a command body; map EtlError to its exit code, in one place."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet = bool(kwargs.pop("quiet", False))
        _QUIET.set(quiet)
        chosen = logs.configure(kwargs.pop("log_format", None), quiet=quiet)
        # An error is printed once, as `error: ...`; JSON logs also get it as a record
        # for log pipelines, console logs do not (the same line twice on one screen).
        as_record = chosen == "json"
        try:
            return func(*args, **kwargs)
        except EtlError as exc:
            code = _exit_code(exc)
            # Our own words: their foreign parts were masked where they were put in
            # (etl.redact); masking the whole would rewrite words that equal a secret.
            message = str(exc)
            if as_record:
                log.error("run.failed", error=type(exc).__name__, exit_code=code, message=message)
            click.echo(f"error: {message}", err=True)
            sys.exit(code)
        except Exception as exc:
            # A bug, or a library error we did not foresee: still exit 1, and
            # still never print the token (tracebacks carry URLs and values).
            trace = redact.foreign(traceback.format_exc())
            if as_record:
                log.error("run.crashed", error=type(exc).__name__, exit_code=EXIT_FAILED)
            click.echo(
                f"error: unexpected {type(exc).__name__} — please report it:\n{trace}", err=True
            )
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """First SIGINT/SIGTERM: finish in-flight batches, then stop. Second: abort."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("run.stopping", signal=signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _finish(run: RunReport) -> None:
    click.echo(report.render_run_report(run))
    if run.status == "partial":
        sys.exit(EXIT_PARTIAL)


# Options of the commands that read the state store only (state show/reset, runs).
_state_store = _options(_state, _log_format)
_table_format = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)


# ---------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="etl")
def main() -> None:
    """Keep Hyperengage in step with your own users and workspaces tables.

    \b
    Typical use:
      etl validate --check-source        check the mapping files against the database
      etl diff                           what would be sent, field by field (dry run)
      etl backfill                       the first, full historical load (resumable)
      etl sync                           nightly: send only what changed

    Secrets come from the environment: HYPERENGAGE_TOKEN (or --token-file),
    HYPERENGAGE_API_KEY and HYPERENGAGE_WORKSPACE_KEY.

    \b
    Exit codes: 0 ok, 1 run failed, 2 usage/configuration/mapping error,
    3 finished but some records were invalid or rejected, 4 another run holds the lock.
    """
    # What the imports made lives until the process exits: out of the cyclic
    # collector's way, or its collections walk it again and again during the run
    # (~10-30 ms of a sync). Once a process: a test's CliRunner calls this often.
    if gc.get_freeze_count() == 0:
        gc.freeze()


@main.command()
@_common
@click.option("--check-source", is_flag=True, help="Also check tables, columns and SQL.")
@_handled
def validate(
    *,
    source_url: str | None,
    state_url: str,
    mappings_dir: Path,
    streams: tuple[str, ...],
    check_source: bool,
) -> None:
    """Check every mapping file (and with --check-source, the source database).

    Reports all problems at once, each as `file: key: problem — fix`.
    """
    if check_source and not source_url:
        raise UsageError("--check-source needs --source URL (or ETL_SOURCE_URL)")
    notes = api.validate(
        mappings_dir=mappings_dir,
        source_url=source_url if check_source else None,
        streams=streams or None,
    )
    for note in notes:
        click.echo(f"note: {note}")
    click.echo(
        f"ok: mappings in {mappings_dir} are valid"
        + (" against the source" if check_source else "")
    )


@main.command()
@_common
@_reading
@_sending
@_workers
@_monitoring
@click.option("--full", is_flag=True, help="Re-read every row (still sends only what changed).")
@click.option("--dry-run", is_flag=True, help="Same as `etl diff`: send nothing, write nothing.")
@_handled
def sync(dry_run: bool, **kw: Any) -> None:
    """Send what changed since the last run, account streams before user streams."""
    if dry_run:
        _diff(fmt="text", output=None, limit=None, redact=False, **kw)
        return
    with _stop_on_signals() as stop:
        run = _monitored("sync", kw, lambda: api.sync(**_library_args(api.sync, kw), stop=stop))
    _finish(run)


@main.command()
@_common
@_reading
@_sending
@_workers
@_monitoring
@click.option("--force", is_flag=True, help="Send records even when unchanged since last sent.")
@click.option("--restart", is_flag=True, help="Ignore the saved checkpoint and start over.")
@click.option(
    "--since",
    envvar="ETL_SINCE",
    metavar="DURATION|DATE",
    help="Track streams: send history only this far back (90d, 12h, 2024-01-31); "
    "default all of it. [env ETL_SINCE]",
)
@_handled
def backfill(**kw: Any) -> None:
    """Full historical load of every stream, resumable after a crash or Ctrl-C.

    Rows with a NULL cursor are included. When it finishes, the nightly `sync`
    carries on from the safe horizon taken at its start. Track streams send
    their history (below where their first sync started) once; a second
    backfill of them needs --force.
    """
    with _stop_on_signals() as stop, _progress() as progress:
        run = _monitored(
            "backfill",
            kw,
            lambda: api.backfill(**_library_args(api.backfill, kw), stop=stop, progress=progress),
        )
    _finish(run)


@main.command()
@_common
@_reading
@click.option("--full", is_flag=True, help="Diff every row; also lists keys gone from the source.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(report.FORMATS),
    default="text",
    show_default=True,
    help="Report format.",
)
@click.option("--output", type=click.Path(path_type=Path), help="Write the report to FILE.")
@click.option(
    "--limit",
    type=click.IntRange(0),
    help="At most N records listed per stream (counts stay exact). "
    f"Default: all, or {DIFF_TERMINAL_LIMIT} as text on a terminal.",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="List every record, also on a terminal.",
)
@click.option("--redact", is_flag=True, help="Mask trait values (emails, names) for sharing.")
@_handled
def diff(fmt: str, output: Path | None, redact: bool, show_all: bool, **kw: Any) -> None:
    """Dry run: what `sync` would send, field by field. Sends and writes nothing."""
    _diff(fmt=fmt, output=output, redact=redact, show_all=show_all, **kw)


def _diff(
    *, fmt: str, output: Path | None, redact: bool, show_all: bool = False, **kw: Any
) -> None:
    to_terminal = fmt == "text" and output is None and sys.stdout.isatty()
    hint = MORE_HINT
    if show_all:
        kw["limit"] = None
    elif kw.get("limit") is None and to_terminal:
        # thousands of new rows would scroll the summary away; a file or pipe gets all
        kw["limit"] = DIFF_TERMINAL_LIMIT
        hint = (
            f"a terminal shows {DIFF_TERMINAL_LIMIT} per stream: `etl diff --all` lists "
            "every one, or pipe it or use --output FILE"
        )
    run, result = api.diff(**_library_args(api.diff, kw))
    text = report.render_diff(result, format=fmt, color=to_terminal, redact=redact, more_hint=hint)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {fmt} report to {output}", err=True)
    else:
        click.echo(text, nl=False)
    if run.status == "partial":
        sys.exit(EXIT_PARTIAL)


@main.group()
def state() -> None:
    """Inspect or reset the state store."""


@state.command("show")
@_state_store
@_table_format
@_handled
def state_show(state_url: str, fmt: str) -> None:
    """Per stream: watermark, records sent, pending rejects and invalid records, the
    last full read; then those records with their reasons."""
    store = StateStore(state_url, readonly=True)
    try:
        streams, rejects = [_as_stored(s) for s in store.summary()], store.rejected()
    finally:
        store.close()
    if fmt == "json":
        click.echo(
            orjson.dumps(
                {"streams": streams, "rejected": rejects}, option=orjson.OPT_INDENT_2, default=str
            ).decode()
        )
        return
    if not streams:
        click.echo(f"no state yet in {state_url} — run `etl sync` or `etl backfill` first")
        return
    click.echo(
        report.render_table(
            streams,
            [
                "stream",
                "watermark",
                "records",
                "rejected",
                "invalid",
                "last_full_read",
                "checkpoint",
                "updated_at",
            ],
        )
    )
    if rejects:
        click.echo("\nrejected and invalid records (re-read by key by every sync):")
        click.echo(
            report.render_table(
                [dataclasses.asdict(r) for r in rejects],
                ["stream", "kind", "key", "attempts", "last_seen", "message"],
            )
        )


def _as_stored(summary: StreamSummary) -> dict[str, Any]:
    """A stream as `etl state show` prints it: watermark and checkpoint in the
    store's own lossless text (microseconds and offset kept)."""
    shown = dataclasses.asdict(summary)
    if summary.watermark is not None:
        shown["watermark"] = encode_watermark(summary.watermark)[0]
    if summary.checkpoint is not None:
        shown["checkpoint"] = orjson.dumps(summary.checkpoint).decode()
    return shown


@state.command("reset")
@_state_store
@click.option("--stream", required=True, metavar="NAME", help="The stream to forget.")
@_handled
def state_reset(state_url: str, stream: str) -> None:
    """Forget a stream's state: its next sync re-sends every record (a track
    stream's starts afresh at the safe horizon; a backfill re-sends its history)."""
    store = StateStore(state_url)
    try:
        store.acquire("state reset")
        forgotten = store.reset(stream)
    finally:
        store.close()
    click.echo(
        f"reset {stream}: forgot {forgotten} record(s); the next sync re-sends them all "
        "(a track stream: starts afresh at the safe horizon, `etl backfill` sends its history)"
    )


@main.command()
@_state_store
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(1),
    help="How many runs, newest first.",
)
@_table_format
@_handled
def runs(state_url: str, limit: int, fmt: str) -> None:
    """Run history: id, command, start, duration, status, per-stream counts, error."""
    store = StateStore(state_url, readonly=True)
    try:
        rows = store.runs(limit)
    finally:
        store.close()
    if fmt == "json":
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    table = []
    for row in rows:
        seconds = (row.finished_at - row.started_at).total_seconds() if row.finished_at else None
        counts = "; ".join(
            f"{s['stream']}: {s['sent']} sent, {s['invalid']} invalid, {s['rejected']} rejected"
            + (f", {s['gone']} gone" if s.get("gone") else "")
            + (" (full read)" if s.get("full_read") else "")
            for s in row.streams
        )
        table.append({**dataclasses.asdict(row), "seconds": seconds, "counts": counts or "-"})
    click.echo(
        report.render_table(
            table, ["id", "command", "started_at", "seconds", "status", "counts", "error"]
        )
    )


@main.command()
@click.option("--host", default=RECEIVER.host, show_default=True, help="Address to listen on.")
@click.option("--port", default=RECEIVER.port, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--store",
    default=RECEIVER.store,
    show_default=True,
    type=click.Path(path_type=Path),
    help="SQLite file the received events are stored in.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Accept the token in this file (default: HYPERENGAGE_TOKEN).",
)
@click.option(
    "--faults",
    type=click.Path(exists=True, path_type=Path),
    metavar="FILE",
    help="JSON fault plan: inject 5xx, 429, drops, latency (see docs/reference.md).",
)
@_log_format
@_handled
def receiver(
    host: str, port: int, store: Path, token_file: Path | None, faults: Path | None
) -> None:
    """A local Hyperengage-compatible receiver, for demos, tests and failure rehearsals."""
    # imported here: only this command needs the server
    from etl.receiver import server as rx  # noqa: PLC0415
    from etl.receiver.faults import load_fault_plan  # noqa: PLC0415

    token = api.delivery_token(None, token_file)
    plan = load_fault_plan(faults) if faults else None

    def started(url: str) -> None:
        # stdout, apart from the logs: the line to paste where etl runs
        click.echo(f"etl receiver: listening; events are stored in {store}")
        click.echo("Point etl at it (in the shell that runs etl sync, with the same token):")
        click.echo(f"  export HYPERENGAGE_ENDPOINT={url}")
        click.echo(
            "Any HYPERENGAGE_API_KEY and HYPERENGAGE_WORKSPACE_KEY are accepted locally. "
            "Ctrl-C stops it."
        )

    rx.serve(
        store=store,
        tokens={token.reveal()},
        faults=plan,
        host=host,
        port=port,
        on_start=started,
    )


@main.command()
@click.option(
    "--source",
    "source_url",
    envvar="ETL_SOURCE_URL",
    metavar="URL",
    help="Source database to introspect (SQLAlchemy URL). [env ETL_SOURCE_URL]",
)
@click.option(
    "--out",
    "out_dir",
    default=JOB.mappings_dir,
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the mapping files to.",
)
@click.option("--force", is_flag=True, help="Overwrite mapping files that already exist.")
@_log_format
@_handled
def init(source_url: str | None, out_dir: Path, force: bool) -> None:
    """Write commented mapping files for the users and workspaces tables of the source."""
    drafts = api.init(source_url=source_url or "", out_dir=out_dir, force=force)
    for draft in drafts:
        click.echo(f"wrote {out_dir / draft.filename} (from table {draft.table})")
        for todo in draft.todo:
            click.echo(f"  to do: {todo}")
    click.echo(f"wrote {out_dir / SCHEMA_FILE} (for editor completion)")
    check = f"etl validate --check-source --mappings {out_dir}"
    click.echo(f"next: read the comments in the files, then `{check}` and `etl diff`")


@main.group()
def schema() -> None:
    """Print the JSON Schemas of etl's file formats, for editors and CI."""


@schema.command("mapping")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the schema to FILE instead of standard output.",
)
def schema_mapping(output: Path | None) -> None:
    """The mapping file format as a JSON Schema (draft 2020-12), from the validator's own
    key definitions. Point the YAML language server at it with a first line
    `# yaml-language-server: $schema=mapping.schema.json`."""
    text = mapping_schema_text()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote the mapping schema to {output}", err=True)


# ---------------------------------------------------------------- helpers


def _exit_code(exc: EtlError) -> int:
    return next(c for kind, c in EXIT_CODES if isinstance(exc, kind))


def _monitored(command: str, kw: dict[str, Any], call: Callable[[], RunReport]) -> RunReport:
    """Run `call`; however it ends (exit 0, 1, 2 or 3), write --metrics-file and POST
    --notify-url. Exit 4 does neither: the run holding the lock will, when it ends."""
    metrics_file: Path | None = kw["metrics_file"]
    notify_url: str | None = kw["notify_url"] or None
    if metrics_file is None and notify_url is None:
        return call()
    from etl.monitor import metrics, notify, outcome  # noqa: PLC0415 - a monitored run's only

    if metrics_file is not None:
        metrics.check_metrics_path(metrics_file)
    if notify_url is not None:
        notify.check_notify_url(notify_url)
    started = time.time()
    try:
        run = call()
    except LockedError:
        raise
    except BaseException as exc:  # a failed run is reported too; a second Ctrl-C as well
        code = _exit_code(exc) if isinstance(exc, EtlError) else EXIT_FAILED
        failed = outcome.from_error(
            command, exc, exit_code=code, started_at=started, finished_at=time.time()
        )
        _publish(failed, metrics_file=metrics_file, notify_url=notify_url)
        raise
    code = EXIT_PARTIAL if run.status == "partial" else EXIT_OK
    finished = outcome.from_report(run, exit_code=code, started_at=started, finished_at=time.time())
    _publish(finished, metrics_file=metrics_file, notify_url=notify_url)
    return run


def _publish(
    result: outcome.RunOutcome, *, metrics_file: Path | None, notify_url: str | None
) -> None:
    """Write the metrics file, send the notification; either failing is only a warning."""
    from etl.monitor import metrics, notify  # noqa: PLC0415 - a monitored run's only

    if metrics_file is not None:
        try:
            metrics.write_metrics_file(metrics_file, result)
        except OSError as exc:
            log.warning(
                "metrics.failed", path=str(metrics_file), error=exc.strerror or type(exc).__name__
            )
    if notify_url is not None:
        notify.send_notification(notify_url, result)


def _library_args(function: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The parsed options `function` takes: each option is named after the library
    API's keyword argument, so the CLI passes them on by name (`sync --dry-run`
    hands `diff` its reading options and drops the sending ones)."""
    takes = inspect.signature(function).parameters
    return {name: value for name, value in kw.items() if name in takes}


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress bar per stream on a TTY; a log line every 5 s otherwise (which --quiet
    filters out with the other log lines)."""
    if not sys.stderr.isatty() or _QUIET.get():
        yield _ProgressLog()
        return
    bars = _ProgressBars()
    try:
        yield bars
    finally:
        bars.close()


class _ProgressBars:
    """One click progress bar per stream: rows done / total, rate, ETA."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stream = ""
        self.done = 0

    def __call__(self, stream: str, done: int, total: int | None) -> None:
        if stream != self.stream:
            self.close()
            self.stream, self.done = stream, 0
            self.bar = click.progressbar(
                length=max(total or 0, done, 1),
                label=stream,
                show_eta=True,
                show_pos=True,
                show_percent=True,
                file=sys.stderr,
            )
        # the estimate (pg_class.reltuples) can be low
        self.bar.length = max(self.bar.length, done)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


class _ProgressLog:
    """`backfill.progress` log lines, at most one every `every` seconds."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.started: dict[str, float] = {}
        self.last = 0.0

    def __call__(self, stream: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        start = self.started.setdefault(stream, now)
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / (now - start) if now > start else 0.0
        eta = (total - done) / rate if total and rate and total > done else None
        log.info(
            "backfill.progress",
            stream=stream,
            done=done,
            total=total,
            rate=round(rate, 1),
            eta_seconds=round(eta) if eta is not None else None,
        )
