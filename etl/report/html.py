"""The HTML page of `etl diff --format html`: one self-contained file (inline CSS,
no scripts, nothing fetched) with a summary table and a card per record.

Pure, like `etl.report.render`, whose helpers it shares: `render_diff(..., format="html")`
is the way in, and `render_html` is what it calls.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any, Final

from etl.model import DiffRecord, DiffReport, DiffStream
from etl.report.common import (
    ABSENT,
    SUMMARY_KEYS,
    count_phrase,
    counts,
    event_line,
    more_note,
    plain,
    show,
    side,
    total_counts,
)

_CSS: Final = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --page:#f6f8fa;
  --new:#1a7f37; --new-bg:#e6f6ea; --changed:#9a6700; --changed-bg:#fff5d1;
  --invalid:#cf222e; --invalid-bg:#ffebe9; --gone:#6e7781; --gone-bg:#eef1f4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--page); color:var(--fg);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1040px; margin:0 auto; padding:32px 24px 64px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:0; }
.meta, .counts, .more, .empty { color:var(--muted); margin:0 0 16px; }
code, .v { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.panel, .card { background:#fff; border:1px solid var(--line); border-radius:8px; }
.panel { overflow:hidden; margin:20px 0 8px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:7px 12px; border-bottom:1px solid var(--line);
  vertical-align:top; }
tr:last-child > th, tr:last-child > td { border-bottom:0; }
thead th { background:#fafbfc; font-size:12px; text-transform:uppercase; letter-spacing:.04em;
  color:var(--muted); font-weight:600; }
.num { text-align:right; font-variant-numeric:tabular-nums; }
.zero { color:#b1bac4; }
tfoot td, tfoot th { font-weight:600; border-top:1px solid var(--line); }
a { color:#0969da; text-decoration:none; }
section { margin-top:40px; }
section > header { display:flex; align-items:baseline; gap:10px; }
.card { margin:12px 0; border-left:4px solid var(--gone); overflow:hidden; }
.card > header { display:flex; align-items:center; gap:10px; padding:10px 14px; }
.card .key { font-size:14px; font-weight:600; overflow-wrap:anywhere; }
.card > p { margin:0; padding:0 14px 12px; }
.card table { border-top:1px solid var(--line); }
.card.new { border-left-color:var(--new); } .card.changed { border-left-color:var(--changed); }
.card.invalid { border-left-color:var(--invalid); }
.badge { font-size:11px; font-weight:700; padding:2px 9px; border-radius:999px;
  text-transform:uppercase; letter-spacing:.05em; }
.badge.new { color:var(--new); background:var(--new-bg); }
.badge.changed { color:var(--changed); background:var(--changed-bg); }
.badge.invalid { color:var(--invalid); background:var(--invalid-bg); }
.badge.gone { color:var(--gone); background:var(--gone-bg); }
.fields th { width:26%; font-weight:500; color:var(--muted); }
.fields td { overflow-wrap:anywhere; }
.fields.diff td { width:37%; }
tr.changed > th { color:var(--fg); font-weight:600; }
tr.changed > td.old { background:var(--invalid-bg); }
tr.changed > td.new { background:var(--new-bg); }
tr.same > td { color:var(--muted); }
.absent { color:#8c959f; font-style:italic; font-family:inherit; }
.reason { color:var(--invalid); }
"""


def _h(text: str) -> str:
    return html.escape(plain(text), quote=True)


def _html_value(value: Any) -> str:
    if value is ABSENT:
        return '<span class="absent">absent</span>'
    return f'<span class="v">{_h(show(value))}</span>'


def _html_num(value: int) -> str:
    return f'<td class="num{" zero" if value == 0 else ""}">{value:,}</td>'


