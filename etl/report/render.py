"""Turns finished data into text for people and scripts: the dry-run report of
`etl diff` (text, JSON, Markdown; HTML in etl.report.html, reached through
`render_diff`), the plain tables of `etl state show` / `etl runs`, and the
summary printed after a run.

Pure: data in, text out. No I/O and no clock, so a test builds a DiffReport or a
RunReport by hand and reads the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import date
from typing import Any, Final

from etl.errors import UsageError
from etl.model import DiffRecord, DiffReport, DiffStream, RunReport, StreamReport
from etl.redact import mask_value
from etl.report.common import (
    COUNT_KEYS,
    MORE_HINT,
    SUMMARY_KEYS,
    count_phrase,
    counts,
    event_line,
    ids_note,
    more_note,
    ordered,
    plain,
    show,
    side,
    total_counts,
)

FORMATS: Final = ("text", "json", "markdown", "html")
# 2: track streams (SPEC §10): any event_type, a stream's `kind`, a record's `event`.
SCHEMA_VERSION: Final = 2
KINDS: Final = ("new", "changed", "invalid", "gone")
# Summaries lead with what would be sent, then the rest; `read` closes the line.
GONE_NOTE: Final = "(sent before, no longer in the source; the API cannot delete)"
RUN_LIST_LIMIT: Final = 20

# A trait present on only one side of a change (the change dict lacks "old" or "new").
# C0/C1 controls, line separators and bidi overrides (which can make text lie).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")

_VALUE = {
    "anyOf": [
        {"type": ["string", "number", "boolean", "null"]},
        {"type": "array", "items": {"type": "string"}},
    ]
}
_COUNT = {"type": "integer", "minimum": 0}
DIFF_JSON_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "etl diff report",
    "description": "What `etl diff --format json` prints: per stream, the records a sync would "
    "send. In `changes`, a side is left out when the trait is absent on that side. A track "
    "stream's records carry their properties in `traits` and the event's name, time and ids "
    "in `event`.",
    "type": "object",
    "required": ["schema_version", "mode", "streams"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "mode": {"enum": ["incremental", "full"]},
        "streams": {"type": "array", "items": {"$ref": "#/$defs/stream"}},
    },
    "$defs": {
        "stream": {
            "type": "object",
            "required": [
                "stream",
                "kind",
                "event_type",
                "counts",
                "records",
                "truncated",
                "changed_traits",
            ],
            "additionalProperties": False,
            "properties": {
                "stream": {"type": "string"},
                "kind": {"enum": ["identify", "track"]},
                "event_type": {"type": "string", "minLength": 1},
                "counts": {
                    "type": "object",
                    "required": list(COUNT_KEYS),
                    "additionalProperties": False,
                    "properties": dict.fromkeys(COUNT_KEYS, _COUNT),
                },
                "records": {"type": "array", "items": {"$ref": "#/$defs/record"}},
                "truncated": _COUNT,
                "changed_traits": {"type": "object", "additionalProperties": _COUNT},
            },
        },
        "record": {
            "type": "object",
            "required": ["key", "kind", "user_id", "account_id", "traits", "changes", "reason"],
            "additionalProperties": False,
            "properties": {
                "key": {"type": "string"},
                "kind": {"enum": ["new", "changed", "invalid", "gone"]},
                "user_id": {"type": ["string", "null"]},
                "account_id": {"type": ["string", "null"]},
                "traits": {"type": "object", "additionalProperties": _VALUE},
                "changes": {"type": "object", "additionalProperties": {"$ref": "#/$defs/change"}},
                "reason": {"type": ["string", "null"]},
                "event": {"$ref": "#/$defs/event"},
            },
        },
        "event": {
            "type": "object",
            "required": ["event_type", "utc_time", "user_id", "account_id"],
            "additionalProperties": False,
            "properties": {
                name: {"type": "string"}
                for name in (
                    "event_type",
                    "utc_time",
                    "user_id",
                    "account_id",
                    "anonymous_id",
                    "url",
                )
            },
        },
        "change": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {"old": _VALUE, "new": _VALUE},
        },
    },
}


# --- redaction --------------------------------------------------------------


def _redact_record(record: DiffRecord) -> DiffRecord:
    changes = {
        trait: {side: mask_value(value) for side, value in change.items()}
        for trait, change in record.changes.items()
    }
    return replace(record, traits=mask_value(record.traits), changes=changes)


def _redact_report(report: DiffReport) -> DiffReport:
    streams = tuple(
        replace(stream, records=tuple(_redact_record(r) for r in stream.records))
        for stream in report.streams
    )
    return replace(report, streams=streams)


# --- json -------------------------------------------------------------------


def diff_to_dict(report: DiffReport, *, redact: bool = False) -> dict[str, Any]:
    """The stable JSON form of a dry run (SPEC §3), described by DIFF_JSON_SCHEMA."""
    if redact:
        report = _redact_report(report)
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": report.mode,
        "streams": [_stream_to_dict(stream) for stream in report.streams],
    }


def _stream_to_dict(stream: DiffStream) -> dict[str, Any]:
    return {
        "stream": stream.stream,
        "kind": stream.kind,
        "event_type": stream.event_type,
        "counts": counts(stream),
        "records": [_record_to_dict(record) for record in stream.records],
        "truncated": stream.truncated,
        "changed_traits": dict(stream.changed_traits),
    }


def _record_to_dict(record: DiffRecord) -> dict[str, Any]:
    out = {
        "key": record.key,
        "kind": record.kind,
        "user_id": record.user_id,
        "account_id": record.account_id,
        "traits": dict(record.traits),
        "changes": {
            trait: {side: change[side] for side in ("old", "new") if side in change}
            for trait, change in record.changes.items()
        },
        "reason": record.reason,
    }
    if record.event:
        out["event"] = dict(record.event)
    return out


def _render_json(report: DiffReport) -> str:
    return json.dumps(diff_to_dict(report), indent=2, ensure_ascii=False, default=str) + "\n"


# --- text -------------------------------------------------------------------

_ANSI: Final = {"new": "32", "changed": "33", "invalid": "31", "gone": "2", "header": "1"}


def _paint(text: str, style: str, color: bool) -> str:
    return f"\x1b[{_ANSI[style]}m{text}\x1b[0m" if color else text


def _text_head(mark: str, record: DiffRecord, color: bool, extra: str = "") -> str:
    ids = ids_note(record)
    head = _paint(f"{mark} {plain(record.key)}{extra}", record.kind, color)
    return f"{head}  {ids}" if ids else head


def _text_new(record: DiffRecord, color: bool) -> list[str]:
    traits = [f"    {plain(name)}: {show(value)}" for name, value in record.traits.items()]
    event = f"  {event_line(record)}" if record.event else ""
    return [_text_head("+", record, color, event), *traits]


def _text_changed(record: DiffRecord, color: bool) -> list[str]:
    changes = [
        f"    {plain(name)}: {show(side(change, 'old'))} → {show(side(change, 'new'))}"
        for name, change in record.changes.items()
    ]
    note = f"  {plain(record.reason)}" if record.event and record.reason else ""
    return [_text_head("~", record, color, note), *changes]


def _text_invalid(record: DiffRecord, color: bool) -> list[str]:
    reason = plain(record.reason or "invalid")
    return [_paint(f"! {plain(record.key)}  {reason}", "invalid", color)]


def _text_gone(record: DiffRecord, color: bool) -> list[str]:
    return [_paint(f"- {plain(record.key)}  {GONE_NOTE}", "gone", color)]


_TEXT_RECORD: Final[dict[str, Callable[[DiffRecord, bool], list[str]]]] = {
    "new": _text_new,
    "changed": _text_changed,
    "invalid": _text_invalid,
    "gone": _text_gone,
}


def _render_text(report: DiffReport, color: bool, hint: str) -> str:
    lines: list[str] = []
    for stream in report.streams:
        header = f"{plain(stream.stream)} ({stream.event_type}): {count_phrase(counts(stream))}"
        lines.append(_paint(header, "header", color))
        for record in ordered(stream.records):
            lines.extend(_TEXT_RECORD[record.kind](record, color))
        if stream.truncated:
            lines.append(more_note(stream, hint))
        lines.append("")
    streams = f"{len(report.streams)} stream{'s' if len(report.streams) != 1 else ''}"
    total = count_phrase(total_counts(report))
    lines.append(f"total ({report.mode}, {streams}): {total}; dry run, nothing sent")
    return "\n".join(lines) + "\n"


# --- markdown ---------------------------------------------------------------


def _md(text: str) -> str:
    """Text that Markdown shows literally, also inside a table cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", plain(text))


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_summary(report: DiffReport) -> list[str]:
    order = (*SUMMARY_KEYS, "read")
    rows = [_md_row([_md(s.stream), *(f"{counts(s)[k]:,}" for k in order)]) for s in report.streams]
    total = total_counts(report)
    return [
        _md_row(["stream", *order]),
        _md_row([":--", *("--:" for _ in order)]),
        *rows,
        _md_row(["**total**", *(f"**{total[k]:,}**" for k in order)]),
    ]


