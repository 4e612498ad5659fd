"""Helpers every diff renderer shares (text, markdown, html): counts, value display.

Pure, like the renderers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from etl.model import DiffRecord, DiffReport, DiffStream

COUNT_KEYS: Final = ("read", "new", "changed", "unchanged", "invalid", "gone", "null_cursor")
SUMMARY_KEYS: Final = ("new", "changed", "invalid", "unchanged", "gone")
ABSENT: Final = object()
NON_PRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def plain(text: str) -> str:
    """`text` with control characters escaped, so a key cannot move a terminal's
    cursor or break a table row."""
    return NON_PRINTABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def show(value: Any) -> str:
    """A value as one line of compact JSON, so "" vs null vs 0 stay distinct."""
    if value is ABSENT:
        return "(absent)"
    return plain(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def counts(stream: DiffStream) -> dict[str, int]:
    return {name: int(stream.counts.get(name, 0)) for name in COUNT_KEYS}


def total_counts(report: DiffReport) -> dict[str, int]:
    return {name: sum(counts(s)[name] for s in report.streams) for name in COUNT_KEYS}


def count_phrase(counts: Mapping[str, int], sep: str = ", ") -> str:
    """`4 new, 2 changed, 1 invalid, 1,210 unchanged, 0 gone — read 1,217`."""
    parts = sep.join(f"{counts[name]:,} {name}" for name in SUMMARY_KEYS)
    nulls = counts.get("null_cursor", 0)
    note = (
        f" ({nulls:,} rows with a NULL cursor: only --full and backfill send them)" if nulls else ""
    )
    return f"{parts} — read {counts['read']:,}{note}"


# What a truncated list says by default; the CLI passes its own on a terminal.
MORE_HINT: Final = "raise --limit"
# The order records are listed in: what needs a person first.
KIND_ORDER: Final = ("invalid", "changed", "new", "gone")


def more_note(stream: DiffStream, hint: str = MORE_HINT) -> str:
    return f"… and {stream.truncated:,} more not listed ({hint})"


def ordered(records: Sequence[DiffRecord]) -> list[DiffRecord]:
    """`records` with invalid ones first, then changed, new and gone (stable)."""
    return sorted(records, key=lambda record: KIND_ORDER.index(record.kind))


def ids_note(record: DiffRecord) -> str:
    """`user_id=… account_id=…` of a new or changed record, else ""."""
    parts = [
        f"{name}={plain(value)}"
        for name, value in (("user_id", record.user_id), ("account_id", record.account_id))
        if value is not None
    ]
    return " ".join(parts)


def side(change: Mapping[str, Any], which: str) -> Any:
    return change.get(which, ABSENT)


def event_line(record: DiffRecord) -> str:
    """A track event's name, time and ids on one line (empty for identify records):
    `invoice_paid at 2024-05-01T10:00:00Z · user u-1 · account w-1`."""
    event = record.event
    if not event:
        return ""
    parts = [f"{event.get('event_type', '')} at {event.get('utc_time', '')}"]
    parts += [f"user {event.get('user_id', '')}", f"account {event.get('account_id', '')}"]
    if event.get("anonymous_id"):
        parts.append(f"anonymous {event['anonymous_id']}")
    if event.get("url"):
        parts.append(f"url {event['url']}")
    return plain(" · ".join(parts))
