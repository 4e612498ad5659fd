"""What a finished command did, whether it succeeded or not.

The input of the metrics file (`etl.monitor.metrics`) and of the notification
(`etl.monitor.notify`). A failed run has no RunReport, so an outcome is built either
from the report or from the exception; either way it holds no PII: counts per
stream, the error's class and a redacted first line of its message.
"""

from __future__ import annotations

from dataclasses import dataclass

from etl import redact
from etl.errors import EtlError
from etl.model import RunReport, RunStatus, StreamReport

# Enough to say what failed and where; the full message is in the logs.
MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class RunOutcome:
    """One finished `sync`/`backfill`: its status, exit code, timing and counts."""

    command: str
    status: RunStatus
    exit_code: int
    started_at: float  # seconds since the epoch
    finished_at: float
    streams: tuple[StreamReport, ...] = ()
    run_id: int | None = None
    error: str | None = None  # the exception's class name
    message: str | None = None  # its first line, redacted

    @property
    def succeeded(self) -> bool:
        """The run finished (exit 0 or 3); invalid and rejected records are counted apart."""
        return self.status != "failed"

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished_at - self.started_at)


def from_report(
    report: RunReport, *, exit_code: int, started_at: float, finished_at: float
) -> RunOutcome:
    """The outcome of a run that returned its report (ok or partial)."""
    return RunOutcome(
        command=report.command,
        status=report.status,
        exit_code=exit_code,
        started_at=started_at,
        finished_at=finished_at,
        streams=report.streams,
        run_id=report.run_id,
    )


def from_error(
    command: str, error: BaseException, *, exit_code: int, started_at: float, finished_at: float
) -> RunOutcome:
    """The outcome of a run that raised: what is known is the error, not the counts."""
    return RunOutcome(
        command=command,
        status="failed",
        exit_code=exit_code,
        started_at=started_at,
        finished_at=finished_at,
        error=type(error).__name__,
        message=safe_message(error),
    )


def safe_message(error: BaseException) -> str:
    """The first line of the error's message, e-mail addresses masked; the token too
    unless it is an EtlError, whose text is ours (see etl.redact)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if not isinstance(error, EtlError):
        first = redact.foreign(first)
    if len(lines) > 1:
        first += f" (and {len(lines) - 1} more line(s))"
    # Error texts can quote a database's or a server's words, which can quote data.
    text = redact.mask_emails(first)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