def _md_change_table(records: Sequence[DiffRecord]) -> list[str]:
    rows = [
        _md_row([_md(r.key), _md(name), _md(show(side(c, "old"))), _md(show(side(c, "new")))])
        for r in records
        for name, c in r.changes.items()
    ]
    if not rows:
        return []
    return [
        "**Changed**",
        "",
        _md_row(["key", "trait", "old", "new"]),
        _md_row([":--"] * 4),
        *rows,
        "",
    ]


def _md_key_list(
    title: str, records: Sequence[DiffRecord], *, with_reason: bool = False, with_ids: bool = False
) -> list[str]:
    if not records:
        return []
    items = [
        f"- {_md(r.key)}"
        + (f" — {_md(r.reason or 'invalid')}" if with_reason else "")
        + (f" — {_md(event_line(r))}{_md_properties(r)}" if r.event else "")
        + (f" ({_md(ids_note(r))})" if with_ids and ids_note(r) else "")
        for r in records
    ]
    return [title, "", *items, ""]


def _md_properties(record: DiffRecord) -> str:
    """A track event's properties after its event line: `— amount: 900, currency: "EUR"`."""
    if not record.traits:
        return ""
    return " — " + ", ".join(f"{_md(n)}: {_md(show(v))}" for n, v in record.traits.items())


