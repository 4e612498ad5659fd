"""The state store on SQLite and PostgreSQL: lossless watermarks, per-batch commits,
rejects, runs, the lock, and stores that are not ours."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.errors import LockedError, StateError
from etl.state.store import LastSent, Rejected, Sent, StateStore, decode_watermark, encode_watermark

UTC = dt.UTC


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A fresh state store, SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = StateStore(url)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        dt.datetime(2024, 3, 1, 12, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        2**62,
        0,
    ],
)
def test_watermarks_round_trip_without_loss(value: dt.datetime | int) -> None:
    """Microseconds, offsets and big integers survive encoding exactly."""
    text, kind = encode_watermark(value)
    decoded = decode_watermark(text, kind)
    assert decoded == value
    assert type(decoded) is type(value)
    if isinstance(value, dt.datetime):
        assert decoded.utcoffset() == value.utcoffset()  # type: ignore[union-attr]


def test_watermark_and_fingerprint_are_saved_per_stream(store: StateStore) -> None:
    """A saved watermark comes back exactly; the checkpoint is cleared with it."""
    store.save_checkpoint("users", ["k100"])
    assert store.stream("users").checkpoint == ["k100"]  # type: ignore[union-attr]
    mark = dt.datetime(2024, 3, 1, 12, 0, 0, 999999, tzinfo=UTC)
    store.save_watermark("users", mark, "fp1")
    state = store.stream("users")
    assert state is not None
    assert (state.watermark, state.fingerprint, state.checkpoint) == (mark, "fp1", None)
    assert store.stream("workspaces") is None


def test_the_summary_reads_back_decoded_values(store: StateStore) -> None:
    """`summary()` gives each stream's watermark and checkpoint decoded, with its counts."""
    mark = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    store.save_watermark("users", mark, "fp1")
    store.save_checkpoint("users", ["k100", 7])
    store.commit_batch("users", [Sent("k1", "h", b"{}", "e1")], [Rejected("k2", ["k2"], "e2", "m")])
    (users,) = store.summary()
    assert (users.stream, users.watermark, users.checkpoint) == ("users", mark, ["k100", 7])
    assert (users.records, users.rejected) == (1, 1)
    assert users.updated_at is not None
    assert users.updated_at.tzinfo is not None


def test_a_batch_is_committed_and_looked_up_by_page(store: StateStore) -> None:
    """Acknowledged records are found by key with their hash and event id (and payload
    on request)."""
    sent = [Sent(f"k{i}", f"h{i}", b'{"traits":{}}', f"e{i}") for i in range(3)]
    store.commit_batch("users", sent)
    assert store.last_sent("users", ["k0", "k2", "nope"]) == {
        "k0": LastSent("h0", event_id="e0"),
        "k2": LastSent("h2", event_id="e2"),
    }
    assert store.last_sent("users", ["k1"], with_payload=True)["k1"].payload == b'{"traits":{}}'
    assert store.last_sent("workspaces", ["k0"]) == {}
    store.commit_batch("users", [Sent("k0", "h0b", b"{}", "e0b")])
    assert store.last_sent("users", ["k0"])["k0"].hash == "h0b"
    assert sorted(store.sent_keys("users")) == ["k0", "k1", "k2"]


