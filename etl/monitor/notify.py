"""A small JSON summary POSTed when a run ends (`--notify-url`), healthchecks.io style.

`summary()` is pure and holds no PII: status, command, per-stream counts,
duration, the error's class and a redacted message — never record keys, trait
values or the token. `send_notification()` makes one bounded attempt and never
raises: a monitoring hiccup must not turn a good run into a failed one.

`{exit_code}` in the URL is replaced by the run's exit code, which is what
healthchecks.io's `https://hc-ping.com/<uuid>/{exit_code}` expects (0 is a
success, anything else a failure).
"""

from __future__ import annotations

import datetime as dt
import socket
from typing import Any

import httpx
import orjson
import structlog

from etl import __version__
from etl.errors import UsageError
from etl.monitor.outcome import RunOutcome

log = structlog.get_logger("etl")
TIMEOUT_SECONDS = 10.0
# Counts only: never invalid_records / rejected_records (they carry record keys).
_COUNTS = (
    "read",
    "new",
    "changed",
    "unchanged",
    "invalid",
    "rejected",
    "sent",
    "batches",
    "retries",
)


def summary(outcome: RunOutcome, *, host: str | None = None) -> dict[str, Any]:
    """The notification body for `outcome`."""
    return {
        "status": outcome.status,
        "command": outcome.command,
        "exit_code": outcome.exit_code,
        "run_id": outcome.run_id,
        "host": host if host is not None else socket.gethostname(),
        "version": __version__,
        "started_at": _iso(outcome.started_at),
        "finished_at": _iso(outcome.finished_at),
        "duration_seconds": round(outcome.seconds, 3),
        "streams": [
            {
                "stream": s.stream,
                "event_type": s.event_type,
                **{name: getattr(s, name) for name in _COUNTS},
                "seconds": round(s.seconds, 3),
            }
            for s in outcome.streams
        ],
        "error": (
            {"class": outcome.error, "message": outcome.message}
            if outcome.error is not None
            else None
        ),
    }


def check_notify_url(url: str) -> None:
    """Refuse, before the run, a URL the notification could never reach."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        # Not quoting it: a ping URL is a secret of sorts.
        raise UsageError(
            "--notify-url (ETL_NOTIFY_URL) is not an http(s) URL — e.g. "
            "https://hc-ping.com/<uuid>/{exit_code}"
        )


def send_notification(
    url: str, outcome: RunOutcome, *, transport: httpx.BaseTransport | None = None
) -> bool:
    """POST the summary to `url`; True if it was accepted (2xx). Logs a warning otherwise."""
    target = url.replace("{exit_code}", str(outcome.exit_code))
    body = orjson.dumps(summary(outcome))
    try:
        with httpx.Client(
            timeout=TIMEOUT_SECONDS,
            follow_redirects=False,  # a redirect would turn the POST into a GET
            headers={"content-type": "application/json", "user-agent": f"etl/{__version__}"},
            transport=transport,
        ) as client:
            response = client.post(target, content=body)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # The exception's text can hold the URL: log the host and the class only.
        log.warning("notify.failed", host=_host(target), error=type(exc).__name__)
        return False
    if not response.is_success:
        log.warning("notify.failed", host=_host(target), status=response.status_code)
        return False
    return True


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host
    except httpx.InvalidURL:
        return "?"


def _iso(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")
