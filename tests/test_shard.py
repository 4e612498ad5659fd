"""`--shard I/N`: N workers sharing one PostgreSQL state store deliver exactly
what one worker would."""

from __future__ import annotations

import collections
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
