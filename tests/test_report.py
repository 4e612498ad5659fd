"""Rendering of the dry-run report (text, JSON, Markdown, HTML), redaction, the
plain tables of `etl state show` / `etl runs`, and the run summary."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from etl.errors import UsageError
from etl.model import DiffRecord, DiffReport, DiffStream, RunReport, StreamReport
from etl.report.render import (
    DIFF_JSON_SCHEMA,
    FORMATS,
    diff_to_dict,
    render_diff,
    render_run_report,
    render_table,
)

ANSI = "\x1b["
# A `|` that ends a Markdown cell: preceded by an even number of backslashes.
CELL_PIPE = re.compile(r"(?<!\\)(?:\\\\)*\|")


def sample_report() -> DiffReport:
    """Two streams with every kind of record, a truncated tail, and awkward values."""
    workspaces = DiffStream(
        stream="workspaces",
        event_type="account_identify",
        counts={"read": 120, "new": 1, "changed": 1, "unchanged": 117, "invalid": 1, "gone": 0},
        records=(
            DiffRecord(
                key="w_10",
                kind="new",
                traits={"name": "Acme | Corp", "seats": 12, "tags": ["beta", "eu"]},
            ),
            DiffRecord(
                key="w_3",
                kind="changed",
                traits={"name": "Globex `prod`", "plan_name": "pro", "seats": 40},
                changes={
                    "plan_name": {"old": "free", "new": "pro"},
                    "seats": {"old": 25, "new": 40},
                },
            ),
            DiffRecord(key="w_9", kind="invalid", reason="traits.name: empty — required"),
        ),
    )
    users = DiffStream(
        stream="users",
        event_type="user_identify",
        counts={"read": 1217, "new": 4, "changed": 2, "unchanged": 1210, "invalid": 1, "gone": 1},
        records=(
            DiffRecord(
                key="u_1",
                kind="new",
                traits={
                    "email": "jane.doe@example.com",
                    "name": "<script>alert(1)</script>",
                    "created_at": "2021-01-20T09:55:35Z",
                    "is_admin": True,
                    "nickname": "",
                },
            ),
            DiffRecord(
                key="u_2",
                kind="changed",
                traits={"email": "bob@corp.io", "name": "Bob", "title": ""},
                changes={
                    "email": {"old": "robert@corp.io", "new": "bob@corp.io"},
                    "title": {"old": None, "new": ""},
                    "phone": {"old": "+33 6 12"},
                },
            ),
            DiffRecord(key="u_3", kind="invalid", reason="traits.email: missing — required"),
            DiffRecord(key="u_4", kind="gone"),
        ),
        truncated=3,
    )
    return DiffReport(mode="incremental", streams=(workspaces, users))


@pytest.fixture
def report() -> DiffReport:
    """The sample dry run shared by the rendering tests."""
    return sample_report()


# --- redaction --------------------------------------------------------------


PII = ("jane.doe@example.com", "robert@corp.io", "bob@corp.io", "+33 6 12", "Globex", "Acme")


@pytest.mark.parametrize("fmt", FORMATS)
def test_redact_masks_traits_and_changes_in_every_format(report: DiffReport, fmt: str) -> None:
    """With redact=True no trait value or old/new value survives, but keys do."""
    out = render_diff(report, format=fmt, redact=True)
    # Markdown backslash-escapes `*` and `_` (`r\\*\\*\\*@`); compare what a reader sees.
    out = out.replace("\\", "") if fmt == "markdown" else out
    for secret in PII:
        assert secret not in out
    assert "r***@c***.io" in out
    assert "b***@c***.io" in out
    assert "u_1" in out
    assert "w_3" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_are_shown_as_is_without_redact(report: DiffReport, fmt: str) -> None:
    """Without redact the real values appear and nothing is masked."""
    out = render_diff(report, format=fmt)
    assert "robert@corp.io" in out
    assert "+33 6 12" in out
    assert "***" not in out


def test_diff_to_dict_redacts_and_leaves_the_report_alone(report: DiffReport) -> None:
    """diff_to_dict(redact=True) masks a copy; the DiffReport itself is unchanged."""
    data = diff_to_dict(report, redact=True)
    users = data["streams"][1]["records"]
    assert users[0]["traits"]["email"] == "j***@e***.com"
    assert users[0]["traits"]["is_admin"] is True
    assert users[1]["changes"]["email"] == {"old": "r***@c***.io", "new": "b***@c***.io"}
    assert report.streams[1].records[0].traits["email"] == "jane.doe@example.com"


# --- json -------------------------------------------------------------------


def test_json_round_trips_with_the_stable_schema(report: DiffReport) -> None:
    """The JSON output parses with json and orjson to the documented structure."""
    out = render_diff(report, format="json")
    assert out.endswith("}\n")
    assert out.startswith('{\n  "schema_version": 2,\n  "mode": "incremental"')
    data = json.loads(out)
    assert data == orjson.loads(out)
    assert data == diff_to_dict(report)
    users = data["streams"][1]
    assert users["stream"] == "users"
    assert users["event_type"] == "user_identify"
    assert users["counts"] == {
        "read": 1217,
        "new": 4,
        "changed": 2,
        "unchanged": 1210,
        "invalid": 1,
        "gone": 1,
        "null_cursor": 0,
    }
    assert users["truncated"] == 3
    assert [r["kind"] for r in users["records"]] == ["new", "changed", "invalid", "gone"]
    assert users["records"][2] == {
        "key": "u_3",
        "kind": "invalid",
        "user_id": None,
        "account_id": None,
        "traits": {},
        "changes": {},
        "reason": "traits.email: missing — required",
    }


def test_json_key_order_is_stable(report: DiffReport) -> None:
    """Top-level, stream, count and record keys come in the documented order."""
    data = json.loads(render_diff(report, format="json"))
    assert list(data) == ["schema_version", "mode", "streams"]
    stream = data["streams"][0]
    assert list(stream) == [
        "stream",
        "kind",
        "event_type",
        "counts",
        "records",
        "truncated",
        "changed_traits",
    ]
    assert list(stream["counts"]) == [
        "read",
        "new",
        "changed",
        "unchanged",
        "invalid",
        "gone",
        "null_cursor",
    ]
    assert list(stream["records"][1]) == [
        "key",
        "kind",
        "user_id",
        "account_id",
        "traits",
        "changes",
        "reason",
    ]
    assert list(stream["records"][1]["changes"]["seats"]) == ["old", "new"]


def test_json_keeps_null_empty_and_absent_apart(report: DiffReport) -> None:
    """A null old value stays null, and an absent side is left out of the change."""
    changes = diff_to_dict(report)["streams"][1]["records"][1]["changes"]
    assert changes["title"] == {"old": None, "new": ""}
    assert changes["phone"] == {"old": "+33 6 12"}


def test_json_counts_default_to_zero() -> None:
    """A count the producer left out is written as 0, so the schema always holds."""
    stream = DiffStream("users", "user_identify", counts={"read": 5, "unchanged": 5}, records=())
    data = diff_to_dict(DiffReport(mode="full", streams=(stream,)))
    assert data["streams"][0]["counts"]["gone"] == 0
    assert data["mode"] == "full"


@pytest.mark.parametrize("redact", [False, True])
def test_json_validates_against_its_schema(report: DiffReport, redact: bool) -> None:
    """The output, redacted or not, is valid under DIFF_JSON_SCHEMA (draft 2020-12)."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator
    validator.check_schema(DIFF_JSON_SCHEMA)
    validator(DIFF_JSON_SCHEMA).validate(
        json.loads(render_diff(report, format="json", redact=redact))
    )


