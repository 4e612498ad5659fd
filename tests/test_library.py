"""The library API as an orchestrator calls it: `etl.sync`, `etl.diff`, `etl.validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import TOKEN, copy_mappings, seed, user_id, users

import etl
from etl.errors import FatalApiError, MappingError


@pytest.fixture
def kwargs(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, Any]:
    """What an Airflow task would pass: every setting as an argument, nothing from the env."""
    seed(sqlite_url)
    return {
        "source_url": sqlite_url,
        "state_url": f"sqlite:///{tmp_path / 'state.db'}",
        "mappings_dir": copy_mappings(tmp_path / "mappings"),
    }


@pytest.fixture
def sending(kwargs: dict[str, Any], receiver: Any) -> dict[str, Any]:
    return {
        **kwargs,
        "endpoint": receiver.url,
        "token": TOKEN,
        "api_key": "api-key-1",
        "workspace_key": "ws-key-1",
    }


def test_the_four_functions_are_exported_from_the_package() -> None:
    """`from etl import sync, backfill, diff, validate` gives the library functions."""
    from etl import backfill, diff, sync, validate

    assert (sync, backfill, diff, validate) == (etl.sync, etl.backfill, etl.diff, etl.validate)
    assert sync.__module__ == "etl.api"


def test_sync_returns_the_run_report(sending: dict[str, Any], receiver: Any) -> None:
    """A first sync returns status ok with every stream's exact counts, accounts first."""
    report = etl.sync(**sending)
    assert report.command == "sync"
    assert report.status == "ok"
    assert report.error is None
    assert report.run_id is not None
    assert [s.stream for s in report.streams] == ["workspaces", "users"]
    by_name = {s.stream: s for s in report.streams}
    assert by_name["workspaces"].counts() == {
        "read": 3,
        "new": 3,
        "changed": 0,
        "unchanged": 0,
        "invalid": 0,
        "rejected": 0,
        "sent": 3,
        "gone": 0,
    }
    assert by_name["users"].sent == 10
    assert len(receiver.events()) == 13


def test_an_invalid_record_makes_the_report_partial(
    sending: dict[str, Any], sqlite_url: str
) -> None:
    """Where the CLI exits 3, the library returns status "partial" and lists the record."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == user_id(7)).values(email=""))
    engine.dispose()
    report = etl.sync(**sending, streams=["users"])
    assert report.status == "partial"
    (stream,) = report.streams
    assert (stream.stream, stream.invalid, stream.sent) == ("users", 1, 9)
    assert [key for key, _ in stream.invalid_records] == [user_id(7)]


def test_diff_returns_what_the_next_sync_would_send(
    sending: dict[str, Any], kwargs: dict[str, Any], sqlite_url: str
) -> None:
    """After one change, diff reports exactly that record and sends nothing."""
    etl.sync(**sending)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            users.update()
            .where(users.c.id == user_id(4))
            .values(role="admin", updated_at=sa.func.current_timestamp())
        )
    engine.dispose()
    report, diff = etl.diff(**kwargs)
    assert report.command == "diff"
    assert report.status == "ok"
    assert report.run_id is None  # a dry run leaves no trace in the state store
    stream = next(s for s in diff.streams if s.stream == "users")
    assert stream.counts["changed"] == 1
    assert [(r.key, r.kind, r.changes) for r in stream.records] == [
        (user_id(4), "changed", {"role": {"old": "member", "new": "admin"}})
    ]


def test_failures_raise_the_errors_of_etl_errors(sending: dict[str, Any], tmp_path: Path) -> None:
    """A wrong token raises FatalApiError (CLI exit 1); a bad mapping raises MappingError (2)."""
    with pytest.raises(FatalApiError, match="HYPERENGAGE_TOKEN"):
        etl.sync(**{**sending, "token": "wrong-token-value"})
    users_yml = Path(sending["mappings_dir"]) / "users.yml"
    users_yml.write_text(users_yml.read_text().replace("cursor:", "cusor:"))
    with pytest.raises(MappingError) as caught:
        etl.validate(mappings_dir=sending["mappings_dir"])
    assert any("cusor" in problem for problem in caught.value.problems)
