"""Masking secrets and personal data, in one place. Pure (apart from the registry
of secrets the run is holding).

The rule: **our own words are never masked; foreign text is.** Foreign text is
what others wrote — a server's answer, an exception's or a driver's message, a
URL, a traceback — and it is masked where it enters one of our messages
(`foreign`, `first_line`), before it is put into the message's template. A
finished message (an `EtlError`'s text, a log event) is therefore printed as
is: masking it whole would rewrite our own words whenever a secret happens to
be one (a token `wrong` turned "the token is wrong or missing" into "the token
is *** or missing").

Inside foreign text a secret is masked only where it stands as a value: not as
part of a longer word (a token `wrong` leaves "wrongly" alone), and every
`token=...` query value whatever it holds.

Personal data: `mask_emails` blanks e-mail addresses in a message; `mask_value`
masks a trait value for a report that is to be shared (`etl diff --redact`).
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Final

MASK: Final = "***"
# One e-mail pattern for messages and for trait values: local@domain.tld
EMAIL: Final = re.compile(r"(?P<local>[\w.+'-]+)@(?P<domain>[\w-]+(?:\.[\w-]+)*)\.(?P<tld>[\w-]+)")
# `token=VALUE` in a URL or a message, however it got there; the value is what a
# token can be made of, so `token=;` in a sentence is left alone.
_TOKEN_PARAM: Final = re.compile(r"(?i)(?<![\w-])(token=)[\w.~%+/=-]+")
_WORD_CHAR: Final = re.compile(r"\w")

_lock = threading.Lock()
_registered: tuple[str, ...] = ()


def register_secret(value: str) -> None:
    """Remember `value` (and its URL-encoded spellings) as a secret of this process:
    `foreign` masks it from now on."""
    global _registered  # noqa: PLW0603 - the process-wide registry, written under a lock
    if not value:
        return
    with _lock:
        _registered = tuple(sorted({*_registered, *spellings(value)}, key=len, reverse=True))


def spellings(secret: str) -> tuple[str, ...]:
    """Every way `secret` can appear in text: as is and URL-encoded; longest first."""
    found = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
    }
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def foreign(text: str, secrets: Iterable[str] | None = None) -> str:
    """Foreign `text` with every `token=...` value and every secret standing as a value
    replaced by `***`. `secrets`: these (with their spellings) instead of the registry."""
    text = _TOKEN_PARAM.sub(rf"\1{MASK}", text)
    chosen = _registered if secrets is None else _all_spellings(tuple(secrets))
    if not chosen:
        return text
    return _secret_pattern(chosen).sub(MASK, text)


def first_line(error: BaseException | str | None) -> str:
    """The first line of a foreign error message, masked, for one-line problem
    reports; `error` when there is no text."""
    lines = str(error).strip().splitlines() if error is not None else []
    return foreign(lines[0]) if lines and lines[0].strip() else "error"


def mask_emails(text: str) -> str:
    """`text` with every e-mail address replaced by `***@***`."""
    return EMAIL.sub(f"{MASK}@{MASK}", text)


def mask_value(value: Any) -> Any:
    """Mask a trait value so a report can be shared: `jane@example.com` becomes
    `j***@e***.com`, other text its first character + `***` (empty stays empty);
    numbers, booleans and null are kept; arrays and objects are masked item by item."""
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, list | tuple):
        return [mask_value(item) for item in value]
    if isinstance(value, dict):
        return {name: mask_value(item) for name, item in value.items()}
    if value is None or isinstance(value, bool | int | float):
        return value
    return _mask_text(str(value))


def _mask_text(text: str) -> str:
    if not text:
        return text
    email = EMAIL.fullmatch(text)
    if email:
        return f"{email['local'][0]}{MASK}@{email['domain'][0]}{MASK}.{email['tld']}"
    return text[0] + MASK


@lru_cache(maxsize=16)
def _all_spellings(secrets: tuple[str, ...]) -> tuple[str, ...]:
    found = {spelling for secret in secrets for spelling in spellings(secret)}
    return tuple(sorted(found, key=len, reverse=True))


@lru_cache(maxsize=16)
def _secret_pattern(spelled: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for all spellings, longest first; a spelling that starts (ends)
    with a word character must not be preceded (followed) by one."""
    parts = []
    for spelling in spelled:
        before = r"(?<!\w)" if _WORD_CHAR.match(spelling[0]) else ""
        after = r"(?!\w)" if _WORD_CHAR.match(spelling[-1]) else ""
        parts.append(f"{before}{re.escape(spelling)}{after}")
    return re.compile("|".join(parts))