def committed_in_the_file(path: Path) -> int:
    """Records in the SQLite file itself, not counting what is still in its WAL."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM etl_records").fetchone()[0])
    finally:
        conn.close()


def test_committed_batches_are_copied_back_from_the_wal_while_the_store_is_open(
    tmp_path: Path,
) -> None:
    """A SQLite store checkpoints each committed batch on its own thread: the records
    reach the database file before the store is closed (a close then has little to
    copy back)."""
    path = tmp_path / "state.db"
    store = StateStore(f"sqlite:///{path}")
    try:
        store.commit_batch("users", [Sent(f"k{i}", "h", b"{}", "e") for i in range(300)])
        assert store._checkpointer is not None
        store._checkpointer.settle()
        assert committed_in_the_file(path) == 300
    finally:
        store.close()
    assert committed_in_the_file(path) == 300


def test_a_forked_process_opens_and_writes_the_store_while_its_checkpoints_run(
    tmp_path: Path,
) -> None:
    """A process forked while the parent's checkpoint thread runs (`--workers`)
    opens the same store, commits and closes it; the parent reads its records."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    try:
        for batch in range(5):
            store.commit_batch("users", [Sent(f"p{batch}-{i}", "h", b"{}", "e") for i in range(50)])
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                child = StateStore(url)
                child.commit_batch("users", [Sent(f"c{i}", "h", b"{}", "e") for i in range(50)])
                child.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(store.last_sent("users", [f"c{i}" for i in range(50)])) == 50
    finally:
        store.close()


def test_rejects_are_kept_counted_and_cleared_on_success(store: StateStore) -> None:
    """A refused record stays in the ledger with its message until it is delivered."""
    store.commit_batch("users", [], [Rejected("k1", ["k1"], "e1", "HTTP 400: bad email")])
    store.commit_batch("users", [], [Rejected("k1", ["k1"], "e1", "HTTP 400: still bad")])
    (row,) = store.rejected("users")
    assert (row.key, row.key_values, row.attempts) == ("k1", ("k1",), 2)
    assert row.message == "HTTP 400: still bad"
    assert store.summary()[0].rejected == 1
    store.commit_batch("users", [Sent("k1", "h", b"{}", "e1")])
    assert store.rejected("users") == []


def test_runs_are_recorded(store: StateStore) -> None:
    """A run is `running` until finished with its status and per-stream counts."""
    run_id = store.start_run("sync", "incremental")
    assert store.runs()[0].status == "running"
    store.finish_run(run_id, status="partial", streams=[{"stream": "users", "sent": 3}], error=None)
    (run,) = store.runs()
    assert (run.status, run.streams) == ("partial", [{"stream": "users", "sent": 3}])
    assert run.finished_at is not None
    assert run.finished_at >= run.started_at


def test_reset_forgets_one_stream(store: StateStore) -> None:
    """Reset drops a stream's records, rejects and watermark, and no other stream's."""
    store.commit_batch("users", [Sent("k", "h", b"{}", "e")])
    store.commit_batch("workspaces", [Sent("w", "h", b"{}", "e")])
    store.save_watermark("users", 5, "fp")
    assert store.reset("users") == 1
    assert store.stream("users") is None
    assert list(store.sent_keys("workspaces")) == ["w"]


def test_the_lock_admits_one_run_and_names_the_holder(store: StateStore) -> None:
    """A second store on the same database cannot lock it, and is told who holds it."""
    store.acquire("sync")
    other = StateStore(store.url)
    try:
        with pytest.raises(LockedError) as caught:
            other.acquire("backfill")
        assert f"pid {os.getpid()}" in str(caught.value)
        assert "sync" in str(caught.value)
        store.release()
        other.acquire("backfill")  # free again once released
    finally:
        other.close()


