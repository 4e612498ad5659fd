"""A run's figures in the Prometheus text exposition format (`--metrics-file`).

Written for node_exporter's textfile collector, which reads every `*.prom`
file in a directory on each scrape. `render()` is pure; `write_metrics_file()`
replaces the file atomically, so a scrape never sees half of it, and carries
the last success timestamp over from the previous file when the run failed.

Every series is a gauge describing the latest run, labelled with `command`
(and `stream` for the per-stream figures), so `sync` and `backfill` can write
to two files in the same directory without clashing.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etl.errors import UsageError
from etl.model import StreamReport
from etl.monitor.outcome import RunOutcome

# (name, help) of the run-level gauges, labelled {command}
RUN_METRICS: tuple[tuple[str, str], ...] = (
    ("etl_run_success", "1 if the latest run finished (exit 0 or 3), 0 if it failed."),
    ("etl_run_exit_code", "Exit code of the latest run (0 ok, 1 failed, 2 usage, 3 partial)."),
    ("etl_run_duration_seconds", "Wall-clock duration of the latest run."),
    ("etl_last_run_timestamp_seconds", "When the latest run ended (Unix time)."),
    (
        "etl_last_success_timestamp_seconds",
        "When the latest successful run ended (Unix time; 0 if none is known).",
    ),
)
# (name, help, StreamReport attribute) of the per-stream gauges, labelled {command, stream}
STREAM_METRICS: tuple[tuple[str, str, str], ...] = (
    ("etl_records_read", "Rows read from the source in the latest run.", "read"),
    ("etl_records_new", "Records never sent before, in the latest run.", "new"),
    ("etl_records_changed", "Records changed since last sent, in the latest run.", "changed"),
    ("etl_records_unchanged", "Records identical to the last sent, not sent.", "unchanged"),
    ("etl_records_invalid", "Records that could not be mapped (not sent).", "invalid"),
    ("etl_records_rejected", "Records the API refused (retried by the next run).", "rejected"),
    (
        "etl_records_gone",
        "Keys sent before and no longer in the source, found by the latest full read.",
        "gone",
    ),
    ("etl_records_sent", "Records acknowledged by the API in the latest run.", "sent"),
    (
        "etl_records_future",
        "Track events timed after the run's clock (sent as they are).",
        "future",
    ),
    ("etl_stream_batches", "Requests (batches) acknowledged in the latest run.", "batches"),
    ("etl_stream_retries", "Requests retried in the latest run.", "retries"),
    ("etl_stream_duration_seconds", "Wall-clock duration of the stream.", "seconds"),
)
_LAST_SUCCESS = re.compile(
    r"^etl_last_success_timestamp_seconds\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.MULTILINE
)


def render(outcome: RunOutcome, *, last_success: float | None) -> str:
    """The exposition text for `outcome`; `last_success` is carried over on failure."""
    return "".join(_lines(outcome, last_success))


def _lines(outcome: RunOutcome, last_success: float | None) -> Iterator[str]:
    command = {"command": outcome.command}
    values = {
        "etl_run_success": 1 if outcome.succeeded else 0,
        "etl_run_exit_code": outcome.exit_code,
        "etl_run_duration_seconds": round(outcome.seconds, 3),
        "etl_last_run_timestamp_seconds": round(outcome.finished_at, 3),
        "etl_last_success_timestamp_seconds": round(last_success or 0, 3),
    }
    for name, text in RUN_METRICS:
        yield from _header(name, text)
        yield _sample(name, command, values[name])
    if not outcome.streams:  # a failed run: its counts are unknown, not zero
        return
    for name, text, attribute in STREAM_METRICS:
        yield from _header(name, text)
        for stream in outcome.streams:
            labels = {**command, "stream": stream.stream}
            yield _sample(name, labels, _figure(stream, attribute))


def _figure(stream: StreamReport, attribute: str) -> float:
    value = getattr(stream, attribute)
    return round(value, 3) if isinstance(value, float) else int(value)


def _header(name: str, text: str) -> Iterator[str]:
    yield f"# HELP {name} {text}\n"
    yield f"# TYPE {name} gauge\n"


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
    return f"{name}{{{rendered}}} {value}\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def previous_success(text: str, command: str) -> float | None:
    """The `etl_last_success_timestamp_seconds` of `command` in a metrics file's text."""
    wanted = f'command="{_escape(command)}"'
    for match in _LAST_SUCCESS.finditer(text):
        if wanted in match["labels"].split(","):
            try:
                value = float(match["value"])
            except ValueError:
                return None
            return value or None
    return None


def check_metrics_path(path: Path) -> None:
    """Refuse, before the run, a metrics file that could not be written after it."""
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(
            f"--metrics-file {path}: the directory {parent} does not exist — create it, "
            "or point at node_exporter's --collector.textfile.directory"
        )
    if path.is_dir():
        raise UsageError(f"--metrics-file {path} is a directory — name a file, e.g. etl.prom")


def write_metrics_file(path: Path, outcome: RunOutcome) -> None:
    """Write `outcome` to `path` atomically (a temporary file in the same directory, then
    os.replace); on failure keep the last success timestamp of the file being replaced."""
    if outcome.succeeded:
        last_success: float | None = outcome.finished_at
    else:
        try:
            last_success = previous_success(path.read_text(encoding="utf-8"), outcome.command)
        except (OSError, UnicodeDecodeError):
            last_success = None
    text = render(outcome, last_success=last_success)
    # Not *.prom while incomplete: the collector reads only that suffix.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes it 0600; node_exporter usually runs as another user. Counts only, no PII.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
