"""Incremental correctness (SPEC §5) on the real databases: no row is ever skipped,
none is sent twice without cause.

Each test would fail on the naive design, `updated_at > max(updated_at) seen`:
the comment on each says how.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from support import TOKEN, run_cli

from etl import api
from etl.mapping.parse import load_mappings
from etl.model import RunReport, Secret
from etl.run.options import Collaborators, RunOptions
from etl.run.pipeline import run
from etl.settings import DeliverySettings, EventIdentity
from etl.source import extract
from etl.source.horizon import fall_back, safe_horizon, sqlite_text
from etl.state.schema import streams_table
from etl.state.store import StateStore

UTC = dt.UTC

MAPPING = """\
event_type: user_identify
source: {{table: items}}
key: id
cursor: {cursor}
lookback: {lookback}
timezone: {timezone}
user_id: id
account_id: account
traits:
  email: email
  name: name
  created_at: {{column: created_at, type: datetime}}
"""

# Column types per dialect: the cursor type under test varies.
DDL = {
    "postgresql": "CREATE TABLE items (id varchar(32) PRIMARY KEY, account varchar(32), "
    "email varchar(200), name varchar(200), created_at {ts}, updated_at {ts}, version bigint)",
    "mysql": "CREATE TABLE items (id varchar(32) PRIMARY KEY, account varchar(32), "
    "email varchar(200), name varchar(200), created_at {ts}, updated_at {ts}, version bigint)",
    "sqlite": "CREATE TABLE items (id TEXT PRIMARY KEY, account TEXT, email TEXT, name TEXT, "
    "created_at {ts}, updated_at {ts}, version INTEGER)",
}
TIMESTAMP = {"postgresql": "timestamptz", "mysql": "DATETIME(6)", "sqlite": "TIMESTAMP"}
NOW = {
    "postgresql": "now()",
    "mysql": "UTC_TIMESTAMP(6)",
    "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
}


@dataclass
class Rig:
    """A source with an `items` table, a mapping for it, a state store and the receiver."""

    url: str
    tmp: Path
    receiver: Any
    state_url: str = ""
    seen: int = 0
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(self.url)
        self.state_url = self.state_url or f"sqlite:///{self.tmp / 'state.db'}"
        (self.tmp / "mappings").mkdir(exist_ok=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create(self, ts: str | None = None) -> None:
        self.sql(DDL[self.dialect].format(ts=ts or TIMESTAMP[self.dialect]))

    def mapping(
        self, *, cursor: str = "updated_at", lookback: str = "0s", timezone: str = "UTC"
    ) -> None:
        text = MAPPING.format(cursor=cursor, lookback=lookback, timezone=timezone)
        (self.tmp / "mappings" / "items.yml").write_text(text)

    def sql(self, statement: str, params: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(statement), params or {})

    def insert(self, n: int, *, start: int = 0, updated: str | None = None) -> None:
        """n rows stamped with `updated` (an SQL expression), the DB clock by default."""
        for i in range(start, start + n):
            self.sql(
                "INSERT INTO items (id, account, email, name, created_at, updated_at, version) "
                f"VALUES (:id, 'acct', :email, :name, {NOW[self.dialect]}, "
                f"{updated or NOW[self.dialect]}, :v)",
                {"id": f"k{i:04d}", "email": f"u{i}@example.com", "name": f"n{i}", "v": i},
            )

    def sync(self, **kw: Any) -> RunReport:
        return api.sync(
            source_url=self.url,
            state_url=self.state_url,
            mappings_dir=self.tmp / "mappings",
            endpoint=self.receiver.url,
            token=TOKEN,
            api_key="k",
            workspace_key="w",
            **kw,
        )

    def sent(self) -> list[str]:
        """Keys received since the last call, in arrival order."""
        events = self.receiver.events()
        new, self.seen = events[self.seen :], len(events)
        return [e["user_id"] for e in new]

    def watermark(self) -> Any:
        store = StateStore(self.state_url, readonly=True)
        try:
            state = store.stream("items")
            return state.watermark if state else None
        finally:
            store.close()

    def close(self) -> None:
        self.engine.dispose()


def _rig(url: str, tmp_path: Path, receiver: Any) -> Iterator[Rig]:
    rig = Rig(url, tmp_path, receiver)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def pg(pg_url: str, tmp_path: Path, receiver: Any) -> Iterator[Rig]:
    yield from _rig(pg_url, tmp_path, receiver)


@pytest.fixture
def maria(mariadb_url: str, tmp_path: Path, receiver: Any) -> Iterator[Rig]:
    yield from _rig(mariadb_url, tmp_path, receiver)


@pytest.fixture
def lite(sqlite_url: str, tmp_path: Path, receiver: Any) -> Iterator[Rig]:
    yield from _rig(sqlite_url, tmp_path, receiver)


@pytest.fixture(
    params=[
        "lite",
        pytest.param("pg", marks=pytest.mark.postgres),
        pytest.param("maria", marks=pytest.mark.mariadb),
    ]
)
def rig(request: pytest.FixtureRequest) -> Rig:
    """The same scenario on SQLite, PostgreSQL and MariaDB."""
    value: Rig = request.getfixturevalue(request.param)
    return value


FUTURE = {
    "postgresql": "now() + interval '1 day'",
    "mysql": "UTC_TIMESTAMP(6) + INTERVAL 1 DAY",
    "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now', '+1 day')",
}


def test_watermark_is_the_database_clock_not_the_largest_cursor(rig: Rig) -> None:
    """A future-dated row does not drag the watermark ahead and hide later writes."""
    rig.create()
    rig.mapping()
    rig.insert(1, updated=FUTURE[rig.dialect])
    rig.insert(2, start=1)
    rig.sync()
    assert sorted(rig.sent()) == ["k0000", "k0001", "k0002"]
    watermark = rig.watermark()
    assert watermark <= dt.datetime.now(UTC) + dt.timedelta(seconds=5)
    # naive: the watermark would be tomorrow, and this write (stamped now) skipped
    rig.insert(1, start=3)
    rig.sync()
    assert rig.sent() == ["k0003"]


def test_lookback_rereads_but_unchanged_rows_are_not_sent(rig: Rig) -> None:
    """Rows inside the lookback window are read again and not re-sent."""
    rig.create()
    rig.mapping(lookback="1h")
    rig.insert(5)
    rig.sync()
    assert len(rig.sent()) == 5
    report = rig.sync()
    (stream,) = report.streams
    assert (stream.read, stream.unchanged, stream.sent) == (5, 5, 0)
    assert rig.sent() == []


def test_rows_tied_with_the_watermark_are_delivered(rig: Rig) -> None:
    """A row written after a run with exactly the watermark's cursor value is read (>=)."""
    rig.create()
    rig.mapping()
    rig.insert(2)
    rig.sync()
    rig.sent()
    watermark = rig.watermark()
    value = watermark if rig.dialect == "postgresql" else watermark.replace(tzinfo=None)
    if rig.dialect == "sqlite":
        value = sqlite_text(value)
    rig.sql(
        "INSERT INTO items (id, account, email, name, created_at, updated_at) "
        "VALUES ('tie', 'acct', 't@example.com', 'tie', :ts, :ts)",
        {"ts": value},
    )
    # naive `>` would skip it
    rig.sync()
    assert rig.sent() == ["tie"]


