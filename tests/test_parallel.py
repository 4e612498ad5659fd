"""`--workers N`: a full read split between worker processes delivers exactly what
one process would, resumes each part after a stop, and fails as its workers fail."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import pickle
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, copy_mappings, etl_process, run_cli, seed

from etl import api
from etl.errors import EtlError, FatalApiError, QueryError, StateError
from etl.model import Shard
from etl.receiver.faults import FaultPlan
from etl.receiver.server import start_receiver
from etl.run import parallel
from etl.state.store import StateStore

N_USERS = 1200
SOURCES = [
    pytest.param("sqlite_url", id="sqlite"),
    pytest.param("pg_url", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", id="mariadb", marks=pytest.mark.mariadb),
]


def log_events(text: str, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def by_key(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (event type, key)'s event, with the fields that must match."""
    out = {}
    for e in events:
        key = e["user_id"] if e["event_type"] == "user_identify" else e["account_id"]
        out[(e["event_type"], key)] = {"event_id": e["event_id"], "traits": e["traits"]}
    return out


def library_args(source: str, state: str, mappings: Path, endpoint: str, **kw: Any) -> Any:
    """The keyword arguments of api.sync/api.backfill for one test run."""
    return {
        "source_url": source,
        "state_url": state,
        "mappings_dir": mappings,
        "endpoint": endpoint,
        "token": TOKEN,
        "api_key": "k",
        "workspace_key": "w",
        **kw,
    }


def part_rows(state_url: str) -> list[str]:
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT stream FROM etl_streams WHERE stream LIKE '%~%'")
            return [r[0] for r in conn.execute(query)]
    finally:
        engine.dispose()


def test_parts_split_a_share_into_disjoint_shards() -> None:
    """Part p of P of the run's shard I/N is bucket ≡ I + N·p (mod N·P): the parts
    of a share cover exactly its keys, each key once."""
    keys = [f"key-{i}" for i in range(4000)]
    for base in (None, Shard(1, 3)):
        for parts in (2, 3):
            owners = [
                [p for p in range(parts) if parallel.part_shard(base, p, parts).owns(k)]
                for k in keys
            ]
            share = [k for k in keys if base is None or base.owns(k)]
            assert sum(len(o) for o in owners) == len(share)
            assert all(len(o) == 1 for k, o in zip(keys, owners, strict=True) if k in share)
            assert all(o for o in owners if o)  # every part has keys
            assert {p for o in owners for p in o} == set(range(parts))
    assert parallel.part_shard(None, 1, 2) == Shard(1, 2)
    assert parallel.part_shard(Shard(2, 3), 1, 2) == Shard(5, 6)