def test_schema_rejects_an_unknown_kind(report: DiffReport) -> None:
    """The schema is strict enough to catch a record kind outside the contract."""
    jsonschema = pytest.importorskip("jsonschema")
    data = diff_to_dict(report)
    data["streams"][0]["records"][0]["kind"] = "deleted"
    errors = list(jsonschema.Draft202012Validator(DIFF_JSON_SCHEMA).iter_errors(data))
    assert errors


# --- text -------------------------------------------------------------------


def test_text_header_counts_and_markers(report: DiffReport) -> None:
    """Each stream gets a count header, and records the +, ~, ! and - markers."""
    lines = render_diff(report, format="text").splitlines()
    assert (
        "users (user_identify): 4 new, 2 changed, 1 invalid, 1,210 unchanged, 1 gone — read 1,217"
        in lines
    )
    assert "+ u_1" in lines
    assert '    email: "jane.doe@example.com"' in lines
    assert "    is_admin: true" in lines
    assert '    nickname: ""' in lines
    assert "~ u_2" in lines
    assert '    email: "robert@corp.io" → "bob@corp.io"' in lines
    assert "! u_3  traits.email: missing — required" in lines
    assert "- u_4  (sent before, no longer in the source; the API cannot delete)" in lines
    assert '    tags: ["beta","eu"]' in lines


def test_text_shows_null_empty_and_absent_differently(report: DiffReport) -> None:
    """null, "" and a trait missing on one side read differently in the text form."""
    lines = render_diff(report, format="text").splitlines()
    assert '    title: null → ""' in lines
    assert '    phone: "+33 6 12" → (absent)' in lines