def _html_summary(report: DiffReport) -> str:
    order = (*SUMMARY_KEYS, "read")
    head = "".join(f'<th class="num">{name}</th>' for name in order)
    rows = [
        f'<tr><th scope="row"><a href="#s{i}">{_h(s.stream)}</a></th>'
        f"<td><code>{_h(s.event_type)}</code></td>"
        f"{''.join(_html_num(counts(s)[k]) for k in order)}</tr>"
        for i, s in enumerate(report.streams, 1)
    ]
    total = total_counts(report)
    foot = (
        f'<tr><th scope="row">Total</th><td></td>{"".join(_html_num(total[k]) for k in order)}</tr>'
    )
    return (
        '<div class="panel"><table class="summary">'
        f"<thead><tr><th>Stream</th><th>Event type</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody><tfoot>{foot}</tfoot></table></div>"
    )


def _html_traits(traits: Mapping[str, Any]) -> str:
    if not traits:
        return ""
    rows = "".join(f"<tr><th>{_h(n)}</th><td>{_html_value(v)}</td></tr>" for n, v in traits.items())
    return f'<table class="fields"><tbody>{rows}</tbody></table>'


def _html_diff_row(name: str, record: DiffRecord) -> str:
    if name in record.changes:
        old, new, style = (
            side(record.changes[name], "old"),
            side(record.changes[name], "new"),
            "changed",
        )
    else:
        old = new = record.traits[name]
        style = "same"
    return (
        f'<tr class="{style}"><th>{_h(name)}</th>'
        f'<td class="old">{_html_value(old)}</td><td class="new">{_html_value(new)}</td></tr>'
    )


def _html_changed_body(record: DiffRecord) -> str:
    # Unchanged traits give context; change-only names (an id field, a removed trait) follow.
    names = [*record.traits, *(n for n in record.changes if n not in record.traits)]
    rows = "".join(_html_diff_row(name, record) for name in names)
    head = "<thead><tr><th>Trait</th><th>Old</th><th>New</th></tr></thead>"
    return f'<table class="fields diff">{head}<tbody>{rows}</tbody></table>'


def _html_invalid_body(record: DiffRecord) -> str:
    reason = f'<p class="reason">{_h(record.reason or "invalid")}</p>'
    return reason + _html_traits(record.traits)


def _html_gone_body(record: DiffRecord) -> str:
    return '<p class="meta">Sent before, no longer in the source. The API cannot delete it.</p>'


_HTML_BODY: Final[dict[str, Callable[[DiffRecord], str]]] = {
    "new": lambda record: _html_traits(record.traits),
    "changed": _html_changed_body,
    "invalid": _html_invalid_body,
    "gone": _html_gone_body,
}


def _html_card(record: DiffRecord) -> str:
    # a track event: its name, time and ids (and why a change is not sent) first
    event = f'<p class="meta">{_h(event_line(record))}</p>' if record.event else ""
    if record.event and record.kind == "changed" and record.reason:
        event += f'<p class="reason">{_h(record.reason)}</p>'
    return (
        f'<article class="card {record.kind}"><header>'
        f'<span class="badge {record.kind}">{record.kind}</span>'
        f'<code class="key">{_h(record.key)}</code></header>'
        f"{event}{_HTML_BODY[record.kind](record)}</article>"
    )


def _html_stream(index: int, stream: DiffStream) -> str:
    cards = "\n".join(_html_card(record) for record in stream.records)
    if not stream.records:
        cards = '<p class="empty">No records to show.</p>'
    more = f'<p class="more">{_h(more_note(stream))}</p>' if stream.truncated else ""
    return (
        f'<section id="s{index}"><header><h2>{_h(stream.stream)}</h2>'
        f"<code>{_h(stream.event_type)}</code></header>"
        f'<p class="counts">{_h(count_phrase(counts(stream), " · "))}</p>\n'
        f"{cards}\n{more}</section>"
    )


def render_html(report: DiffReport) -> str:
    """The dry-run report as one HTML page; values escaped, control characters shown."""
    title = f"etl diff — {report.mode}"
    sections = "\n".join(_html_stream(i, s) for i, s in enumerate(report.streams, 1))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_h(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>What the next sync would send</h1>
<p class="meta">etl diff · {_h(report.mode)} mode · dry run: nothing was sent</p>
{_html_summary(report)}
{sections}
</main>
</body>
</html>
"""