def test_sqlite_state_is_private(tmp_path: Path) -> None:
    """The SQLite file is created owner-only: it holds PII."""
    path = tmp_path / "sub" / "state.db"
    StateStore(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_read_only_open_of_a_missing_store_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    """`etl diff` against no state at all reads it as empty and writes no file."""
    path = tmp_path / "missing.db"
    s = StateStore(f"sqlite:///{path}", readonly=True)
    assert s.stream("users") is None
    assert s.last_sent("users", ["k"]) == {}
    assert s.runs() == []
    s.close()
    assert not path.exists()


def test_a_store_from_a_newer_etl_is_refused(tmp_path: Path) -> None:
    """A schema version above ours is an error that says to upgrade."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE etl_meta SET value = '99' WHERE name = 'schema_version'"))
    engine.dispose()
    with pytest.raises(StateError, match="newer etl"):
        StateStore(url)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    """A corrupted state file gives a clear error, not a traceback."""
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open it"):
        StateStore(f"sqlite:///{path}")


def test_an_unsupported_state_database_is_refused() -> None:
    """MySQL is a source, not a state store: the message says which to use."""
    with pytest.raises(StateError, match="unsupported database"):
        StateStore("mysql+pymysql://root@127.0.0.1/test")


def test_a_store_from_schema_1_is_migrated_in_place(tmp_path: Path) -> None:
    """A state file written before row digests existed gains the column and keeps its data."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE etl_meta (name VARCHAR(64) PRIMARY KEY, value TEXT)")
        conn.exec_driver_sql("INSERT INTO etl_meta VALUES ('schema_version', '1')")
        conn.exec_driver_sql(
            "CREATE TABLE etl_records (stream VARCHAR(200), key TEXT, hash VARCHAR(32), "
            "payload TEXT, event_id VARCHAR(36), sent_at DATETIME, PRIMARY KEY (stream, key))"
        )
        conn.exec_driver_sql(
            "INSERT INTO etl_records VALUES "
            "('users', 'k1', 'h1', '{}', 'e1', '2024-01-01 00:00:00')"
        )
    engine.dispose()
    store = StateStore(url)
    try:
        assert store.last_sent("users", ["k1"]) == {"k1": LastSent("h1", None, None, "e1")}
        store.commit_batch("users", [Sent("k2", "h2", b"{}", "e2", "src2")])
        assert store.last_sent("users", ["k2"])["k2"].source == "src2"
    finally:
        store.close()


def test_a_store_from_before_schema_5_gains_full_reads_related_watermarks_and_invalid_records(
    tmp_path: Path,
) -> None:
    """Schema 5 (SPEC §9) migrates in place: a stream keeps its watermark and gains the
    full-read clock and related watermarks; a pending reject stays a reject next to
    remembered invalid records."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE etl_meta (name VARCHAR(64) PRIMARY KEY, value TEXT)")
        conn.exec_driver_sql("INSERT INTO etl_meta VALUES ('schema_version', '2')")
        conn.exec_driver_sql(
            "CREATE TABLE etl_streams (stream VARCHAR(200) PRIMARY KEY, watermark TEXT, "
            "watermark_kind VARCHAR(16), fingerprint VARCHAR(64), checkpoint TEXT, "
            "updated_at DATETIME)"
        )
        conn.exec_driver_sql(
            "INSERT INTO etl_streams VALUES ('users', '7', 'integer', 'fp', NULL, NULL)"
        )
        conn.exec_driver_sql(
            "CREATE TABLE etl_rejects (stream VARCHAR(200), key TEXT, key_values TEXT, "
            "event_id VARCHAR(36), message TEXT, first_seen DATETIME, last_seen DATETIME, "
            "attempts INTEGER, PRIMARY KEY (stream, key))"
        )
        conn.exec_driver_sql(
            "INSERT INTO etl_rejects VALUES ('users', 'k1', '[\"k1\"]', 'e1', 'refused', "
            "'2024-01-01 00:00:00', '2024-01-01 00:00:00', 1)"
        )
    engine.dispose()
    store = StateStore(url)
    try:
        before = store.stream("users")
        assert before is not None
        assert (before.watermark, before.full_read_at, before.related) == (7, None, {})
        store.commit_batch(
            "users", [], [Rejected("k2", ["k2"], "", "name is only whitespace", kind="invalid")]
        )
        store.save_watermark("users", 9, "fp", related={"m(user_id)@u": 5}, full_read=True)
        after = store.stream("users")
        assert after is not None
        assert after.related == {"m(user_id)@u": 5}
        assert after.full_read_at is not None
        assert after.first_run_at is not None
        assert [(r.key, r.kind) for r in store.rejected()] == [
            ("k1", "rejected"),
            ("k2", "invalid"),
        ]
        (summary,) = store.summary()
        assert (summary.rejected, summary.invalid) == (1, 1)
        assert summary.last_full_read == after.full_read_at
    finally:
        store.close()