def test_text_truncation_and_total(report: DiffReport) -> None:
    """A truncated stream says how many records were left out; the last line totals all."""
    lines = render_diff(report, format="text").splitlines()
    assert "… and 3 more not listed (raise --limit)" in lines
    assert lines[-1] == (
        "total (incremental, 2 streams): 5 new, 3 changed, 2 invalid, 1,327 unchanged, "
        "1 gone — read 1,337; dry run, nothing sent"
    )


def test_text_has_no_ansi_unless_color(report: DiffReport) -> None:
    """Plain text carries no escape codes; color=True paints markers by kind."""
    assert ANSI not in render_diff(report, format="text")
    coloured = render_diff(report, format="text", color=True)
    assert "\x1b[32m+ u_1\x1b[0m" in coloured
    assert "\x1b[33m~ u_2\x1b[0m" in coloured
    assert "\x1b[31m! u_3" in coloured
    assert "\x1b[2m- u_4" in coloured


def test_text_escapes_control_characters_in_keys() -> None:
    """A key holding an escape sequence cannot drive the terminal."""
    stream = DiffStream(
        "users",
        "user_identify",
        counts={"new": 1},
        records=(DiffRecord(key="evil\x1b[2J", kind="new", traits={"name": "x\u009b\u202eq"}),),
    )
    out = render_diff(DiffReport(mode="full", streams=(stream,)), format="text")
    assert "\x1b" not in out
    assert "\u009b" not in out
    assert "\u202e" not in out
    assert '    name: "x\\u009b\\u202eq"' in out
    assert "+ evil\\u001b[2J" in out


# --- markdown ---------------------------------------------------------------


def test_markdown_summary_table(report: DiffReport) -> None:
    """The summary table has one row per stream and a bold total row."""
    lines = render_diff(report, format="markdown").splitlines()
    assert "| stream | new | changed | invalid | unchanged | gone | read |" in lines
    assert "| users | 4 | 2 | 1 | 1,210 | 1 | 1,217 |" in lines
    assert "| workspaces | 1 | 1 | 1 | 117 | 0 | 120 |" in lines
    assert "| **total** | **5** | **3** | **2** | **1,327** | **1** | **1,337** |" in lines


def test_markdown_change_table_and_key_lists(report: DiffReport) -> None:
    """Changes form a key/trait/old/new table; new, invalid and gone keys are listed."""
    lines = render_diff(report, format="markdown").splitlines()
    assert "### users (`user_identify`)" in lines
    assert "| key | trait | old | new |" in lines
    assert '| u\\_2 | email | "robert@corp.io" | "bob@corp.io" |' in lines
    assert '| u\\_2 | phone | "+33 6 12" | (absent) |' in lines
    assert "- u\\_1" in lines
    assert "- u\\_3 — traits.email: missing — required" in lines
    assert "- u\\_4" in lines
    assert "\\_… and 3 more not listed (raise --limit)\\_" not in lines
    assert "_… and 3 more not listed (raise --limit)_" in lines


def test_markdown_escapes_pipes_and_backticks() -> None:
    """A | or a backtick in a key or value cannot break the table or open code."""
    stream = DiffStream(
        "ws",
        "account_identify",
        counts={"changed": 1},
        records=(
            DiffRecord(
                key="a|b",
                kind="changed",
                changes={"name": {"old": "x | y", "new": "`rm -rf`"}},
            ),
        ),
    )
    out = render_diff(DiffReport(mode="full", streams=(stream,)), format="markdown")
    assert '| a\\|b | name | "x \\| y" | "\\`rm -rf\\`" |' in out.splitlines()
    table_rows = [line for line in out.splitlines() if line.startswith("| a")]
    assert all(line.replace("\\|", "").count("|") == 5 for line in table_rows)


# --- html -------------------------------------------------------------------


