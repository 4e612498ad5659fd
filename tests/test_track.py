"""Track streams (SPEC §10) piece by piece: the mapping keys, the event a row becomes,
bad input, the receiver's rules, the reports and the usage errors."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, run_cli

from etl.errors import MappingError
from etl.mapping.parse import load_mappings, parse_mapping
from etl.model import DiffRecord, DiffReport, DiffStream
from etl.report.render import DIFF_JSON_SCHEMA, diff_to_dict, render_diff
from etl.run.transform import (
    EVENT_NAMESPACE,
    EventContext,
    make_transformer,
    to_event,
    track_event_id,
)

UTC = dt.UTC
TRACK = """\
stream: invoices_paid
kind: track
event_type: {event_type}
source: {{table: invoices}}
key: id
cursor: paid_at
timestamp: paid_at
user_id: paid_by
account_id: workspace_id
properties:
  amount: {{column: amount_cents, type: integer}}
  currency: currency
"""


def track(event_type: str = "invoice_paid", extra: str = "") -> str:
    return TRACK.format(event_type=event_type) + extra


def problems(text: str) -> list[str]:
    with pytest.raises(MappingError) as caught:
        parse_mapping(text, path="m.yml")
    return list(caught.value.problems)


# --- mapping ------------------------------------------------------------------


def test_a_track_mapping_parses_with_its_name_timestamp_and_properties() -> None:
    """kind: track gives a Mapping whose event name is a constant and whose properties
    are value sources."""
    mapping = parse_mapping(track(), path="m.yml")
    assert mapping.kind == "track"
    assert mapping.event_type == "invoice_paid"
    assert mapping.track is not None
    assert mapping.track.name.kind == "const"
    assert mapping.track.timestamp.value == "paid_at"
    assert [f.name for f in mapping.traits] == ["amount", "currency"]


@pytest.mark.parametrize(
    ("event_type", "problem"),
    [
        ('""', "event_type: the event name is empty"),
        ("user_identify", "event_type: 'user_identify' is reserved for identify events"),
        ("{const: account_identify}", "'account_identify' is reserved"),
        ("{const: 12}", "event_type: must be text"),
    ],
)
def test_a_constant_event_name_that_is_empty_or_reserved_is_a_mapping_error(
    event_type: str, problem: str
) -> None:
    """An empty or identify name, as a constant, is refused with the fix."""
    found = problems(track(event_type))
    assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("traits: {plan: plan}\n", "traits: does not apply to kind: track — rename it"),
        ("full_every: 1d\n", "full_every: does not apply to kind: track"),
        ("related: []\n", "related: does not apply to kind: track"),
        ("on_gone: {traits: {deleted: true}}\n", "on_gone: does not apply to kind: track"),
    ],
)
def test_keys_that_would_re_read_a_track_stream_are_mapping_errors(
    extra: str, problem: str
) -> None:
    """traits, full_every, related and on_gone are refused on a track stream."""
    assert any(problem in p for p in problems(track(extra=extra)))


def test_a_track_stream_needs_a_cursor_and_a_timestamp() -> None:
    """Without cursor or timestamp a track stream cannot find new rows or date them."""
    text = track().replace("cursor: paid_at\n", "").replace("timestamp: paid_at\n", "")
    found = problems(text)
    assert any("m.yml: cursor: is missing" in p for p in found)
    assert any("m.yml: timestamp: is missing" in p for p in found)


def test_track_keys_on_an_identify_stream_are_mapping_errors() -> None:
    """timestamp and properties only apply to kind: track."""
    text = (Path(__file__).parent.parent / "mappings" / "users.yml").read_text()
    found = problems(text + "timestamp: created_at\nproperties: {a: b}\n")
    assert any("timestamp: only applies to kind: track" in p for p in found)
    assert any("properties: only applies to kind: track" in p for p in found)


def test_identify_streams_run_before_track_streams(tmp_path: Path) -> None:
    """load_mappings orders accounts, users, then track streams."""
    repo = Path(__file__).parent.parent / "mappings"
    for name in ("users.yml", "workspaces.yml"):
        (tmp_path / name).write_text((repo / name).read_text())
    (tmp_path / "a_invoices.yml").write_text(track())
    assert [m.stream for m in load_mappings(tmp_path)] == ["workspaces", "users", "invoices_paid"]


# --- the event ---------------------------------------------------------------

CONTEXT = EventContext(event_type="invoice_paid", api_key="ak", workspace_key="wk", track=True)


def record(row: tuple[Any, ...], event_type: str = "invoice_paid") -> Any:
    mapping = parse_mapping(track(event_type), path="m.yml")
    return make_transformer(mapping, CONTEXT)(row)


def test_a_row_becomes_a_track_event_with_utc_time_and_properties() -> None:
    """Key, cursor, ids, timestamp, properties -> the SPEC §10 event; naive times are UTC."""
    at = dt.datetime(2024, 5, 1, 10, 0, 0, 250000)
    rec = record((7, at, "u-1", "w-1", at, 4900, "EUR"))
    assert rec.valid
    eid = track_event_id(workspace_key="wk", stream="invoices_paid", key="7")
    assert eid == str(uuid.uuid5(EVENT_NAMESPACE, "track\x1fwk\x1finvoices_paid\x1f7"))
    event = json.loads(to_event(rec.payload, event_id=eid, context=CONTEXT))
    assert event == {
        "event_id": eid,
        "anonymous_id": "",
        "user_id": "u-1",
        "account_id": "w-1",
        "api_key": "ak",
        "workspace_key": "wk",
        "src": "hyperengage",
        "library": "http",
        "event_type": "invoice_paid",
        "utc_time": "2024-05-01T10:00:00.250000Z",
        "properties": {"amount": 4900, "currency": "EUR"},
        "screen_resolution": "0",
    }


@pytest.mark.parametrize(
    ("name", "timestamp", "user", "reason"),
    [
        ("", "2024-05-01 10:00:00", "u-1", "event_type is missing or empty"),
        ("   ", "2024-05-01 10:00:00", "u-1", "event_type is missing or empty"),
        ("user_identify", "2024-05-01 10:00:00", "u-1", "reserved for identify events"),
        (None, "2024-05-01 10:00:00", "u-1", "event_type is missing or empty"),
        ("paid", None, "u-1", "timestamp is NULL"),
        ("paid", "2024-05-01 10:00:00", "", "user_id is missing or empty"),
        ("paid", "yesterday", "u-1", "utc_time: 'yesterday' is not an ISO-8601 datetime"),
    ],
)
def test_bad_rows_of_a_track_stream_are_invalid_records(
    name: str | None, timestamp: str | None, user: str, reason: str
) -> None:
    """A name from the row that is empty or reserved, a NULL timestamp or a missing id
    makes the record invalid, with the reason."""
    rec = record((1, timestamp, user, "w-1", name, timestamp, 1, "EUR"), "{column: kind}")
    assert not rec.valid
    assert reason in (rec.reason or "")


# --- the receiver ------------------------------------------------------------


def test_the_receiver_takes_track_events_as_jitsu_does(receiver: Any) -> None:
    """A track event is stored with `_timestamp` overwritten by the receive time; one
    whose properties are not an object is refused."""
    event = json.loads(
        to_event(
            {
                "user_id": "u",
                "account_id": "w",
                "anonymous_id": "",
                "event_type": "seat_added",
                "utc_time": "2020-01-01T00:00:00Z",
                "properties": {"seats": 3},
            },
            event_id="e-1",
            context=CONTEXT,
        )
    )
    url = f"{receiver.url}?token={TOKEN}"
    with httpx.Client() as client:
        ok = client.post(url, json=[{**event, "_timestamp": "2020-01-01T00:00:00Z"}])
        bad = client.post(url, json=[{**event, "event_id": "e-2", "properties": [1]}])
    assert ok.status_code == 200
    assert bad.status_code == 400
    assert "properties must be an object" in bad.json()["message"]
    (stored,) = receiver.events()
    assert stored["utc_time"] == "2020-01-01T00:00:00Z"
    assert stored["_timestamp"] > "2026"
    assert stored["properties"] == {"seats": 3}


# --- reports -----------------------------------------------------------------

TRACK_DIFF = DiffReport(
    mode="incremental",
    streams=(
        DiffStream(
            stream="invoices_paid",
            event_type="invoice_paid",
            kind="track",
            counts={"read": 3, "new": 1, "changed": 1, "unchanged": 1, "invalid": 0, "gone": 0},
            records=(
                DiffRecord(
                    key="9",
                    kind="new",
                    traits={"amount": 4900},
                    event={
                        "event_type": "invoice_paid",
                        "utc_time": "2024-05-01T10:00:00Z",
                        "user_id": "u-1",
                        "account_id": "w-1",
                        "anonymous_id": "",
                    },
                ),
                DiffRecord(
                    key="3",
                    kind="changed",
                    traits={"amount": 9},
                    changes={"amount": {"old": 7, "new": 9}},
                    reason="changed after sending: not sent again",
                    event={
                        "event_type": "invoice_paid",
                        "utc_time": "2024-04-01T10:00:00Z",
                        "user_id": "u-2",
                        "account_id": "w-1",
                    },
                ),
            ),
        ),
    ),
)


def test_every_diff_format_lists_new_events_with_name_time_ids_and_properties() -> None:
    """Text, Markdown, HTML and JSON show a new event's name, utc_time, ids and
    properties, and a change after sending with its reason; the JSON fits its schema."""
    line = "invoice_paid at 2024-05-01T10:00:00Z · user u-1 · account w-1"
    text = render_diff(TRACK_DIFF, format="text")
    assert f"+ 9  {line}\n    amount: 4900" in text
    assert "~ 3  changed after sending: not sent again\n    amount: 7 → 9" in text
    markdown = render_diff(TRACK_DIFF, format="markdown")
    assert "- 9 — invoice\\_paid at 2024-05-01T10:00:00Z · user u-1 · account w-1" in markdown
    assert "amount: 4900" in markdown
    html = render_diff(TRACK_DIFF, format="html")
    assert line in html
    assert "changed after sending" in html
    data = diff_to_dict(TRACK_DIFF)
    jsonschema.validate(data, DIFF_JSON_SCHEMA)
    stream = data["streams"][0]
    assert stream["kind"] == "track"
    assert stream["records"][0]["event"]["utc_time"] == "2024-05-01T10:00:00Z"
    assert stream["records"][0]["traits"] == {"amount": 4900}


# --- usage and bad input in a run ---------------------------------------------


@pytest.fixture
def invoices(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, str]:
    """A SQLite `invoices` table with one row, a track mapping for it, and the CLI's env."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, paid_by TEXT, workspace_id TEXT, "
            "amount_cents INTEGER, currency TEXT, kind TEXT, paid_at TIMESTAMP)"
        )
    engine.dispose()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "invoices.yml").write_text(track("{column: kind}"))
    return cli_env(tmp_path, sqlite_url, receiver.url)


