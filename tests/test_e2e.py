"""End to end: the real CLI, a real source database, the real receiver over HTTP."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, copy_mappings, run_cli, seed, user_id, users

from etl.state.store import StateStore

SOURCES = [
    "sqlite_url",
    pytest.param("pg_url", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=SOURCES)
def source_url(request: pytest.FixtureRequest) -> str:
    """The same scenarios on SQLite, PostgreSQL and MariaDB."""
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def env(tmp_path: Path, source_url: str, receiver: Any) -> dict[str, str]:
    seed(source_url)
    copy_mappings(tmp_path / "mappings", dialect=sa.make_url(source_url).get_backend_name())
    return cli_env(tmp_path, source_url, receiver.url)


def stream_done(stderr: str) -> dict[str, dict[str, Any]]:
    """The `stream.done` summary lines of a run, by stream."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {e["stream"]: e for e in lines if e.get("event") == "stream.done"}


def test_first_sync_sends_every_valid_record_with_the_exact_payload(
    env: dict[str, str], receiver: Any
) -> None:
    """The first sync sends each workspace and user once, shaped exactly as SPEC §2 says."""
    result = run_cli(["sync"], env)
    assert result.exit_code == 0, result.output
    events = receiver.events()
    assert len(events) == 3 + 10
    # accounts before users
    assert [e["event_type"] for e in events[:3]] == ["account_identify"] * 3
    user = next(
        e for e in events if e["user_id"] == user_id(1) and e["event_type"] == "user_identify"
    )
    assert set(user) == {
        "event_id",
        "anonymous_id",
        "user_id",
        "account_id",
        "api_key",
        "workspace_key",
        "src",
        "library",
        "event_type",
        "traits",
        "screen_resolution",
    }
    assert user["anonymous_id"] == ""
    assert user["account_id"] == f"{1:024x}"
    assert (user["api_key"], user["workspace_key"]) == ("api-key-1", "ws-key-1")
    assert (user["src"], user["library"], user["screen_resolution"]) == ("hyperengage", "http", "0")
    assert user["traits"] == {
        "email": "user1@example.com",
        "name": "Ada Lovelace1",
        "created_at": "2024-02-20T12:00:00Z",
        "role": "member",
        "is_admin": False,
    }
    assert uuid.UUID(user["event_id"]).version == 5
    workspace = events[1]
    assert workspace["traits"]["website"] == "https://ws1.example.com"
    assert workspace["traits"]["tags"] == ["b2b", "eu"]
    assert workspace["traits"]["plan_name"] == "growth"
    assert events[0]["traits"]["plan_name"] == "free"  # NULL plan -> default
    summary = stream_done(result.stderr)
    assert summary["users"]["sent"] == 10
    assert summary["workspaces"]["new"] == 3


def test_second_sync_sends_nothing(env: dict[str, str], receiver: Any) -> None:
    """Nothing changed, so nothing is sent, though the lookback re-reads rows."""
    assert run_cli(["sync"], env).exit_code == 0
    before = len(receiver.requests())
    result = run_cli(["sync", "--full"], env)
    assert result.exit_code == 0
    assert len(receiver.requests()) == before
    assert stream_done(result.stderr)["users"]["unchanged"] == 10


def test_changing_one_trait_resends_exactly_that_record(
    env: dict[str, str], receiver: Any, source_url: str
) -> None:
    """An update to one user's role sends that user alone, with a new event id."""
    assert run_cli(["sync"], env).exit_code == 0
    first = {e["user_id"]: e for e in receiver.events() if e["event_type"] == "user_identify"}
    engine = sa.create_engine(source_url)
    with engine.begin() as conn:
        conn.execute(
            users.update()
            .where(users.c.id == user_id(4))
            .values(role="admin", updated_at=sa.func.current_timestamp())
        )
    engine.dispose()
    result = run_cli(["sync"], env)
    assert result.exit_code == 0
    new = receiver.events()[len(first) + 3 :]
    assert [e["user_id"] for e in new] == [user_id(4)]
    assert new[0]["traits"]["role"] == "admin"
    assert new[0]["event_id"] != first[user_id(4)]["event_id"]


def test_an_invalid_row_is_reported_not_sent_and_exits_3(
    env: dict[str, str], receiver: Any, source_url: str
) -> None:
    """A user with an empty email is listed with its reason; the others are delivered."""
    engine = sa.create_engine(source_url)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == user_id(7)).values(email=""))
    engine.dispose()
    result = run_cli(["sync"], env)
    assert result.exit_code == 3
    assert user_id(7) in result.output
    assert "required trait 'email' is missing or empty" in result.output
    sent = {e["user_id"] for e in receiver.events() if e["event_type"] == "user_identify"}
    assert len(sent) == 9
    assert user_id(7) not in sent
    assert stream_done(result.stderr)["users"]["invalid"] == 1