class _PageParser(HTMLParser):
    """Collects what the HTML tests look at: tags, attributes, cards and table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.cards: list[str] = []
        self.open: list[str] = []
        self.summary_rows: list[list[str]] = []
        self._in_summary = False
        self._row: list[str] | None = None
        self._text: list[str] = []
        self._kind = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)
        classes = (dict(attrs).get("class") or "").split()
        if tag == "details" and "kind" in classes:
            self._kind = classes[-1]
        if tag == "tr" and "rec" in classes:
            self.cards.append(self._kind)
        if tag == "table" and "summary" in classes:
            self._in_summary = True
        if self._in_summary and tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._text = []
        if tag not in ("meta", "br", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open.pop() == tag, f"</{tag}> does not close the open element"
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._text).strip())
        if tag == "tr" and self._row is not None:
            self.summary_rows.append(self._row)
            self._row = None
        if tag == "table":
            self._in_summary = False

    def handle_data(self, data: str) -> None:
        self._text.append(data)


SAFE_TAGS = (
    *("html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "a", "div"),
    *("table", "thead", "tbody", "tfoot", "tr", "th", "td", "section", "header", "article"),
    *("span", "code", "nav", "fieldset", "legend", "input", "label", "details", "summary", "h3"),
)


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


def test_html_is_one_balanced_page_with_a_summary(report: DiffReport) -> None:
    """The page parses with balanced tags and its summary lists each stream and a total."""
    page = render_diff(report, format="html")
    assert page.startswith("<!DOCTYPE html>")
    parsed = _parse(page)
    assert parsed.open == []
    assert "<title>etl diff — incremental</title>" in page
    assert parsed.summary_rows[0] == [
        "Stream",
        "Event type",
        "new",
        "changed",
        "invalid",
        "unchanged",
        "gone",
        "read",
    ]
    assert parsed.summary_rows[1] == [
        "workspaces",
        "account_identify",
        "1",
        "1",
        "1",
        "117",
        "0",
        "120",
    ]
    assert parsed.summary_rows[2] == [
        "users",
        "user_identify",
        "4",
        "2",
        "1",
        "1,210",
        "1",
        "1,217",
    ]
    assert parsed.summary_rows[3][0] == "Total"
    assert "… and 3 more not listed (raise --limit)" in page


def test_html_has_a_row_per_record_invalid_first(report: DiffReport) -> None:
    """Every record becomes one row in its kind's table; invalid ones come first."""
    parsed = _parse(render_diff(report, format="html"))
    order = ("invalid", "changed", "new", "gone")
    expected = [
        r.kind for s in report.streams for r in sorted(s.records, key=lambda r: order.index(r.kind))
    ]
    assert parsed.cards == expected
    assert parsed.cards[: len(report.streams[0].records)][0] == "invalid"


def test_html_changed_rows_show_old_and_new(report: DiffReport) -> None:
    """A changed record shows each changed trait's old and new side by side, absent shown."""
    page = render_diff(report, format="html")
    assert (
        '<td class="v">email</td><td data-side=old class="v">&quot;robert@corp.io&quot;</td>'
        '<td data-side=new class="v">&quot;bob@corp.io&quot;</td>'
    ) in page
    assert '<td data-side=new class="absent">absent</td>' in page


def test_html_escapes_markup_in_values(report: DiffReport) -> None:
    """A trait holding <script> is shown as text, never as markup."""
    page = render_diff(report, format="html")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in _parse(page).tags


def test_html_references_nothing_external(report: DiffReport) -> None:
    """The page is self-contained: no links, scripts, images or URLs in attributes."""
    page = render_diff(report, format="html")
    parsed = _parse(page)
    assert "http://" not in page
    assert "https://" not in page
    assert not {"link", "script", "img", "iframe"} & set(parsed.tags)
    hrefs = [value for name, value in parsed.attributes if name in ("href", "src")]
    assert hrefs
    assert all(value and value.startswith("#") for value in hrefs)


def test_html_file_opened_from_disk_declares_its_encoding(
    report: DiffReport, tmp_path: Path
) -> None:
    """Saved as a file (no HTTP header), the page says it is UTF-8 where browsers look
    (the first 1024 bytes), so non-ASCII text shows intact, with a row per record."""
    path = tmp_path / "report.html"
    path.write_bytes(render_diff(report, format="html").encode("utf-8"))
    raw = path.read_bytes()
    # HTML's encoding prescan reads only the first 1024 bytes for a <meta charset>.
    assert b'<meta charset="utf-8">' in raw[:1024].lower()
    page = raw.decode("utf-8")
    assert "traits.name: empty — required" in page
    parsed = _parse(page)
    assert parsed.open == []
    assert sorted(parsed.cards) == sorted(r.kind for s in report.streams for r in s.records)


@given(key=st.text(), name=st.text(), old=st.text(), new=st.text())
def test_any_text_stays_inside_its_cell(key: str, name: str, old: str, new: str) -> None:
    """Whatever a key, trait name or value holds, HTML tags and Markdown cells keep their shape."""
    record = DiffRecord(
        key=key, kind="changed", traits={name: new}, changes={name: {"old": old, "new": new}}
    )
    stream = DiffStream("s", "user_identify", counts={"changed": 1}, records=(record,))
    report = DiffReport(mode="full", streams=(stream,))
    parsed = _parse(render_diff(report, format="html"))
    assert parsed.open == []
    assert parsed.cards == ["changed"]
    assert set(parsed.tags) <= {*SAFE_TAGS}
    lines = render_diff(report, format="markdown").splitlines()
    row = lines[lines.index("| key | trait | old | new |") + 2]
    assert len(CELL_PIPE.findall(row)) == 5