def test_full_reads_of_a_track_stream_are_usage_errors(invoices: dict[str, str]) -> None:
    """sync --full and diff --full exit 2 naming the track stream; nothing is sent."""
    for args in (["sync", "--full"], ["diff", "--full"]):
        result = run_cli(args, invoices)
        assert result.exit_code == 2
        assert "invoices_paid is a track stream: --full does not apply" in result.stderr


def test_future_and_bad_rows_are_counted_and_the_run_goes_on(
    invoices: dict[str, str], receiver: Any
) -> None:
    """A future time is sent as it is and counted; a reserved name from a row is an
    invalid record (exit 3); the good rows are sent."""
    assert run_cli(["sync"], invoices).exit_code == 0
    now = dt.datetime.now(UTC).replace(tzinfo=None)
    rows = [
        (1, "signed_up", now),
        (2, "user_identify", now),
        (3, "paid", now + dt.timedelta(days=2)),
    ]
    engine = sa.create_engine(invoices["ETL_SOURCE_URL"])
    with engine.begin() as conn:
        for key, kind, at in rows:
            conn.exec_driver_sql(
                "INSERT INTO invoices VALUES (?, 'u-1', 'w-1', 5, 'EUR', ?, ?)",
                (key, kind, at.isoformat(sep=" ")),
            )
    engine.dispose()
    result = run_cli(["sync"], invoices)
    assert result.exit_code == 3
    done = next(json.loads(x) for x in result.stderr.splitlines() if '"stream.done"' in x)
    assert done["future"] == 1
    assert done["invalid"] == 1
    assert done["sent"] == 2
    assert sorted(e["event_type"] for e in receiver.events()) == ["paid", "signed_up"]


