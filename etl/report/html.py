"""The HTML page of `etl diff --format html`: one self-contained file (inline CSS,
no scripts, nothing fetched) that stays readable for thousands of records.

* a summary table, then filters by stream and by kind (radio buttons and check
  boxes that CSS `:has()` reads: no script, so the page is safe to mail or attach);
* per stream, a bar per trait showing how many changed records change it;
* records as compact table rows, invalid first, then changed, new and gone;
  the first `SHOWN` of each kind are open, the rest behind a "show N more"
  disclosure (`<details>`).

Pure, like `etl.report.render`, whose helpers it shares: `render_diff(..., format="html")`
is the way in, and `render_html` is what it calls.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any, Final

from etl.model import DiffRecord, DiffReport, DiffStream
from etl.report.common import (
    ABSENT,
    KIND_ORDER,
    MORE_HINT,
    SUMMARY_KEYS,
    count_phrase,
    counts,
    event_line,
    more_note,
    ordered,
    plain,
    show,
    side,
    total_counts,
)

# Records of one kind shown before the rest fold away.
SHOWN: Final = 10
# Traits in the "what changes most" chart, per stream.
BARS: Final = 12
_KIND_TITLES: Final = {
    "invalid": "Invalid — not sent until the row is fixed",
    "changed": "Changed",
    "new": "New",
    "gone": "Gone — sent before, no longer in the source (the API cannot delete)",
}

_CSS: Final = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --page:#f6f8fa; --accent:#0969da;
  --new:#1a7f37; --new-bg:#e6f6ea; --changed:#9a6700; --changed-bg:#fff5d1;
  --invalid:#cf222e; --invalid-bg:#ffebe9; --gone:#6e7781; --gone-bg:#eef1f4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--page); color:var(--fg);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:32px 24px 64px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:0; }
h3 { font-size:15px; margin:0; display:flex; gap:8px; align-items:center; }
.meta, .counts, .more, .empty { color:var(--muted); margin:0 0 12px; }
code, .v { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.panel { background:#fff; border:1px solid var(--line); border-radius:8px; overflow:hidden;
  margin:12px 0; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:6px 12px; border-bottom:1px solid var(--line);
  vertical-align:top; }
tr:last-child > th, tr:last-child > td { border-bottom:0; }
thead th { background:#fafbfc; font-size:12px; text-transform:uppercase; letter-spacing:.04em;
  color:var(--muted); font-weight:600; }
.num { text-align:right; font-variant-numeric:tabular-nums; }
.zero { color:#b1bac4; }
tfoot td, tfoot th { font-weight:600; border-top:1px solid var(--line); }
a { color:var(--accent); text-decoration:none; }
.filters { position:sticky; top:0; z-index:1; background:var(--page); padding:10px 0;
  display:flex; flex-wrap:wrap; gap:8px 20px; align-items:center;
  border-bottom:1px solid var(--line); }
.filters fieldset { border:0; margin:0; padding:0; display:flex; flex-wrap:wrap; gap:6px;
  align-items:center; }
.filters legend { float:left; font-weight:600; margin-right:4px; font-size:13px; }
.filters input { position:absolute; opacity:0; }
.filters label { font-size:13px; padding:3px 10px; border-radius:999px; cursor:pointer;
  border:1px solid var(--line); background:#fff; color:var(--muted); }
.filters input:checked + label { border-color:var(--accent); color:var(--accent);
  background:#ddf4ff; }
.filters input:focus-visible + label { outline:2px solid var(--accent); }
section.stream { margin-top:32px; }
section.stream > header { display:flex; align-items:baseline; gap:10px; }
.bars { padding:10px 14px; }
.bars h3 { margin-bottom:6px; color:var(--muted); font-weight:600; font-size:13px; }
.bar-row { display:grid; grid-template-columns:minmax(90px,200px) 1fr 110px; gap:10px;
  align-items:center; font-size:13px; padding:2px 0; }
.bar-row .name { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.bar { height:12px; background:var(--page); border-radius:3px; overflow:hidden; }
.bar > span { display:block; height:100%; background:var(--changed); border-radius:3px; }
.bar-row .n { color:var(--muted); text-align:right; font-variant-numeric:tabular-nums; }
.kind > summary { list-style:none; cursor:pointer; padding:10px 14px; display:flex;
  align-items:center; gap:6px; }
.kind > summary::-webkit-details-marker { display:none; }
.kind > summary::before { content:"▸"; color:var(--muted); margin-right:6px; }
.kind[open] > summary::before { content:"▾"; }
.kind table { border-top:1px solid var(--line); }
details.rest > summary { cursor:pointer; color:var(--accent); padding:8px 14px;
  border-top:1px solid var(--line); font-size:13px; }
.badge { font-size:11px; font-weight:700; padding:2px 9px; border-radius:999px;
  text-transform:uppercase; letter-spacing:.05em; }
.badge.new { color:var(--new); background:var(--new-bg); }
.badge.changed { color:var(--changed); background:var(--changed-bg); }
.badge.invalid { color:var(--invalid); background:var(--invalid-bg); }
.badge.gone { color:var(--gone); background:var(--gone-bg); }
.kind.invalid { border-left:4px solid var(--invalid); }
.kind.changed { border-left:4px solid var(--changed); }
.kind.new { border-left:4px solid var(--new); }
.kind.gone { border-left:4px solid var(--gone); }
td.key { font-weight:600; white-space:nowrap; }
td.key, td.v { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
td.v { overflow-wrap:anywhere; }
.wide { overflow-x:auto; }
td[data-side=old] { background:var(--invalid-bg); }
td[data-side=new] { background:var(--new-bg); }
.absent { color:#8c959f; font-style:italic; }
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


def _filters(report: DiffReport) -> str:
    """Radio buttons for the stream, check boxes for the kinds; `_filter_css` acts on them."""
    streams = ['<input type="radio" name="stream" id="f-s0" checked><label for="f-s0">all</label>']
    streams += [
        f'<input type="radio" name="stream" id="f-s{i}"><label for="f-s{i}">{_h(s.stream)}</label>'
        for i, s in enumerate(report.streams, 1)
    ]
    kinds = [
        f'<input type="checkbox" id="f-{kind}" checked><label for="f-{kind}">{kind}</label>'
        for kind in KIND_ORDER
    ]
    return (
        '<nav class="filters" aria-label="filters">'
        f"<fieldset><legend>Stream</legend>{''.join(streams)}</fieldset>"
        f"<fieldset><legend>Kind</legend>{''.join(kinds)}</fieldset></nav>"
    )


def _filter_css(report: DiffReport) -> str:
    rules = [
        f"body:has(#f-s{i}:checked) section.stream:not(#s{i}) {{ display:none; }}"
        for i in range(1, len(report.streams) + 1)
    ]
    rules += [
        f"body:has(#f-{kind}:not(:checked)) .kind.{kind} {{ display:none; }}" for kind in KIND_ORDER
    ]
    return "\n".join(rules)


def _bars(stream: DiffStream) -> str:
    """A bar per trait: how many of the stream's changed records change it."""
    if not stream.changed_traits:
        return ""
    changed = max(counts(stream)["changed"], *stream.changed_traits.values())
    top = sorted(stream.changed_traits.items(), key=lambda item: (-item[1], item[0]))[:BARS]
    rows = "".join(
        f'<div class="bar-row"><span class="name"><code>{_h(name)}</code></span>'
        f'<div class="bar" title="{n:,} of {changed:,}">'
        f'<span style="width:{100 * n / changed:.1f}%"></span></div>'
        f'<span class="n">{n:,} of {changed:,}</span></div>'
        for name, n in top
    )
    more = len(stream.changed_traits) - len(top)
    tail = f'<p class="more">and {more:,} more traits change less often</p>' if more > 0 else ""
    return (
        '<div class="panel bars"><h3>Which traits change (changed records that change each)</h3>'
        f"{rows}{tail}</div>"
    )


