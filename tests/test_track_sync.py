"""Track streams end to end (SPEC §10) on PostgreSQL, MariaDB and SQLite with the
real receiver: history by backfill only, each key once, bounded state."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, run_cli

from etl import api
from etl.errors import StoppedError, UsageError
from etl.receiver.faults import FaultPlan
from etl.receiver.server import start_receiver
from etl.run.transform import EVENT_NAMESPACE
from etl.state.store import StateStore

UTC = dt.UTC
STREAM = "invoices_paid"
WORKSPACE_KEY = "ws-key-1"  # cli_env's

MAPPING = """\
stream: invoices_paid
kind: track
event_type: invoice_paid
source: {{table: invoices, where: "paid_at IS NOT NULL"}}
key: id
cursor: {cursor}
lookback: {lookback}
timestamp: paid_at
user_id: paid_by
account_id: workspace_id
properties:
  amount: {{column: amount_cents, type: integer}}
  currency: currency
"""

metadata = sa.MetaData()
invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("workspace_id", sa.String(24)),
    sa.Column("paid_by", sa.String(24)),
    sa.Column("amount_cents", sa.Integer),
    sa.Column("currency", sa.String(3)),
    sa.Column("paid_at", sa.DateTime(timezone=True)),
)


def utc_text(value: dt.datetime) -> str:
    """A time as the API wants it, written independently of etl's own coercion."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{value.microsecond:06d}" if value.microsecond else "") + "Z"


def expected_id(key: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(("track", WORKSPACE_KEY, STREAM, key))))


@dataclass
class Rig:
    """A source with an `invoices` table, its track mapping, a state store and the receiver."""

    url: str
    tmp: Path
    receiver: Any
    cursor: str = "paid_at"
    lookback: str = "10m"
    next_id: int = 0
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(self.url)
        metadata.create_all(self.engine)
        mappings = self.tmp / "mappings"
        mappings.mkdir(exist_ok=True)
        (mappings / "invoices.yml").write_text(
            MAPPING.format(cursor=self.cursor, lookback=self.lookback)
        )
        self.env = cli_env(self.tmp, self.url, self.receiver.url, ETL_PAGE_SIZE="50")

    def add(self, times: list[dt.datetime]) -> list[int]:
        """Insert one invoice per time; their ids."""
        ids = list(range(self.next_id, self.next_id + len(times)))
        self.next_id += len(times)
        with self.engine.begin() as conn:
            conn.execute(
                invoices.insert(),
                [
                    {
                        "id": i,
                        "workspace_id": f"w{i % 5}",
                        "paid_by": f"u{i % 17}",
                        "amount_cents": 100 + i,
                        "currency": "EUR",
                        "paid_at": at,
                    }
                    for i, at in zip(ids, times, strict=True)
                ],
            )
        return ids

    def paid_at(self) -> dict[str, str]:
        """Each row's time as the database holds it, as utc_time text."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(invoices.c.id, invoices.c.paid_at)).all()
        return {str(i): utc_text(at) for i, at in rows}

    def cli(self, *args: str) -> Any:
        return run_cli(list(args), self.env)

    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.receiver.events() if e["event_type"] == "invoice_paid"]

    def ledger(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.tmp / "state.db") as conn:
            return conn.execute("SELECT key, owner FROM etl_track_ledger").fetchall()


@pytest.fixture(params=["sqlite_url", "pg_url", "mariadb_url"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, receiver: Any) -> Iterator[Rig]:
    rig = Rig(request.getfixturevalue(request.param), tmp_path, receiver)
    yield rig
    rig.engine.dispose()


def now() -> dt.datetime:
    # whole seconds: MariaDB's DATETIME keeps no fraction, and ties must stay ties
    return dt.datetime.now(UTC).replace(microsecond=0)


def done_line(result: Any) -> dict[str, Any]:
    lines = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    return next(e for e in lines if e.get("event") == "stream.done")


def test_history_goes_by_backfill_and_new_rows_once_each(rig: Rig) -> None:
    """First sync sends no history; backfill --since sends the recent part, --force all of
    it with the same ids; appended, late and tied rows go exactly once with their time;
    an updated row is reported by diff and not re-sent."""
    start = now()
    history = rig.add([start - dt.timedelta(hours=4 * i + 2) for i in range(2000)])
    first = rig.cli("sync")
    assert first.exit_code == 0, first.stderr
    assert rig.events() == []
    # a time at or above the stream's start, which later watermarks pass
    after_start = now() + dt.timedelta(seconds=1)

    recent = rig.cli("backfill", "--since", "100d")
    assert recent.exit_code == 0, recent.stderr
    # rows 4i+2 hours old: those younger than 2,400 h are i < 600
    assert sorted(int(e["properties"]["amount"]) - 100 for e in rig.events()) == history[:600]
    again = rig.cli("backfill")
    assert again.exit_code == 2
    assert "already sent by a backfill" in again.stderr
    assert "--force" in again.stderr
    forced = rig.cli("backfill", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert '"event": "backfill.resend"' in forced.stderr
    assert len(rig.events()) == 2600

    # appended rows, 60 of them tied on one time across 50-row pages
    time.sleep(max(0.0, (after_start - dt.datetime.now(UTC)).total_seconds() + 0.05))
    t = now()
    appended = rig.add([after_start] * 5 + [t] * 60)
    assert rig.cli("sync").exit_code == 0
    # committed late: times below the last watermark, inside the 10 minute lookback
    late = rig.add([after_start] * 7 + [now()])
    assert done_line(rig.cli("sync"))["sent"] == 8
    idle = rig.cli("sync")
    assert done_line(idle)["sent"] == 0
    assert done_line(idle)["unchanged"] >= 73

    # a sent row changes: reported by diff, never sent again
    with rig.engine.begin() as conn:
        conn.execute(invoices.update().where(invoices.c.id == late[0]).values(amount_cents=9))
    report = json.loads(rig.cli("diff", "--format", "json").stdout)
    (stream,) = report["streams"]
    assert stream["kind"] == "track"
    assert stream["counts"]["changed"] == 1
    (changed,) = [r for r in stream["records"] if r["kind"] == "changed"]
    assert changed["key"] == str(late[0])
    assert changed["changes"]["amount"] == {"old": 100 + late[0], "new": 9}
    assert "changed after sending" in changed["reason"]
    assert done_line(rig.cli("sync"))["sent"] == 0

    events = rig.events()
    counts = collections.Counter(e["properties"]["amount"] - 100 for e in events)
    assert {i for i, n in counts.items() if n == 2} == set(history[:600])
    assert set(counts) == {*history, *appended, *late}
    assert all(n == 1 for i, n in counts.items() if i not in history[:600])
    times = rig.paid_at()
    for event in events:
        key = str(event["properties"]["amount"] - 100)
        assert event["event_id"] == expected_id(key)
        assert event["utc_time"] == times[key]
        assert event["user_id"]
        assert event["account_id"]


def test_the_ledger_stays_small_and_each_shard_prunes_only_its_own_keys(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """Forty syncs of a growing table by two shards: the ledger holds about one lookback
    window, a shard never prunes the other's keys, and no key is sent twice."""
    rig = Rig(sqlite_url, tmp_path, receiver, cursor="id", lookback="30")
    rig.add([now()] * 10)  # history: below the first sync's start
    shards = ("0/2", "1/2")
    for shard in shards:
        assert rig.cli("sync", "--shard", shard).exit_code == 0
    sizes = []
    for round_ in range(40):
        rig.add([now()] * 25)
        # shard 1 sits out the last rounds: its keys must survive shard 0's pruning
        for shard in shards if round_ < 35 else shards[:1]:
            result = rig.cli("sync", "--shard", shard)
            assert result.exit_code == 0, result.stderr
        sizes.append(len(rig.ledger()))
    # each sync keeps its own shard's keys at or above max(id) - 30: one window in all,
    # at most two while shard 1 (whose window then stays behind) sits out
    assert max(sizes[:35]) <= 31
    assert max(sizes) <= 2 * 31
    # shard 1's window from its last sync (ids up to 884), untouched by shard 0's prunes
    window = sorted(int(k) for k, owner in rig.ledger() if owner == f"{STREAM}#1/2")
    assert window
    assert window[0] >= 884 - 30
    assert window[-1] <= 884
    assert rig.cli("sync", "--shard", "1/2").exit_code == 0
    keys = collections.Counter(e["properties"]["amount"] - 100 for e in rig.events())
    assert set(keys) == set(range(10, 10 + 40 * 25))
    assert max(keys.values()) == 1