# --- render_diff errors -----------------------------------------------------


def test_unknown_format_is_a_usage_error(report: DiffReport) -> None:
    """An unknown format raises UsageError naming the valid ones."""
    with pytest.raises(UsageError, match="text, json, markdown, html"):
        render_diff(report, format="yaml")


def test_empty_report_renders_in_every_format() -> None:
    """A dry run with no streams still renders a total in every format."""
    empty = DiffReport(mode="full", streams=())
    assert render_diff(empty, format="text").endswith("read 0; dry run, nothing sent\n")
    assert json.loads(render_diff(empty, format="json"))["streams"] == []
    assert "| **total** | **0** |" in render_diff(empty, format="markdown")
    assert _parse(render_diff(empty, format="html")).cards == []


# --- tables -----------------------------------------------------------------


def test_render_table_aligns_columns() -> None:
    """Text columns are left-aligned, number columns right-aligned, None shown as -."""
    rows: list[dict[str, Any]] = [
        {"stream": "users", "watermark": "2024-05-01T00:00:00Z", "records": 1217, "rejects": 0},
        {"stream": "workspaces", "watermark": None, "records": 8, "rejects": None},
    ]
    out = render_table(rows, ["stream", "watermark", "records", "rejects"])
    assert out.splitlines() == [
        "stream      watermark             records  rejects",
        "----------  --------------------  -------  -------",
        "users       2024-05-01T00:00:00Z     1217        0",
        "workspaces  -                           8        -",
    ]


def test_render_table_formats_mixed_values() -> None:
    """Missing keys, booleans, floats and per-stream dicts each render in one cell."""
    rows: list[dict[str, Any]] = [
        {"id": 3, "ok": True, "seconds": 1.5, "counts": {"users": 4, "ws": 1}}
    ]
    out = render_table(rows, ["id", "ok", "seconds", "counts", "error"])
    assert out.splitlines()[2] == " 3  yes     1.50  users=4, ws=1  -"


def test_render_table_without_rows_has_header_and_rule() -> None:
    """An empty table still shows its header and rule."""
    assert render_table([], ["id", "status"]).splitlines() == ["id  status", "--  ------"]


# --- run report -------------------------------------------------------------


def test_run_report_summarises_streams_and_lists_problems() -> None:
    """The run summary has a status line, one line per stream, and the bad records."""
    invalid = tuple((f"u_{i}", "traits.email: missing") for i in range(25))
    users = StreamReport(
        stream="users",
        event_type="user_identify",
        read=1217,
        new=4,
        changed=2,
        unchanged=1186,
        invalid=25,
        rejected=1,
        sent=5,
        batches=1,
        retries=2,
        seconds=2.345,
        watermark="2024-05-01T00:00:00Z",
        invalid_records=invalid,
        rejected_records=(("u_99", "traits.created_at: bad date"),),
    )
    run = RunReport(run_id=42, command="sync", streams=(users,), status="partial")
    lines = render_run_report(run).splitlines()
    assert lines[0] == "etl sync, run 42: finished, some records were invalid or rejected"
    assert lines[1] == (
        "  users (user_identify): read 1,217, 4 new, 2 changed, 1,186 unchanged, 25 invalid, "
        "1 rejected; sent 5 in 1 batch, 2 retries; 2.3 s"
    )
    assert "    watermark 2024-05-01T00:00:00Z" in lines
    assert "    invalid (25):" in lines
    assert "      ! u_19  traits.email: missing" in lines
    assert "      ! u_20  traits.email: missing" not in lines
    assert "      … and 5 more" in lines
    assert "    rejected (1):" in lines
    assert "      ✗ u_99  traits.created_at: bad date" in lines


def test_run_report_shows_the_error_of_a_failed_run() -> None:
    """A failed run names its error and omits empty problem lists."""
    ws = StreamReport(stream="workspaces", event_type="account_identify", read=3, full=True)
    run = RunReport(
        run_id=None, command="backfill", streams=(ws,), status="failed", error="401 from API"
    )
    out = render_run_report(run)
    assert out.splitlines()[0] == "etl backfill: failed"
    assert "workspaces (account_identify, full): read 3" in out
    assert out.splitlines()[-1] == "error: 401 from API"
    assert "invalid (" not in out