def _ids(record: DiffRecord, rowspan: int = 1) -> str:
    span = f' rowspan="{rowspan}"' if rowspan > 1 else ""
    return "".join(
        f'<td class="v"{span}>{_h(value or "")}</td>'
        for value in (
            record.user_id or record.event.get("user_id"),
            record.account_id or record.event.get("account_id"),
        )
    )


def _key(record: DiffRecord, rowspan: int = 1) -> str:
    span = f' rowspan="{rowspan}"' if rowspan > 1 else ""
    return f'<td class="key"{span}>{_h(record.key)}</td>'


def _cell(value: Any) -> str:
    """A value in a table cell: compact JSON text, so "" and null stay apart."""
    if value is ABSENT:
        return '<td class="absent">absent</td>'
    return f'<td class="v">{_h(show(value))}</td>'


def _new_table(records: Sequence[DiffRecord]) -> str:
    """New records, one row each, a column per trait (names written once, in the head)."""
    names = list(dict.fromkeys(name for record in records for name in record.traits))
    # track events: their name and time (SPEC §10); identify records have none
    events = any(record.event for record in records)
    columns = ("key", "user_id", "account_id", *(["event"] if events else []), *names)
    head = "".join(f"<th>{_h(name)}</th>" for name in columns)
    rows = "".join(
        f'<tr class="rec">{_key(r)}{_ids(r)}'
        + (f'<td class="v">{_h(event_line(r))}</td>' if events else "")
        + "".join(_cell(r.traits.get(name, ABSENT)) for name in names)
        + "</tr>"
        for r in records
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f'<div class="wide">{table}</div>'


def _row_changed(record: DiffRecord) -> str:
    changes = list(record.changes.items()) or [("", {})]
    span = len(changes)
    rows = []
    for i, (name, change) in enumerate(changes):
        lead = f"{_key(record, span)}{_ids(record, span)}" if i == 0 else ""
        old, new = _cell(side(change, "old")), _cell(side(change, "new"))
        rows.append(
            f'<tr class="{"rec" if i == 0 else "also"}">{lead}<td class="v">{_h(name)}</td>'
            f"{old.replace('<td', '<td data-side=old', 1)}"
            f"{new.replace('<td', '<td data-side=new', 1)}</tr>"
        )
    return "".join(rows)


def _row_invalid(record: DiffRecord) -> str:
    reason = _h(record.reason or "invalid")
    return f'<tr class="rec">{_key(record)}<td class="reason">{reason}</td></tr>'


def _row_gone(record: DiffRecord) -> str:
    return f'<tr class="rec">{_key(record)}</tr>'


_ROWS: Final[dict[str, tuple[Sequence[str], Callable[[DiffRecord], str]]]] = {
    "invalid": (("key", "reason"), _row_invalid),
    "changed": (("key", "user_id", "account_id", "trait", "old", "new"), _row_changed),
    "gone": (("key",), _row_gone),
}


def _table(kind: str, records: Sequence[DiffRecord]) -> str:
    if kind == "new":
        return _new_table(records)
    head, row = _ROWS[kind]
    cells = "".join(f"<th>{name}</th>" for name in head)
    return (
        f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(map(row, records))}</tbody></table>"
    )


