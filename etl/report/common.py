"""Helpers every diff renderer shares (text, markdown, html): counts, value display.

Pure, like the renderers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from etl.model import DiffReport, DiffStream

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


def more_note(stream: DiffStream) -> str:
    return f"… and {stream.truncated:,} more (raise --limit)"


def side(change: Mapping[str, Any], which: str) -> Any:
    return change.get(which, ABSENT)