@pytest.mark.postgres
def test_late_commit_is_delivered_by_the_next_sync_postgres(pg: Rig) -> None:
    """A transaction stamped before a sync but committed after it is not skipped."""
    pg.create()
    pg.mapping()  # lookback 0: only the safe horizon protects this row
    pg.insert(3)
    pg.sync()
    pg.sent()
    with pg.engine.connect() as late:
        late.execute(
            sa.text("UPDATE items SET name = 'late', updated_at = now() WHERE id = 'k0001'")
        )
        started = late.execute(sa.text("SELECT now()")).scalar_one()
        report = pg.sync()
        assert report.streams[0].sent == 0
        # naive: the watermark would pass `started` and the row, committed below it, be lost
        assert pg.watermark() <= started
        late.commit()
    pg.sync()
    assert pg.sent() == ["k0001"]
    assert pg.receiver.events()[-1]["traits"]["name"] == "late"


@pytest.mark.mariadb
def test_late_commit_is_delivered_by_the_next_sync_mariadb(maria: Rig) -> None:
    """MariaDB: an open InnoDB transaction holds the watermark back the same way."""
    maria.create()
    maria.mapping()
    maria.insert(3)
    maria.sync()
    maria.sent()
    with maria.engine.connect() as late:
        late.execute(
            sa.text(
                "UPDATE items SET name = 'late', updated_at = UTC_TIMESTAMP(6) WHERE id = 'k0001'"
            )
        )
        stamped = late.execute(
            sa.text("SELECT updated_at FROM items WHERE id = 'k0001'")
        ).scalar_one()
        assert maria.sync().streams[0].sent == 0
        assert maria.watermark() <= stamped.replace(tzinfo=UTC)
        late.commit()
    maria.sync()
    assert maria.sent() == ["k0001"]