def _md_stream(stream: DiffStream, hint: str) -> list[str]:
    by_kind = {kind: [r for r in stream.records if r.kind == kind] for kind in KINDS}
    lines = [
        f"### {_md(stream.stream)} (`{stream.event_type}`)",
        "",
        count_phrase(counts(stream)),
        "",
    ]
    lines += _md_key_list("**Invalid**", by_kind["invalid"], with_reason=True)
    lines += _md_change_table(by_kind["changed"])
    if stream.kind == "track" and by_kind["changed"]:
        lines += [f"_{_md(by_kind['changed'][0].reason or '')}_", ""]
    lines += _md_key_list("**New**", by_kind["new"], with_ids=True)
    lines += _md_key_list(f"**Gone** {GONE_NOTE}", by_kind["gone"])
    if stream.truncated:
        lines += [f"_{_md(more_note(stream, hint))}_", ""]
    return lines


def _render_markdown(report: DiffReport, hint: str) -> str:
    lines = [f"## etl diff ({report.mode}): what the next sync would send", ""]
    lines += [*_md_summary(report), ""]
    for stream in report.streams:
        lines += _md_stream(stream, hint)
    return "\n".join(lines).rstrip("\n") + "\n"


def _render_html(report: DiffReport, hint: str) -> str:
    from etl.report.html import render_html  # noqa: PLC0415 - only diff --format html needs it

    return render_html(report, hint=hint)