def test_a_bad_mapping_exits_2_naming_file_and_key(env: dict[str, str], tmp_path: Path) -> None:
    """A typo in a mapping stops the run before anything is read, naming where it is."""
    path = tmp_path / "mappings" / "users.yml"
    path.write_text(path.read_text().replace("cursor: updated_at", "cusor: updated_at"))
    result = run_cli(["sync"], env)
    assert result.exit_code == 2
    assert "users.yml: cusor: unknown key" in result.stderr
    assert "did you mean 'cursor'" in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_a_wrong_token_exits_1_and_marks_nothing_as_sent(
    env: dict[str, str], receiver: Any, tmp_path: Path
) -> None:
    """A 401 stops the run at once, names the likely cause, and leaves no record as sent."""
    result = run_cli(["sync"], {**env, "HYPERENGAGE_TOKEN": "wrong-token-value"})
    assert result.exit_code == 1
    assert "HYPERENGAGE_TOKEN" in result.stderr
    assert "wrong-token-value" not in result.output + result.stderr
    assert receiver.events() == []
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", readonly=True)
    try:
        assert all(s.records == 0 for s in store.summary())
        assert store.runs()[0].status == "failed"
    finally:
        store.close()


def test_the_token_never_appears_in_any_output(
    env: dict[str, str], tmp_path: Path, receiver: Any
) -> None:
    """Neither stdout, stderr nor the state store ever contain the token."""
    outputs = []
    for args in (["sync"], ["diff"], ["state", "show"], ["runs"]):
        result = run_cli(args, env)
        outputs.append(result.output + result.stderr)
    assert receiver.events()
    assert all(TOKEN not in text for text in outputs)
    assert TOKEN.encode() not in (tmp_path / "state.db").read_bytes()


def test_diff_shows_what_sync_then_sends(
    env: dict[str, str], receiver: Any, source_url: str
) -> None:
    """The dry run lists as new/changed exactly the records the next sync sends."""
    assert run_cli(["sync"], env).exit_code == 0
    engine = sa.create_engine(source_url)
    with engine.begin() as conn:
        conn.execute(
            users.update()
            .where(users.c.id.in_([user_id(2), user_id(3)]))
            .values(last_name="Hopper", updated_at=sa.func.current_timestamp())
        )
    engine.dispose()
    dry = run_cli(["diff", "--format", "json"], env)
    assert dry.exit_code == 0, dry.stderr
    report = json.loads(dry.stdout)
    listed = {
        r["key"] for s in report["streams"] for r in s["records"] if r["kind"] in ("new", "changed")
    }
    records = next(s for s in report["streams"] if s["stream"] == "users")["records"]
    # one update statement stamps both rows alike, so they come in key order
    assert records[0]["changes"] == {"name": {"old": "Ada Lovelace2", "new": "Ada Hopper"}}
    before = len(receiver.events())
    assert run_cli(["sync"], env).exit_code == 0
    sent = {e["user_id"] for e in receiver.events()[before:]}
    assert listed == sent == {user_id(2), user_id(3)}


def test_a_failed_run_stops_the_reader_thread_before_the_read_transaction_ends(
    tmp_path: Path, sqlite_url: str, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fatal answer mid-stream: the prefetch thread is stopped (and off the
    connection) before the read-only transaction is rolled back."""
    import contextlib
    import threading

    from etl import api
    from etl.errors import FatalApiError
    from etl.run import pipeline
    from etl.source import extract

    alive_at_rollback: list[int] = []
    original = extract.read_only

    @contextlib.contextmanager
    def watched(conn: Any, **kwargs: Any) -> Any:
        with original(conn, **kwargs) as inner:
            try:
                yield inner
            finally:
                names = [t.name for t in threading.enumerate()]
                alive_at_rollback.append(names.count("etl-prefetch"))

    monkeypatch.setattr(pipeline.extract, "read_only", watched)
    seed(sqlite_url, n_users=300)
    copy_mappings(tmp_path / "mappings")
    with pytest.raises(FatalApiError):
        api.sync(
            source_url=sqlite_url,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            mappings_dir=tmp_path / "mappings",
            endpoint=receiver.url,
            token="not-the-token",
            api_key="k",
            workspace_key="w",
            streams=["users"],  # many pages: the reader is mid-table when the 401 comes
            page_size=10,
            batch_size=5,
        )
    assert alive_at_rollback == [0]
