"""`--shard I/N`: N workers sharing one PostgreSQL state store deliver exactly
what one worker would."""

from __future__ import annotations

import collections
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import TOKEN, copy_mappings, run_cli, seed, user_id, users

from etl import api
from etl.model import Shard
from etl.receiver.server import start_receiver
from etl.state.store import StateStore


def delivered(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The latest traits per (event type, key) a receiver holds."""
    out = {}
    for e in events:
        key = e["user_id"] if e["event_type"] == "user_identify" else e["account_id"]
        out[(e["event_type"], key)] = e["traits"]
    return out


def test_shards_partition_keys_stably() -> None:
    """Every key belongs to exactly one shard, the same one every time."""
    keys = [f"k{i}" for i in range(3000)]
    shards = [Shard(i, 3) for i in range(3)]
    owners = [[s.index for s in shards if s.owns(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    sizes = collections.Counter(o[0] for o in owners)
    assert min(sizes.values()) > 800  # roughly even
    assert Shard.parse("2/3") == Shard(2, 3)
    with pytest.raises(ValueError, match="between 0 and N-1"):
        Shard.parse("3/3")
    with pytest.raises(ValueError, match="I/N"):
        Shard.parse("one of three")


@pytest.mark.postgres
def test_three_concurrent_workers_deliver_what_one_worker_would(
    tmp_path: Path, pg_url: str
) -> None:
    """3 shards run at once on one source and one state; the union equals a single run."""
    seed(pg_url, n_workspaces=30, n_users=600)
    mappings = copy_mappings(tmp_path / "mappings")
    state_url = pg_url  # the shared PostgreSQL state store

    def run(endpoint: str, shard: str | None, state: str) -> Any:
        return api.sync(
            source_url=pg_url,
            state_url=state,
            mappings_dir=mappings,
            endpoint=endpoint,
            token=TOKEN,
            api_key="k",
            workspace_key="w",
            shard=shard,
            batch_size=50,
        )

    single_state = f"sqlite:///{tmp_path / 'single.db'}"
    with (
        start_receiver(store=tmp_path / "many.db", tokens={TOKEN}) as many,
        start_receiver(store=tmp_path / "one.db", tokens={TOKEN}) as one,
    ):
        for round_ in range(2):
            with ThreadPoolExecutor(3) as pool:
                reports = list(pool.map(lambda i: run(many.url, f"{i}/3", state_url), range(3)))
            run(one.url, None, single_state)
            assert all(r.status == "ok" for r in reports)
            sent_by_worker = [sum(s.sent for s in r.streams) for r in reports]
            assert all(n > 0 for n in sent_by_worker) or round_ == 1
            assert delivered(many.events()) == delivered(one.events())
            ids = collections.Counter(e["event_id"] for e in many.events())
            assert max(ids.values()) == 1  # no record sent twice
            engine = sa.create_engine(pg_url)
            with engine.begin() as conn:
                conn.execute(
                    users.update()
                    .where(users.c.id.in_([user_id(i) for i in range(0, 600, 7)]))
                    .values(role="owner", updated_at=sa.func.now())
                )
            engine.dispose()
        # the second round sent only the changed users, split across the workers
        assert len(many.events()) == len(one.events())

    store = StateStore(state_url, readonly=True)
    try:
        names = {s.stream for s in store.summary()}
    finally:
        store.close()
    assert {"users#0/3", "users#1/3", "users#2/3", "workspaces#0/3"} <= names


@pytest.mark.postgres
def test_one_lock_per_shard(tmp_path: Path, pg_url: str) -> None:
    """Two workers of the same shard exclude each other; different shards do not."""
    first = StateStore(pg_url)
    same = StateStore(pg_url)
    other = StateStore(pg_url)
    try:
        first.acquire("sync", shard=Shard(0, 2))
        other.acquire("sync", shard=Shard(1, 2))
        from etl.errors import LockedError

        with pytest.raises(LockedError, match="--shard 0/2"):
            same.acquire("sync", shard=Shard(0, 2))
    finally:
        for s in (first, same, other):
            s.close()


def test_a_bad_shard_is_a_usage_error(tmp_path: Path, sqlite_url: str, receiver: Any) -> None:
    """`--shard 3/3` exits 2 with the fix."""
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    from support import cli_env

    result = run_cli(["sync", "--shard", "3/3"], cli_env(tmp_path, sqlite_url, receiver.url))
    assert result.exit_code == 2
    assert "between 0 and N-1" in result.stderr


# ---------------------------------------------------------------- the shard predicate in SQL

INT_KEYS = [0, 1, 2, 7, 10, 99, 1000, 65_537, 2**31 - 1, -5]
BIGINT_KEYS = [2**31, 2**32 + 1, 2**40 + 3, 2**53 + 11, 2**62 + 5, -(2**40)]
TEXT_KEYS = [
    "a",
    "user-1",
    "0123456789abcdef01234567",
    "é",
    "Zoë Ångström",
    "日本語のキー",
    "emoji 🎉 key",
    "Ελληνικά",
    "naïve café",
    "x" * 60,
]
UUID_KEYS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"key-{i}")) for i in range(12)]
COMPOSITE_KEYS = [(i, t) for i in (1, 2, 300) for t in ("a", "é", "日本", "zz")]


def _key_tables(dialect: str) -> sa.MetaData:
    """One table per supported key type, in the dialect's own column types."""
    from sqlalchemy.dialects import mysql, postgresql

    text: Any = sa.String(100)
    if dialect == "mysql":
        text = mysql.VARCHAR(100, charset="utf8mb4")
    key_uuid: Any = sa.String(36)
    if dialect == "postgresql":
        key_uuid = postgresql.UUID(as_uuid=False)
    meta = sa.MetaData()
    for name, column in (
        ("k_int", sa.Integer),
        ("k_bigint", sa.BigInteger),
        ("k_text", text),
        ("k_uuid", key_uuid),
    ):
        sa.Table(name, meta, sa.Column("id", column, primary_key=True, autoincrement=False))
    sa.Table(
        "k_composite",
        meta,
        sa.Column("a", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("b", text, primary_key=True),
    )
    return meta


def _key_mapping(table: str, key: tuple[str, ...]) -> Any:
    from etl.model import Field, Mapping, Source

    column = Field(name="user_id", kind="column", value=key[0])
    return Mapping(
        stream=table,
        path=f"{table}.yml",
        event_type="user_identify",
        source=Source(table=table),
        key=key,
        cursor=None,
        user_id=column,
        account_id=column,
        traits=(),
    )


@pytest.mark.parametrize(
    "url_fixture",
    [
        "sqlite_url",
        pytest.param("pg_url", marks=pytest.mark.postgres),
        pytest.param("mariadb_url", marks=pytest.mark.mariadb),
    ],
)
def test_each_shard_query_reads_exactly_the_keys_python_says_it_owns(
    url_fixture: str, request: pytest.FixtureRequest
) -> None:
    """For int, bigint, text (non-ASCII too), uuid and composite keys, each of 3
    shard queries reads exactly the rows `Shard.owns_values` gives it."""
    from etl.run.transform import record_key
    from etl.source import extract

    url = request.getfixturevalue(url_fixture)
    engine = sa.create_engine(url)
    meta = _key_tables(engine.dialect.name)
    meta.create_all(engine)
    data = {
        "k_int": [{"id": k} for k in INT_KEYS],
        "k_bigint": [{"id": k} for k in BIGINT_KEYS],
        "k_text": [{"id": k} for k in TEXT_KEYS],
        "k_uuid": [{"id": k} for k in UUID_KEYS],
        "k_composite": [{"a": a, "b": b} for a, b in COMPOSITE_KEYS],
    }
    with engine.begin() as conn:
        for table, rows in data.items():
            conn.execute(meta.tables[table].insert(), rows)
    shards = [Shard(i, 3) for i in range(3)]
    try:
        for table, rows in data.items():
            key = ("a", "b") if table == "k_composite" else ("id",)
            mapping = _key_mapping(table, key)
            expected = {tuple(str(v) for v in r.values()) for r in rows}
            seen: list[tuple[str, ...]] = []
            for shard in shards:
                with engine.connect() as conn, extract.read_only(conn):
                    src = extract.source_from(conn, mapping)
                    pages = extract.read_pages(
                        conn, mapping, src, order="key", page_size=4, shard=shard
                    )
                    read = [row[: len(key)] for page in pages for row in page]
                assert all(shard.owns_values(values) for values in read), (table, shard)
                # the Python side agrees from the stored record key too
                composite = len(key) > 1
                assert all(shard.owns(record_key(v), composite=composite) for v in read)
                seen.extend(tuple(str(v) for v in values) for values in read)
            assert sorted(seen) == sorted(expected), table  # every key once, in one shard
            sizes = {s.index for s in shards for v in seen if s.owns_values(v)}
            assert len(sizes) > 1 or len(rows) < 6  # a real split, not all in one
    finally:
        engine.dispose()


def test_rows_with_a_null_key_belong_to_shard_zero(sqlite_url: str) -> None:
    """A row whose key is NULL is read by shard 0 only, and Python agrees."""
    from etl.source import extract

    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id TEXT)")
        conn.exec_driver_sql("INSERT INTO t VALUES ('a'), (NULL), ('b')")
    mapping = _key_mapping("t", ("id",))
    read = {}
    for shard in (Shard(0, 2), Shard(1, 2)):
        with engine.connect() as conn, extract.read_only(conn):
            src = extract.source_from(conn, mapping)
            pages = extract.read_pages(conn, mapping, src, order="key", shard=shard)
            read[shard.index] = [row[0] for page in pages for row in page]
    engine.dispose()
    assert None in read[0]
    assert None not in read[1]
    assert Shard(0, 2).owns_values((None,))
    assert not Shard(1, 2).owns_values((None,))
    assert sorted(k for k in read[0] + read[1] if k) == ["a", "b"]


def test_shard_buckets_match_an_md5_of_the_key_text() -> None:
    """The Python hash is the first 4 bytes of MD5 of the UTF-8 key text (what
    PostgreSQL and MariaDB compute), composite parts joined by U+001F."""
    from etl.model import shard_bucket

    digest = hashlib.md5(b"abc", usedforsecurity=False).hexdigest()
    assert shard_bucket("abc") == int(digest[:8], 16)
    assert shard_bucket("12\x1fé") == 240932179  # MariaDB 10.11 and PostgreSQL 16 agree
    shard = Shard(240932179 % 5, 5)
    assert shard.owns_values((12, "é"))
    assert shard.owns('["12","é"]', composite=True)


# ---------------------------------------------------------------- ownership changed (schema 3)


def _as_schema_2(state_url: str) -> None:
    """Mark a state store as written by an etl whose shards hashed keys with BLAKE2b."""
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE etl_meta SET value = '2' WHERE name = 'schema_version'"))
    engine.dispose()


def test_shard_states_from_schema_2_restart_from_their_lowest_watermark(tmp_path: Path) -> None:
    """Opening a schema-2 store gives every shard of a stream (same N) the lowest
    watermark among them, drops their checkpoints, and leaves unsharded state alone."""
    import datetime as dt

    url = f"sqlite:///{tmp_path / 'state.db'}"
    low, high = dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    store = StateStore(url)
    try:
        store.save_watermark("users#0/2", high, "f")
        store.save_watermark("users#1/2", low, "f")
        store.save_checkpoint("users#0/2", ["k9"])
        store.save_watermark("users#0/3", high, "f")  # another N: its own group
        store.save_watermark("users", high, "f")
        store.save_watermark("workspaces#0/2", high, "f")
        store.save_watermark("workspaces#1/2", None, "f")  # never finished
        store.save_watermark("events#0/2", 500, "f")
        store.save_watermark("events#1/2", 70, "f")
    finally:
        store.close()
    _as_schema_2(url)
    store = StateStore(url)
    try:

        def state(name: str) -> Any:
            found = store.stream(name)
            assert found is not None
            return found

        assert state("users#0/2").watermark == low
        assert state("users#0/2").checkpoint is None
        assert state("users#1/2").watermark == low
        assert state("users#0/3").watermark == high
        assert state("users").watermark == high
        assert state("workspaces#0/2").watermark is None
        assert state("events#0/2").watermark == 70
    finally:
        store.close()
    store = StateStore(url)  # migrated once: a later open changes nothing
    try:
        store.save_watermark("users#0/2", high, "f")
    finally:
        store.close()
    store = StateStore(url)
    try:
        assert getattr(store.stream("users#0/2"), "watermark", None) == high
    finally:
        store.close()


def test_a_key_that_moved_to_a_shard_ahead_of_its_old_one_is_still_synced(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """After the hash change, a change to a key whose old shard was behind its new
    shard's watermark is read and sent (the new shard restarts from the lowest)."""
    import datetime as dt

    from support import T0

    seed(sqlite_url, n_workspaces=3, n_users=40)
    mappings = copy_mappings(tmp_path / "mappings")
    state_url = f"sqlite:///{tmp_path / 'state.db'}"

    def sync(shard: str) -> Any:
        return api.sync(
            source_url=sqlite_url,
            state_url=state_url,
            mappings_dir=mappings,
            endpoint=receiver.url,
            token=TOKEN,
            api_key="k",
            workspace_key="w",
            shard=shard,
        )

    sync("0/2")
    sync("1/2")
    # The old world: the key's old shard (1) had only got to T0; its new one (0) is ahead.
    moved = next(i for i in range(40) if Shard(0, 2).owns(user_id(i)))
    store = StateStore(state_url)
    try:
        store.save_watermark("users#1/2", T0, store.stream("users#1/2").fingerprint or "")  # type: ignore[union-attr]
    finally:
        store.close()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            users.update()
            .where(users.c.id == user_id(moved))
            .values(role="owner", updated_at=T0 + dt.timedelta(days=1))
        )
    engine.dispose()
    _as_schema_2(state_url)
    before = len(receiver.events())
    report = sync("0/2")
    sent = receiver.events()[before:]
    assert [e["user_id"] for e in sent] == [user_id(moved)]
    assert sent[0]["traits"]["role"] == "owner"
    assert sum(s.sent for s in report.streams) == 1