def test_validate_check_source_names_a_missing_timestamp_or_name_column(
    invoices: dict[str, str], tmp_path: Path
) -> None:
    """--check-source checks a track stream's timestamp and per-row name columns."""
    path = tmp_path / "mappings" / "invoices.yml"
    path.write_text(
        path.read_text()
        .replace("timestamp: paid_at", "timestamp: paid_on")
        .replace("{column: kind}", "{column: kind_of}")
    )
    result = run_cli(["validate", "--check-source"], invoices)
    assert result.exit_code == 2
    assert "invoices.yml: timestamp: no column 'paid_on' in the source" in result.stderr
    assert "invoices.yml: event_type: no column 'kind_of' in the source" in result.stderr


def test_validate_check_source_samples_track_rows_through_the_transform(
    invoices: dict[str, str],
) -> None:
    """--check-source maps a sample of a track stream's rows and reports the share
    of invalid ones by key: a NULL timestamp, a reserved name from a row."""
    engine = sa.create_engine(invoices["ETL_SOURCE_URL"])
    with engine.begin() as conn:
        for key, kind, at in (
            (1, "paid", "2024-02-01 10:00:00"),
            (2, "user_identify", "2024-02-02 10:00:00"),
            (3, "paid", None),
            (4, "paid", "2024-02-03 10:00:00"),
        ):
            conn.exec_driver_sql(
                "INSERT INTO invoices VALUES (?, 'u-1', 'w-1', 5, 'EUR', ?, ?)", (key, kind, at)
            )
    engine.dispose()
    result = run_cli(["validate", "--check-source"], invoices)
    assert result.exit_code == 0, result.output
    assert "sampled 4 row(s) (both ends of key and cursor): 2 valid, 2 invalid" in result.output
    assert "invoices.yml: timestamp: 1 of 4 sampled row(s) (25%) invalid" in result.output
    assert "invoices.yml: event_type: 1 of 4 sampled row(s) (25%) invalid" in result.output