@pytest.mark.postgres
def test_a_stuck_transaction_older_than_the_bound_is_ignored(pg: Rig) -> None:
    """A transaction open past the bound does not freeze the stream: it is logged and ignored."""
    pg.create()
    pg.mapping()
    pg.insert(2)
    with pg.engine.connect() as stuck:
        stuck.execute(sa.text("SELECT txid_current()"))  # opens a transaction
        mappings = load_mappings(pg.tmp / "mappings")
        store = StateStore(pg.state_url)
        source = sa.create_engine(pg.url)
        try:
            with source.connect() as conn, extract.read_only(conn):
                src = extract.source_from(conn, mappings[0])
                held = safe_horizon(conn, mappings[0], src)
                free = safe_horizon(
                    conn, mappings[0], src, max_transaction_age=dt.timedelta(seconds=0)
                )
        finally:
            source.dispose()
            store.close()
        stuck.rollback()
    assert held.held_by_transaction is not None
    assert held.value == held.held_by_transaction
    assert free.held_by_transaction is None
    assert free.value == free.clock
    assert any("older than" in note for note in free.notes)


def _pipeline(rig: Rig, *, progress: Any = None, page_size: int = 7) -> RunReport:
    mappings = load_mappings(rig.tmp / "mappings")
    store = StateStore(rig.state_url)
    source = sa.create_engine(rig.url)
    settings = DeliverySettings(endpoint=rig.receiver.url)
    identity = EventIdentity(api_key="k", workspace_key="w")
    from etl.delivery.load import make_client

    try:
        with make_client(settings, Secret(TOKEN)) as client:
            io = Collaborators(
                source=source,
                state=store,
                identity=identity,
                delivery=settings,
                client=client,
                progress=progress,
            )
            report, _ = run(
                mappings, command="sync", options=RunOptions(page_size=page_size), io=io
            )
            return report
    finally:
        source.dispose()
        store.close()


