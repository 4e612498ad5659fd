"""structlog set-up: console lines on a TTY, one JSON object per line otherwise.

Configured once, by the CLI. Every event is a `noun.verb` string with values as
fields; a processor redacts secrets from every field, and the chatty HTTP
libraries are quietened because their DEBUG/INFO lines carry the request URL,
which carries the token.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from etl.settings import LogFormat

# `token=...` in a URL or a message, however it got there.
_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s'\"]+", re.IGNORECASE)
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Make `value` unprintable: every log field containing it is masked."""
    if value:
        _secrets.add(value)


def redact_text(text: str) -> str:
    """`text` with every registered secret and every `token=...` masked."""
    text = _TOKEN_IN_TEXT.sub(r"\1***", text)
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every field, the event included."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact(value)
    return event_dict


def configure(fmt: LogFormat | None = None, *, stream: TextIO | None = None) -> LogFormat:
    """Configure structlog once; returns the format chosen (console on a TTY)."""
    out = stream or sys.stderr
    chosen: LogFormat = fmt or ("console" if out.isatty() else "json")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if chosen == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
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