def _kind(kind: str, records: Sequence[DiffRecord], total: int) -> str:
    """One kind's records: the first SHOWN in a table, the rest folded away."""
    listed = f"{len(records):,}" + (f" of {total:,}" if total > len(records) else "")
    rest = records[SHOWN:]
    folded = (
        f'<details class="rest"><summary>Show {len(rest):,} more {kind} records</summary>'
        f"{_table(kind, rest)}</details>"
        if rest
        else ""
    )
    # a track event changed after sending is not re-sent: say so once (SPEC §10)
    why = next((r.reason for r in records if r.event and r.kind == "changed" and r.reason), None)
    note = f'<p class="reason">{_h(why)}</p>' if why else ""
    return (
        f'<details class="panel kind {kind}" open><summary><h3>'
        f'<span class="badge {kind}">{kind}</span> {_h(_KIND_TITLES[kind])} '
        f'<span class="meta">({listed})</span></h3></summary>'
        f"{note}{_table(kind, records[:SHOWN])}{folded}</details>"
    )


def _html_stream(index: int, stream: DiffStream, hint: str) -> str:
    records = ordered(stream.records)
    total = counts(stream)
    groups = [
        _kind(kind, [r for r in records if r.kind == kind], total.get(kind, 0))
        for kind in KIND_ORDER
        if any(r.kind == kind for r in records)
    ]
    body = "\n".join(groups) or '<p class="empty">No records to show.</p>'
    more = f'<p class="more">{_h(more_note(stream, hint))}</p>' if stream.truncated else ""
    return (
        f'<section class="stream" id="s{index}"><header><h2>{_h(stream.stream)}</h2>'
        f"<code>{_h(stream.event_type)}</code></header>"
        f'<p class="counts">{_h(count_phrase(counts(stream), " · "))}</p>\n'
        f"{_bars(stream)}\n{body}\n{more}</section>"
    )


def render_html(report: DiffReport, *, hint: str = MORE_HINT) -> str:
    """The dry-run report as one HTML page; values escaped, control characters shown."""
    title = f"etl diff — {report.mode}"
    sections = "\n".join(_html_stream(i, s, hint) for i, s in enumerate(report.streams, 1))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_h(title)}</title>
<style>{_CSS}
{_filter_css(report)}</style>
</head>
<body>
<main>
<h1>What the next sync would send</h1>
<p class="meta">etl diff · {_h(report.mode)} mode · dry run: nothing was sent</p>
{_html_summary(report)}
{_filters(report)}
{sections}
</main>
</body>
</html>
"""