@pytest.mark.parametrize(
    "which",
    [
        pytest.param("pg", marks=pytest.mark.postgres),
        pytest.param("maria", marks=pytest.mark.mariadb),
    ],
)
def test_rows_updated_during_a_run_are_neither_skipped_nor_read_twice(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Pages come from one snapshot: writes during the run wait for the next one."""
    rig: Rig = request.getfixturevalue(which)
    rig.create()
    rig.mapping()
    rig.insert(
        50, updated=FUTURE[rig.dialect].replace("1 day", "-1 day").replace("+1 day", "-1 day")
    )
    done = threading.Event()

    def meddle(_stream: str, read: int, _total: int | None) -> None:
        if done.is_set():
            return
        done.set()
        # one row already read, one not yet: both move to "now"
        rig.sql(
            f"UPDATE items SET name = 'moved', updated_at = {NOW[rig.dialect]} "
            "WHERE id IN ('k0002', 'k0040')"
        )

    report = _pipeline(rig, progress=meddle)
    (stream,) = report.streams
    assert (stream.read, stream.sent) == (50, 50)
    assert sorted(set(rig.sent())) == [f"k{i:04d}" for i in range(50)]
    _pipeline(rig)
    assert sorted(rig.sent()) == ["k0002", "k0040"]


@pytest.mark.postgres
def test_naive_timestamps_are_read_in_the_mapping_zone_postgres(pg: Rig) -> None:
    """`timestamp without time zone` in America/New_York: converted, compared, never skipped."""
    pg.create(ts="timestamp")
    pg.mapping(timezone="America/New_York")
    pg.sql(
        "INSERT INTO items VALUES ('k1', 'a', 'e@example.com', 'n', '2024-01-15 07:00:00', "
        "(now() AT TIME ZONE 'America/New_York') - interval '1 minute', 1)"
    )
    pg.sync()
    assert pg.sent() == ["k1"]
    assert pg.receiver.events()[0]["traits"]["created_at"] == "2024-01-15T12:00:00Z"
    # local New York time is 5 h behind UTC: read as UTC this row would be skipped
    pg.sql(
        "UPDATE items SET name = 'later', updated_at = now() AT TIME ZONE 'America/New_York' "
        "WHERE id = 'k1'"
    )
    pg.sync()
    assert pg.sent() == ["k1"]


def test_sqlite_text_timestamps_in_common_formats_are_not_skipped(lite: Rig) -> None:
    """Rows stamped as apps write text (T, Z, offsets, fractions) after a sync are delivered."""
    lite.create()
    lite.mapping()
    lite.insert(1)
    lite.sync()
    lite.sent()
    soon = (dt.datetime.now(UTC) + dt.timedelta(seconds=2)).replace(microsecond=0)
    formats = {
        "plain": soon.strftime("%Y-%m-%d %H:%M:%S"),
        "iso_z": soon.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fraction": soon.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "offset": soon.isoformat(),
    }
    for key, text in formats.items():
        lite.sql(
            "INSERT INTO items (id, account, email, name, created_at, updated_at) "
            "VALUES (:id, 'a', 'e@example.com', 'n', :ts, :ts)",
            {"id": key, "ts": text},
        )
    lite.sync()
    assert sorted(lite.sent()) == sorted(formats)
    created = {e["user_id"]: e["traits"]["created_at"] for e in lite.receiver.events()}
    assert created["offset"] == created["plain"]


@pytest.mark.mariadb
def test_mariadb_datetime6_keeps_microseconds(maria: Rig) -> None:
    """The watermark is stored with microseconds and a row a microsecond after it is read."""
    maria.create()
    maria.mapping()
    maria.insert(1)
    maria.sync()
    maria.sent()
    watermark = maria.watermark()
    state = sa.create_engine(maria.state_url)
    with state.connect() as conn:  # the stored text itself, not its decoded value
        text = conn.execute(sa.select(streams_table.c.watermark)).scalar_one()
    state.dispose()
    assert text == watermark.isoformat(timespec="microseconds")
    assert text.endswith("+00:00")
    just_after = (watermark + dt.timedelta(microseconds=1)).replace(tzinfo=None)
    maria.sql(
        "INSERT INTO items (id, account, email, name, created_at, updated_at) "
        "VALUES ('us', 'a', 'e@example.com', 'n', :ts, :ts)",
        {"ts": just_after},
    )
    maria.sync()
    assert maria.sent() == ["us"]


def test_dst_fall_back_hour_loses_nothing(lite: Rig) -> None:
    """Naive Berlin times in the repeated hour of a fall-back are still above the bound."""
    lite.create()
    lite.mapping(timezone="Europe/Berlin")
    lite.insert(1)
    lite.sync()
    lite.sent()
    mapping = load_mappings(lite.tmp / "mappings")[0]
    store = StateStore(lite.state_url)
    # 00:30 UTC on 2024-10-27 is 02:30 CEST; at 01:00 UTC clocks fall back to 02:00 CET
    store.save_watermark("items", dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC), mapping.fingerprint)
    store.close()
    # 01:10 UTC, after the watermark, is 02:10 local: below 02:30 as text
    lite.sql(
        "INSERT INTO items (id, account, email, name, created_at, updated_at) "
        "VALUES ('dst', 'a', 'e@example.com', 'n', '2024-10-27 02:10:00', '2024-10-27 02:10:00')"
    )
    lite.sync()
    assert "dst" in lite.sent()


def test_fall_back_is_zero_without_a_transition() -> None:
    """The bound moves only when the zone's clocks actually went back."""
    berlin = ZoneInfo("Europe/Berlin")
    summer = dt.datetime(2024, 7, 1, tzinfo=UTC)
    assert fall_back(summer, summer + dt.timedelta(days=1), berlin) == dt.timedelta(0)
    autumn = dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC)
    assert fall_back(autumn, autumn + dt.timedelta(hours=1), berlin) == dt.timedelta(hours=1)
    assert fall_back(autumn, autumn, ZoneInfo("UTC")) == dt.timedelta(0)