def test_state_reset_forgets_a_track_stream_so_history_can_be_sent_again(
    invoices: dict[str, str], receiver: Any
) -> None:
    """After `etl state reset --stream`, a backfill needs no --force and sends the
    history again (same ids); before it, a second backfill is refused."""
    engine = sa.create_engine(invoices["ETL_SOURCE_URL"])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO invoices VALUES (1, 'u-1', 'w-1', 5, 'EUR', 'paid', '2024-01-01 10:00:00')"
        )
    engine.dispose()
    assert run_cli(["backfill"], invoices).exit_code == 0
    assert run_cli(["backfill"], invoices).exit_code == 2
    reset = run_cli(["state", "reset", "--stream", "invoices_paid"], invoices)
    assert reset.exit_code == 0, reset.stderr
    assert run_cli(["backfill"], invoices).exit_code == 0
    ids = [e["event_id"] for e in receiver.events()]
    assert len(ids) == 2
    assert len(set(ids)) == 1


def test_init_offers_a_track_stream_for_an_append_only_table(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """`etl init` writes a track mapping for a table with a creation time, no updated_at,
    a user and a workspace; it validates, its first sync sends no history, a backfill
    sends it."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        for ddl in (
            "CREATE TABLE workspaces (id TEXT PRIMARY KEY, name TEXT, owner_id TEXT, "
            "created_at TIMESTAMP, updated_at TIMESTAMP)",
            "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, workspace_id TEXT, "
            "created_at TIMESTAMP, updated_at TIMESTAMP)",
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, user_id TEXT, workspace_id TEXT, "
            "amount_cents INTEGER, created_at TIMESTAMP)",
            "INSERT INTO workspaces VALUES ('w1', 'W', 'u1', '2024-01-01', '2024-01-01')",
            "INSERT INTO users VALUES ('u1', 'a@b.c', 'A', 'w1', '2024-01-01', '2024-01-01')",
            "INSERT INTO invoices VALUES (1, 'u1', 'w1', 900, '2024-02-01 10:00:00')",
        ):
            conn.exec_driver_sql(ddl)
    engine.dispose()
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    made = run_cli(["init", "--out", env["ETL_MAPPINGS"]], env)
    assert made.exit_code == 0, made.output
    text = (Path(env["ETL_MAPPINGS"]) / "invoice_created.yml").read_text()
    assert "kind: track" in text
    assert "cursor: created_at" in text
    assert "timestamp: created_at" in text
    assert "#   amount_cents: amount_cents" in text
    assert run_cli(["validate", "--check-source"], env).exit_code == 0
    assert run_cli(["sync"], env).exit_code == 0
    assert [e["event_type"] for e in receiver.events()] == ["account_identify", "user_identify"]
    assert run_cli(["backfill", "--stream", "invoice_created"], env).exit_code == 0
    (event,) = [e for e in receiver.events() if e["event_type"] == "invoice_created"]
    assert event["utc_time"] == "2024-02-01T10:00:00Z"
