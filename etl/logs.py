"""structlog set-up: console lines on a TTY, one JSON object per line otherwise.

Configured once, by the CLI. Every event is a `noun.verb` string with values as
fields; a processor masks foreign text in them (etl.redact), and the chatty HTTP
libraries are quietened because their DEBUG/INFO lines carry the request URL,
which carries the token.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from etl import redact
from etl.errors import EtlError
from etl.settings import LogFormat


def _masked(key: str, value: Any) -> Any:
    """A log field as it may be printed (etl.redact's rule: only foreign text is masked).

    An EtlError's text is ours, its foreign parts masked where it was built; any
    other exception and a formatted traceback are foreign; plain strings were
    masked where they entered (load, first_line), so only a `token=...` value
    in them is masked here, which no word of ours is.
    """
    if isinstance(value, EtlError):
        return str(value)
    if isinstance(value, BaseException):
        return redact.foreign(f"{type(value).__name__}: {value}")
    if isinstance(value, str):
        return redact.foreign(value) if key == "exception" else redact.foreign(value, ())
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_masked(key, v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask foreign text in every field (see `_masked`)."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _masked(key, value)
    return event_dict


def _drop(_logger: Any, _method: str, _event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor of `--quiet`: no log line at all."""
    raise structlog.DropEvent


def configure(
    fmt: LogFormat | None = None, *, stream: TextIO | None = None, quiet: bool = False
) -> LogFormat:
    """Configure structlog once; returns the format chosen (console on a TTY).
    `quiet` drops every log line (`--quiet`: the CLI prints the summary and errors)."""
    out = stream or sys.stderr
    chosen: LogFormat = fmt or ("console" if out.isatty() else "json")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if chosen == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            *([_drop] if quiet else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # httpx logs every request URL (with ?token=) at INFO; httpcore at DEBUG.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return chosen