def test_a_stopped_backfill_resumes_only_with_the_same_since(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """A backfill stopped midway resumes with its --since; another --since is a usage
    error unless --restart; the resumed backfill sends nothing twice."""
    rig = Rig(sqlite_url, tmp_path, receiver)
    rig.add([now() - dt.timedelta(hours=i + 0.5) for i in range(400)])
    kwargs: dict[str, Any] = {
        "source_url": sqlite_url,
        "state_url": f"sqlite:///{tmp_path / 'state.db'}",
        "mappings_dir": tmp_path / "mappings",
        "endpoint": receiver.url,
        "token": TOKEN,
        "api_key": "k",
        "workspace_key": WORKSPACE_KEY,
        "page_size": 50,
        "batch_size": 50,
    }
    stop = threading.Event()
    pages: list[int] = []

    totals: set[int | None] = set()

    def progress(stream: str, done: int, total: int | None) -> None:
        pages.append(done)
        totals.add(total)
        if len(pages) == 3:
            stop.set()

    with pytest.raises(StoppedError):
        api.backfill(**kwargs, since="10d", stop=stop, progress=progress)
    assert totals == {240}  # the progress total is the backfill's range, not the table
    sent_before = len(rig.events())
    assert 0 < sent_before < 240
    with pytest.raises(UsageError, match=r"--since 10d is waiting to resume.*--restart"):
        api.backfill(**kwargs, since="5d")
    report = api.backfill(**kwargs, since="10d")
    assert report.streams[0].sent + sent_before == 240
    ids = collections.Counter(e["event_id"] for e in rig.events())
    assert len(ids) == 240
    assert max(ids.values()) == 1
    store = StateStore(kwargs["state_url"], readonly=True)
    try:
        state = store.track(STREAM)
        assert state is not None
        assert state.backfill_done_at is not None
        assert store.ledger_size(STREAM) == 0  # a finished backfill forgets its keys
    finally:
        store.close()


def test_kill_9_mid_backfill_duplicates_at_most_the_in_flight_batches(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A backfill killed after its first checkpoint, then run again: every row once,
    except at most two in-flight batches of 25, re-sent with the same ids."""
    plan = FaultPlan.from_json('{"latency_ms": [15, 15]}')
    with start_receiver(store=tmp_path / "received.db", tokens={TOKEN}, faults=plan) as rx:
        rig = Rig(sqlite_url, tmp_path, rx)
        rig.add([now() - dt.timedelta(minutes=i + 1) for i in range(1500)])
        env = {**rig.env, "ETL_BATCH_SIZE": "25", "ETL_PAGE_SIZE": "100"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "backfill"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while len(rig.events()) < 200 and time.monotonic() < deadline:
                assert proc.poll() is None, "the backfill ended before it was killed"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        before = len(rig.events())
        assert 200 <= before < 1500
        resumed = rig.cli("backfill")
        assert resumed.exit_code == 0, resumed.stderr
        events = rig.events()
    ids = collections.Counter(e["event_id"] for e in events)
    assert len(ids) == 1500
    assert sum(n - 1 for n in ids.values()) <= 2 * 25
    assert all(expected_id(str(e["properties"]["amount"] - 100)) == e["event_id"] for e in events)


def test_refused_track_events_are_bisected_kept_and_retried_once_accepted(
    tmp_path: Path, pg_url: str
) -> None:
    """A 400 on a batch of track events is bisected to the refused event; the rest go
    once, the refused one is kept (exit 3, metrics count it) and sent by a later run
    once the server takes it, with the same id; no other event is sent again."""
    faults = FaultPlan.from_json('{"reject_events_where": {"properties.amount": 107}}')
    with start_receiver(store=tmp_path / "rx1.db", tokens={TOKEN}, faults=faults) as strict:
        rig = Rig(pg_url, tmp_path, strict)
        assert rig.cli("sync").exit_code == 0
        rig.add([now() + dt.timedelta(days=1)] + [now()] * 39)  # one event in the future
        metrics = tmp_path / "etl.prom"
        first = rig.cli("sync", "--batch-size", "10", "--metrics-file", str(metrics))
        assert first.exit_code == 3, first.stderr
        done = done_line(first)
        assert (done["sent"], done["rejected"], done["future"]) == (39, 1, 1)
        assert 'etl_records_rejected{command="sync",stream="invoices_paid"} 1' in (
            metrics.read_text()
        )
        assert 'etl_records_future{command="sync",stream="invoices_paid"} 1' in (
            metrics.read_text()
        )
        assert any(r["status"] == 400 for r in strict.requests())
        assert rig.cli("sync").exit_code == 3  # still refused: kept, not lost
        refused = strict.events()
    with start_receiver(store=tmp_path / "rx2.db", tokens={TOKEN}) as lenient:
        rig.env = cli_env(tmp_path, pg_url, lenient.url, ETL_PAGE_SIZE="50")
        retried = rig.cli("sync")
        assert retried.exit_code == 0, retried.stderr
        assert done_line(retried)["sent"] == 1
        (event,) = lenient.events()
    assert event["properties"]["amount"] == 107
    assert event["event_id"] == expected_id("7")
    assert len({e["event_id"] for e in refused}) == len(refused) == 39
    rig.engine.dispose()


def test_an_invalid_row_fixed_below_the_floor_is_still_sent(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """An invalid track row is remembered and re-read by key: fixed after the floor
    passed it (its cursor must not move), it is sent by the next sync, once."""
    rig = Rig(sqlite_url, tmp_path, receiver, cursor="id", lookback="0")
    rig.add([now()])
    assert rig.cli("sync").exit_code == 0
    (broken,) = rig.add([now()])
    with rig.engine.begin() as conn:
        conn.execute(invoices.update().where(invoices.c.id == broken).values(paid_by=""))
    first = rig.cli("sync")
    assert first.exit_code == 3
    assert done_line(first)["invalid"] == 1
    rig.add([now()] * 3)
    again = rig.cli("sync")  # the floor passes the broken row; it is re-read by key
    assert done_line(again)["invalid"] == 1
    assert done_line(again)["sent"] == 3
    with rig.engine.begin() as conn:
        conn.execute(invoices.update().where(invoices.c.id == broken).values(paid_by="u-9"))
    fixed = rig.cli("sync")
    assert fixed.exit_code == 0, fixed.stderr
    assert done_line(fixed)["sent"] == 1
    assert done_line(rig.cli("sync"))["sent"] == 0
    events = [e for e in rig.events() if e["user_id"] == "u-9"]
    assert [e["event_id"] for e in events] == [expected_id(str(broken))]
    rig.engine.dispose()