_DIFF_RENDERERS: Final[dict[str, Callable[[DiffReport, bool, str], str]]] = {
    "text": _render_text,
    "json": lambda report, _color, _hint: _render_json(report),
    "markdown": lambda report, _color, hint: _render_markdown(report, hint),
    "html": lambda report, _color, hint: _render_html(report, hint),
}


def render_diff(
    report: DiffReport,
    *,
    format: str,
    color: bool = False,
    redact: bool = False,
    more_hint: str = MORE_HINT,
) -> str:
    """The dry-run report in one of FORMATS, ending with a newline. `color` adds
    ANSI colours to the text format; `redact` masks trait values (etl.redact.mask_value);
    `more_hint` says how to see the records a limit left out."""
    renderer = _DIFF_RENDERERS.get(format)
    if renderer is None:
        raise UsageError(f"unknown report format {format!r} — use one of {', '.join(FORMATS)}")
    return renderer(_redact_report(report) if redact else report, color, more_hint)


# --- tables and run summaries ---------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return ", ".join(f"{plain(str(k))}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return plain(str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned table for a terminal (`etl state show`, `etl runs`): header,
    rule, one line per row; numeric columns right-aligned; None and missing as `-`.
    No trailing newline."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [
        any(_is_number(row.get(c)) for row in rows)
        and all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
        for c in columns
    ]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        aligned = (
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(aligned).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(values) for values in cells)])


_RUN_STATUS: Final = {
    "ok": "ok",
    "partial": "finished, some records were invalid or rejected",
    "failed": "failed",
}


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def _listed(title: str, count: int, records: Sequence[tuple[str, str]], marker: str) -> list[str]:
    total = max(count, len(records))
    if not total:
        return []
    lines = [f"    {title} ({total:,}):"]
    lines += [f"      {marker} {plain(key)}  {plain(why)}" for key, why in records[:RUN_LIST_LIMIT]]
    shown = min(len(records), RUN_LIST_LIMIT)
    if total > shown:
        lines.append(f"      … and {total - shown:,} more")
    return lines


def _run_stream_lines(s: StreamReport) -> list[str]:
    parts = ", ".join(f"{getattr(s, k):,} {k}" for k in ("new", "changed", "unchanged", "invalid"))
    mode = ", full" if s.full else ""
    batches = _plural(s.batches, "batch", "batches")
    sent = f"sent {s.sent:,} in {batches}, {_plural(s.retries, 'retry', 'retries')}"
    lines = [
        f"  {plain(s.stream)} ({s.event_type}{mode}): read {s.read:,}, {parts}, "
        f"{s.rejected:,} rejected; {sent}; {s.seconds:.1f} s"
    ]
    if s.watermark:
        lines.append(f"    watermark {plain(s.watermark)}")
    if s.gone:
        lines.append(f"    {_plural(s.gone, 'record')} {GONE_NOTE}")
    if s.null_cursor:
        lines.append(
            f"    {_plural(s.null_cursor, 'row')} with a NULL cursor"
            " (only --full and backfill read them)"
        )
    lines += _listed("invalid", s.invalid, s.invalid_records, "!")
    lines += _listed("rejected", s.rejected, s.rejected_records, "✗")
    return lines


def render_run_report(report: RunReport) -> str:
    """A short human summary of a finished run: a status line, per-stream counts,
    and the invalid and rejected records with reasons. No trailing newline."""
    run = f", run {report.run_id}" if report.run_id is not None else ""
    lines = [f"etl {report.command}{run}: {_RUN_STATUS.get(report.status, report.status)}"]
    for stream in report.streams:
        lines += _run_stream_lines(stream)
    if report.error:
        lines.append(f"error: {plain(report.error)}")
    return "\n".join(lines)