@pytest.mark.parametrize("source", SOURCES)
def test_workers_deliver_what_one_process_delivers(
    source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A backfill by 3 workers sends the same events (same event ids, same traits)
    and records the same state (a SQLite file, or PostgreSQL) as one process; then
    `sync --full` by 3 workers finds nothing changed and sends nothing."""
    url = request.getfixturevalue(source)
    seed(url, n_workspaces=12, n_users=N_USERS)
    mappings = copy_mappings(tmp_path / "mappings", dialect=sa.make_url(url).get_backend_name())
    delivered = {}
    reports = {}
    for workers in (1, 3):
        state_url = f"sqlite:///{tmp_path / f'state-{workers}.db'}"
        if workers > 1 and source == "pg_url":  # the workers share a PostgreSQL store too
            state_url = request.getfixturevalue("pg_state")
        with start_receiver(store=tmp_path / f"rx-{workers}.db", tokens={TOKEN}) as rx:
            common = library_args(url, state_url, mappings, rx.url, workers=workers)
            reports[workers] = api.backfill(**common)
            delivered[workers] = rx.events()
            again = api.sync(full=True, **common)
            assert [s.unchanged for s in again.streams] == [s.read for s in again.streams]
            assert len(rx.events()) == len(delivered[workers])
            assert part_rows(state_url) == []
        store = StateStore(state_url, readonly=True)
        try:
            assert {s.stream: s.records for s in store.summary()} == {
                "users": N_USERS,
                "workspaces": 12,
            }
        finally:
            store.close()
    assert len(delivered[3]) == len(delivered[1]) == N_USERS + 12
    assert by_key(delivered[3]) == by_key(delivered[1])
    one, three = reports[1], reports[3]
    assert [s.counts() for s in three.streams] == [s.counts() for s in one.streams]
    assert all(s.full_read for s in three.streams)


def test_each_worker_reads_its_own_share(tmp_path: Path, sqlite_url: str, receiver: Any) -> None:
    """`stream.parts` says how many rows each worker read: about a third each, summing
    to the table — and a shard's workers split only that shard's share."""
    seed(sqlite_url, n_workspaces=5, n_users=N_USERS)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url, ETL_WORKERS="3")
    result = run_cli(["backfill", "--stream", "users"], env)
    assert result.exit_code == 0, result.stderr
    (parts,) = log_events(result.stderr, "stream.parts")
    assert parts["workers"] == 3
    assert sum(parts["read"]) == N_USERS
    assert all(N_USERS / 6 < n < N_USERS / 2 for n in parts["read"])
    assert log_events(result.stderr, "stream.parallel")[0]["workers"] == 3

    env["ETL_STATE_URL"] = f"sqlite:///{tmp_path / 'shard.db'}"
    sharded = run_cli(["backfill", "--stream", "users", "--shard", "1/2", "--workers", "2"], env)
    assert sharded.exit_code == 0, sharded.stderr
    (parts,) = log_events(sharded.stderr, "stream.parts")
    share = sum(1 for k in range(N_USERS) if Shard(1, 2).owns(_user_key(k)))
    assert sum(parts["read"]) == share


def _user_key(i: int) -> str:
    from support import user_id

    return user_id(i)


def test_a_failing_worker_fails_the_run_with_its_own_error(tmp_path: Path, sqlite_url: str) -> None:
    """A token the API refuses: every worker stops at once with FatalApiError, and the
    run raises that (exit 1 from the CLI), not a generic error; no watermark is saved."""
    seed(sqlite_url, n_workspaces=3, n_users=300)
    mappings = copy_mappings(tmp_path / "mappings")
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    with (
        start_receiver(store=tmp_path / "rx.db", tokens={"another-token"}) as rx,
        pytest.raises(FatalApiError, match=r"401|token"),
    ):
        api.backfill(**library_args(sqlite_url, state_url, mappings, rx.url, workers=2))
    store = StateStore(state_url, readonly=True)
    try:
        assert all(s.watermark is None for s in store.summary())
    finally:
        store.close()


def test_a_worker_that_dies_fails_the_run(
    tmp_path: Path, sqlite_url: str, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed before it reports (kill -9, OOM): the run fails naming it and
    saves no watermark; the next run delivers everything."""
    seed(sqlite_url, n_workspaces=3, n_users=300)
    mappings = copy_mappings(tmp_path / "mappings")
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    common = library_args(sqlite_url, state_url, mappings, receiver.url, workers=2)
    # the workers are forked from this process: they inherit the patch
    monkeypatch.setattr(parallel, "peak_rss_mb", lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(EtlError, match=r"ended without a report \(killed by signal 9\)"):
        api.backfill(**common)
    monkeypatch.undo()
    store = StateStore(state_url, readonly=True)
    try:
        assert all(s.watermark is None for s in store.summary())
    finally:
        store.close()
    report = api.backfill(**common)
    assert report.status == "ok"
    users = {e["user_id"] for e in receiver.events() if e["event_type"] == "user_identify"}
    assert len(users) == 300


def part_checkpoints(state: Path) -> dict[str, list[Any]]:
    if not state.exists():
        return {}
    conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT stream, checkpoint FROM etl_streams WHERE stream LIKE 'users~part%'"
        ).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    return {name: json.loads(cp) for name, cp in rows if cp}


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_a_stopped_parallel_backfill_resumes_each_part(
    how: signal.Signals, tmp_path: Path, sqlite_url: str
) -> None:
    """Stopped (SIGINT: after in-flight batches) or killed (-9: the workers die with
    the parent) once both parts saved a checkpoint: the re-run resumes each part
    after its own checkpoint, delivers every user, re-sends at most the batches that
    were in flight, and drops the part checkpoints when done."""
    n_users = 1500
    seed(sqlite_url, n_workspaces=5, n_users=n_users)
    copy_mappings(tmp_path / "mappings")
    plan = FaultPlan.from_json('{"latency_ms": [15, 15]}')
    state = tmp_path / "state.db"
    with start_receiver(store=tmp_path / "rx.db", tokens={TOKEN}, faults=plan) as rx:
        env = cli_env(
            tmp_path, sqlite_url, rx.url, ETL_BATCH_SIZE="25", ETL_PAGE_SIZE="100", ETL_WORKERS="2"
        )
        proc = etl_process(["backfill", "--stream", "users"], env, tmp_path, "first")
        try:
            deadline = time.monotonic() + 30
            while len(part_checkpoints(state)) < 2:
                assert proc.poll() is None, "the backfill ended before both parts checkpointed"
                assert time.monotonic() < deadline, "no part checkpoints within 30 s"
                time.sleep(0.02)
            proc.send_signal(how)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == (1 if how == signal.SIGINT else -signal.SIGKILL)
        time.sleep(0.2)  # a killed parent's workers are killed by the kernel
        saved = part_checkpoints(state)
        assert set(saved) == {"users~part0of2", "users~part1of2"}
        sent_before = len(rx.events())
        assert sent_before < n_users

        second = etl_process(["backfill", "--stream", "users"], env, tmp_path, "second")
        assert second.wait(timeout=60) == 0, (tmp_path / "second.err").read_text()
        err = (tmp_path / "second.err").read_text()
        resumed = sorted(e["after"] for e in log_events(err, "backfill.resume"))
        assert resumed == sorted(saved.values())
        (parts,) = log_events(err, "stream.parts")
        assert sum(parts["read"]) < n_users  # acknowledged pages are not read again
        counts = collections.Counter(e["user_id"] for e in rx.events())
        assert len(counts) == n_users
        assert sum(c - 1 for c in counts.values()) <= 2 * 2 * 25  # in flight, per worker
    assert part_checkpoints(state) == {}
    assert part_rows(f"sqlite:///{state}") == []


def test_worker_errors_cross_the_pipe_as_they_were() -> None:
    """An EtlError keeps its class, message and attributes through the pipe (QueryError
    takes keyword-only arguments, which plain pickling would lose); a bug becomes an
    EtlError with the worker's traceback."""
    error = QueryError("boom", mapping_path="m.yml", stream="users", detail="no such table")
    carried = pickle.loads(pickle.dumps(parallel._portable(error)))  # noqa: S301 - our own bytes
    again = parallel._rebuilt(*carried)
    assert type(again) is QueryError
    assert str(again) == "boom"
    assert (again.mapping_path, again.stream, again.detail) == ("m.yml", "users", "no such table")
    try:
        {}["missing"]
    except KeyError as exc:
        bug = parallel._rebuilt(*parallel._portable(exc))
    assert type(bug) is EtlError
    assert "KeyError" in str(bug)
    assert "Traceback" in str(bug)


def test_workers_option_is_checked(tmp_path: Path, sqlite_url: str, receiver: Any) -> None:
    seed(sqlite_url, n_workspaces=2, n_users=5)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    result = run_cli(["backfill", "--workers", "0"], env)
    assert result.exit_code == 2
    assert "--workers" in result.stderr
    # a dry run never forks: it collects one report
    diff = run_cli(["sync", "--dry-run", "--full", "--workers", "2"], env)
    assert diff.exit_code == 0
    assert log_events(diff.stderr, "stream.parallel") == []


CODES = """\
stream: codes
event_type: user_identify
source: {table: codes}
key: code
cursor: updated_at
user_id: code
account_id: account
traits:
  email: email
  name: email
  created_at: {column: updated_at, type: datetime}
on_gone:
  traits: {deleted: true}
"""


@pytest.mark.postgres
def test_a_key_the_database_spells_otherwise_is_never_split_or_sharded(
    tmp_path: Path, pg_url: str, receiver: Any
) -> None:
    """A char(n) key: PostgreSQL hashes the trimmed text, its driver returns the padded
    one, so SQL and Python disagree on the part a key is in. Workers would call live
    records gone; such a stream is read in one process (a warning says why), and
    `--shard` refuses it with the fix (exit 2)."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE codes (code char(8) PRIMARY KEY, account text, email text, "
                    "updated_at timestamptz DEFAULT now())"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO codes (code, account, email) SELECT 'c' || g, 'a', "
                    "'c' || g || '@example.com' FROM generate_series(1, 300) g"
                )
            )
    finally:
        engine.dispose()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "codes.yml").write_text(CODES)
    env = cli_env(tmp_path, pg_url, receiver.url, ETL_WORKERS="2")
    first = run_cli(["backfill"], env)
    assert first.exit_code == 0, first.stderr
    (skipped,) = log_events(first.stderr, "stream.parallel_skipped")
    assert "char(n)" in skipped["reason"]
    again = run_cli(["sync", "--full"], env)
    assert again.exit_code == 0, again.stderr
    (done,) = log_events(again.stderr, "stream.done")
    assert (done["read"], done["unchanged"], done["gone"], done["sent"]) == (300, 300, 0, 0)
    assert len(receiver.events()) == 300

    sharded = run_cli(["sync", "--full", "--shard", "0/2", "--workers", "1"], env)
    assert sharded.exit_code == 2
    assert "hashed differently" in sharded.stderr
    assert "CAST(TRIM(code) AS TEXT)" in sharded.stderr


def test_part_checkpoints_end_with_any_full_read_and_with_reset(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """Part checkpoints left by a stopped parallel backfill are spent once the stream
    is read to its end by any run (here a one-process `sync --full`): a later backfill
    starts over rather than resume from them. `state reset` forgets a stream's shard
    states and their parts too."""
    seed(sqlite_url, n_workspaces=3, n_users=50)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    state_url = env["ETL_STATE_URL"]
    store = StateStore(state_url)
    try:
        for name in ("users~part0of2", "users#0/2", "users#0/2~part1of2", "workspaces~part0of2"):
            store.save_checkpoint(name, ["u-0"])
    finally:
        store.close()
    assert run_cli(["sync", "--full", "--workers", "1", "--stream", "users"], env).exit_code == 0
    assert sorted(part_rows(state_url)) == ["users#0/2~part1of2", "workspaces~part0of2"]
    backfill = run_cli(["backfill", "--workers", "2", "--stream", "users"], env)
    assert backfill.exit_code == 0, backfill.stderr
    assert log_events(backfill.stderr, "backfill.resume") == []
    reset = run_cli(["state", "reset", "--stream", "users"], env)
    assert reset.exit_code == 0, reset.stderr
    assert part_rows(state_url) == ["workspaces~part0of2"]
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            names = [r[0] for r in conn.execute(sa.text("SELECT stream FROM etl_streams"))]
    finally:
        engine.dispose()
    assert not [n for n in names if n.startswith("users")]


@pytest.mark.postgres
def test_workers_are_killed_when_the_run_lock_is_lost(
    tmp_path: Path, sqlite_url: str, pg_state: str
) -> None:
    """A PostgreSQL store's lock lives on the parent's session: when that session is
    terminated (a failover, an idle timeout), the workers stop writing at once and
    the run fails with the lock-lost error; nothing is written without the lock."""
    seed(sqlite_url, n_workspaces=3, n_users=4000)
    mappings = copy_mappings(tmp_path / "mappings")
    plan = FaultPlan.from_json('{"latency_ms": [50, 50]}')  # ~800 events/s: ~5 s in all
    state_db = sa.make_url(pg_state).database
    killed: list[int] = []

    def kill_lock_session(_stream: str, done: int, _total: int | None) -> None:
        if done >= 200 and not killed:
            engine = sa.create_engine(pg_state)
            try:
                with engine.begin() as conn:
                    pids = conn.execute(
                        sa.text(
                            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                            "WHERE l.locktype = 'advisory' AND a.datname = :db"
                        ),
                        {"db": state_db},
                    ).scalars()
                    for pid in pids:
                        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                        killed.append(pid)
            finally:
                engine.dispose()

    with start_receiver(store=tmp_path / "rx.db", tokens={TOKEN}, faults=plan) as rx:
        with pytest.raises(StateError, match="session holding the run lock was lost"):
            api.backfill(
                **library_args(sqlite_url, pg_state, mappings, rx.url, workers=2, batch_size=10),
                streams=["users"],
                progress=kill_lock_session,
            )
        delivered = len(rx.events())
    assert killed
    assert delivered < 4000  # the workers were killed, not let run to the end


def test_a_bug_in_a_worker_never_shows_the_token() -> None:
    try:
        raise RuntimeError(f"GET http://127.0.0.1/api/v1/s2s/event?token={TOKEN} failed")
    except RuntimeError as exc:
        bug = parallel._rebuilt(*parallel._portable(exc))
    assert TOKEN not in str(bug)
    assert "token=***" in str(bug)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_resumed_backfill_keeps_the_watermark_of_its_first_pages(
    workers: int, tmp_path: Path, sqlite_url: str
) -> None:
    """A row changed between a stopped backfill and its resume, below the checkpoint
    (already delivered, not read again): the resumed backfill's watermark is the
    horizon the first pages were read under, so the next sync sends the change —
    not the resumed run's later horizon, past which (minus the lookback) the change
    would be neither re-read nor above the watermark."""
    from support import user_id, users

    n_users = 1500
    seed(sqlite_url, n_workspaces=5, n_users=n_users)
    copy_mappings(tmp_path / "mappings")
    users_yml = tmp_path / "mappings" / "users.yml"
    users_yml.write_text(
        users_yml.read_text().replace("cursor: updated_at", "cursor: updated_at\nlookback: 1s", 1)
    )
    plan = FaultPlan.from_json('{"latency_ms": [15, 15]}')
    state = tmp_path / "state.db"
    with start_receiver(store=tmp_path / "rx.db", tokens={TOKEN}, faults=plan) as rx:
        env = cli_env(
            tmp_path,
            sqlite_url,
            rx.url,
            ETL_BATCH_SIZE="25",
            ETL_PAGE_SIZE="100",
            ETL_WORKERS=str(workers),
        )
        proc = etl_process(["backfill", "--stream", "users"], env, tmp_path, "first")
        try:
            deadline = time.monotonic() + 30
            while not _checkpointed(state, workers):
                assert proc.poll() is None, "the backfill ended before its checkpoints"
                assert time.monotonic() < deadline, "no checkpoint within 30 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        engine = sa.create_engine(sqlite_url)
        try:
            with engine.begin() as conn:  # the smallest key: below every checkpoint
                conn.execute(
                    users.update()
                    .where(users.c.id == user_id(0))
                    .values(email="changed@example.com", updated_at=dt.datetime.now(dt.UTC))
                )
        finally:
            engine.dispose()
        time.sleep(1.5)  # past the lookback
        resumed = etl_process(["backfill", "--stream", "users"], env, tmp_path, "second")
        assert resumed.wait(timeout=60) == 0, (tmp_path / "second.err").read_text()
        assert log_events((tmp_path / "second.err").read_text(), "backfill.resume")
        sync = run_cli(["sync", "--stream", "users", "--workers", "1"], env)
        assert sync.exit_code == 0, sync.stderr
        emails = [e["traits"]["email"] for e in rx.events() if e["user_id"] == user_id(0)]
    assert emails[-1] == "changed@example.com"


def _checkpointed(state: Path, workers: int) -> bool:
    if workers > 1:
        return len(part_checkpoints(state)) == workers
    if not state.exists():
        return False
    conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT checkpoint FROM etl_streams WHERE stream = 'users'").fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return bool(row and row[0])