@pytest.mark.parametrize("which", ["lite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_integer_cursor(which: str, request: pytest.FixtureRequest) -> None:
    """A version column works as the cursor; NULL versions wait for --full."""
    rig: Rig = request.getfixturevalue(which)
    rig.create()
    rig.mapping(cursor="version")
    rig.insert(3)
    rig.sql("UPDATE items SET version = NULL WHERE id = 'k0002'")
    rig.sync()
    assert sorted(rig.sent()) == ["k0000", "k0001"]
    assert rig.watermark() == 1
    rig.sql("UPDATE items SET name = 'bumped', version = 2 WHERE id = 'k0000'")
    rig.sync()
    assert rig.sent() == ["k0000"]
    rig.sync(full=True)
    assert rig.sent() == ["k0002"]


@pytest.mark.postgres
def test_null_cursors_are_only_sent_by_full_and_backfill_and_are_counted(
    pg: Rig, tmp_path: Path
) -> None:
    """Incremental sync never sees NULL cursors; diff and validate count them."""
    pg.create()
    pg.mapping()
    pg.insert(3)
    pg.sql("UPDATE items SET updated_at = NULL WHERE id IN ('k0001', 'k0002')")
    pg.sync()
    assert pg.sent() == ["k0000"]
    env = {
        "ETL_SOURCE_URL": pg.url,
        "ETL_STATE_URL": pg.state_url,
        "ETL_MAPPINGS": str(tmp_path / "mappings"),
    }
    checked = run_cli(["validate", "--check-source"], env)
    assert checked.exit_code == 0
    assert "2 row(s) have a NULL updated_at" in checked.output
    diff = run_cli(["diff", "--format", "json"], env)
    assert json.loads(diff.stdout)["streams"][0]["counts"]["null_cursor"] == 2
    pg.sync(full=True)
    assert sorted(pg.sent()) == ["k0001", "k0002"]
    pg.sql(
        "INSERT INTO items (id, account, email, name, created_at) "
        "VALUES ('k9', 'a', 'e@x.io', 'n', now())"
    )
    api.backfill(
        source_url=pg.url,
        state_url=pg.state_url,
        mappings_dir=pg.tmp / "mappings",
        endpoint=pg.receiver.url,
        token=TOKEN,
        api_key="k",
        workspace_key="w",
    )
    assert pg.sent() == ["k9"]


def test_a_changed_mapping_makes_the_next_sync_a_full_diff(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new trait reaches rows that did not change, because the mapping did."""
    rig.create()
    rig.mapping()
    rig.insert(3)
    rig.sync()
    rig.sent()
    path = rig.tmp / "mappings" / "items.yml"
    path.write_text(path.read_text() + "  plan: {const: pro}\n")
    rig.sync()
    events = rig.receiver.events()[-3:]
    assert sorted(rig.sent()) == ["k0000", "k0001", "k0002"]
    assert all(e["traits"]["plan"] == "pro" for e in events)


@pytest.mark.parametrize("which", ["lite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_duplicate_keys_from_a_query_are_invalid_and_sent_once(
    which: str, request: pytest.FixtureRequest
) -> None:
    """A join that repeats a key yields one send and one invalid record, not two sends."""
    rig: Rig = request.getfixturevalue(which)
    rig.create()
    rig.insert(3)
    (rig.tmp / "mappings" / "items.yml").write_text(
        MAPPING.format(cursor="updated_at", lookback="0s", timezone="UTC").replace(
            "source: {table: items}",
            "source:\n  query: SELECT * FROM items UNION ALL "
            "SELECT * FROM items WHERE id = 'k0001'",
        )
    )
    report = rig.sync()
    assert sorted(rig.sent()) == ["k0000", "k0001", "k0002"]
    (stream,) = report.streams
    assert stream.invalid == 1
    assert stream.invalid_records[0][0] == "k0001"
    assert "duplicate key" in stream.invalid_records[0][1]


@pytest.mark.postgres
def test_postgresql_as_the_state_store(pg: Rig, pg_url: str) -> None:
    """State in PostgreSQL: the second sync sends nothing, and runs are recorded."""
    pg.state_url = pg_url
    pg.create()
    pg.mapping(lookback="1h")
    pg.insert(4)
    pg.sync()
    assert len(pg.sent()) == 4
    assert pg.sync().streams[0].unchanged == 4
    assert pg.sent() == []
    store = StateStore(pg_url, readonly=True)
    try:
        assert [r.status for r in store.runs()] == ["ok", "ok"]
    finally:
        store.close()


def test_diff_full_lists_keys_gone_from_the_source(rig: Rig, tmp_path: Path) -> None:
    """Keys sent before and deleted since are listed as gone, for information."""
    rig.create()
    rig.mapping()
    rig.insert(3)
    rig.sync()
    rig.sql("DELETE FROM items WHERE id = 'k0001'")
    env = {
        "ETL_SOURCE_URL": rig.url,
        "ETL_STATE_URL": rig.state_url,
        "ETL_MAPPINGS": str(tmp_path / "mappings"),
    }
    result = run_cli(["diff", "--full", "--format", "json"], env)
    stream = json.loads(result.stdout)["streams"][0]
    assert stream["counts"]["gone"] == 1
    assert [r["key"] for r in stream["records"] if r["kind"] == "gone"] == ["k0001"]


@pytest.mark.postgres
def test_without_privilege_to_see_other_sessions_it_says_so_and_relies_on_lookback(
    pg: Rig,
) -> None:
    """A role that cannot read other sessions' pg_stat_activity rows gets a note, not a crash."""
    pg.create()
    pg.mapping()
    pg.insert(1)
    role = f"etl_ro_{pg.url.rsplit('_', 1)[-1]}"
    database = pg.engine.url.database
    pg.sql(f'CREATE ROLE "{role}" LOGIN')
    pg.sql(f'GRANT SELECT ON items TO "{role}"')
    restricted = sa.create_engine(pg.engine.url.set(username=role))
    try:
        with pg.engine.connect() as other:
            other.execute(sa.text("SELECT txid_current()"))  # a transaction left open
            mapping = load_mappings(pg.tmp / "mappings")[0]
            with restricted.connect() as conn, extract.read_only(conn):
                src = extract.source_from(conn, mapping)
                horizon = safe_horizon(conn, mapping, src)
            other.rollback()
    finally:
        restricted.dispose()
        pg.sql(f'REVOKE ALL ON items FROM "{role}"')
        with pg.engine.connect() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.commit()
        pg.sql(f'DROP ROLE "{role}"')
    assert database
    assert horizon.held_by_transaction is None
    assert horizon.value == horizon.clock
    assert any("not visible to this role" in note for note in horizon.notes)
    assert any("pg_read_all_stats" in note for note in horizon.notes)
