"""`etl init`: mapping files guessed from realistic Django and Rails schemas pass
`validate --check-source`, and `diff` finds only the rows that really lack a value."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from apps import DJANGO, RAILS, AppData, add_membership, build_django, build_rails
from support import cli_env, run_cli

from etl.source.introspect import ColumnInfo, TableInfo, inspect_tables
from etl.source.scaffold import FILL_IN, draft_mappings

SOURCES = [
    "sqlite_url",
    pytest.param("pg_url", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", marks=pytest.mark.mariadb),
]
APPS = {"django": build_django, "rails": build_rails}


@pytest.fixture(params=SOURCES)
def source_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def engine(source_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(source_url)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("app", list(APPS))
def test_init_writes_mappings_that_validate_and_diff_only_real_gaps(
    source_url: str, engine: sa.Engine, app: str, tmp_path: Path
) -> None:
    """On each dialect and app, init's files pass `validate --check-source`, and `diff`
    sends every user and workspace except those whose names are really blank."""
    build: Callable[[sa.Engine], AppData] = APPS[app]
    data = build(engine)
    out = tmp_path / "mappings"
    env = {"ETL_SOURCE_URL": source_url}
    made = run_cli(["init", "--out", str(out)], env)
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in out.iterdir()) == [
        "mapping.schema.json",
        "users.yml",
        "workspaces.yml",
    ]
    assert "to do" not in made.stdout
    checked = run_cli(["validate", "--check-source", "--mappings", str(out)], env)
    assert checked.exit_code == 0, checked.output
    state = f"sqlite:///{tmp_path / 'state.db'}"
    diffed = run_cli(
        ["diff", "--mappings", str(out), "--state", state, "--format", "json"],
        env,
    )
    streams = {s["stream"]: s for s in json.loads(diffed.stdout)["streams"]}
    assert streams["workspaces"]["counts"]["new"] == data.workspaces
    assert streams["workspaces"]["counts"]["invalid"] == 0
    users = streams["users"]
    invalid = {r["key"]: r["reason"] for r in users["records"] if r["kind"] == "invalid"}
    assert sorted(int(k) for k in invalid) == sorted(data.blank_name_users)
    assert all("'name'" in reason for reason in invalid.values())
    assert users["counts"]["new"] == data.users - len(data.blank_name_users)


def test_the_django_files_name_what_was_guessed(sqlite_url: str, tmp_path: Path) -> None:
    """For the Django schema, init picks accounts_user, date_joined, the empty-string-safe
    full name, the default workspace and the soft delete, with the editor schema line."""
    engine = sa.create_engine(sqlite_url)
    build_django(engine)
    engine.dispose()
    out = tmp_path / "m"
    assert run_cli(["init", "--source", sqlite_url, "--out", str(out)], {}).exit_code == 0
    users = (out / "users.yml").read_text()
    assert users.startswith("# yaml-language-server: $schema=mapping.schema.json\n")
    for line in (
        f"  table: {DJANGO.users.name}",
        'where: "deleted_at IS NULL"',
        "cursor: updated_at",
        "account_id: default_workspace_id",
        "created_at: {column: date_joined, type: datetime}",
        "NULLIF(TRIM(COALESCE(first_name, '') || ' ' || COALESCE(last_name, '')), '')",
        "# username: username",
    ):
        assert line in users
    assert "password" not in users
    workspaces = (out / "workspaces.yml").read_text()
    assert f"table: {DJANGO.workspaces.name}" in workspaces
    assert "user_id: owner_id" in workspaces


def test_the_rails_user_reaches_its_account_through_memberships() -> None:
    """Without a workspace column on users, the account comes from the membership table."""
    tables = _tables(sa.create_engine("sqlite://"), build_rails)
    users = next(d for d in draft_mappings(tables, dialect="mysql") if d.filename == "users.yml")
    assert (
        'account_id: {sql: "(SELECT MIN(m.account_id) FROM memberships m '
        'WHERE m.user_id = users.id)"}'
    ) in users.text
    assert "CONCAT(COALESCE(first_name, ''), ' ', COALESCE(last_name, ''))" in users.text
    assert f"table: {RAILS.users.name}" in users.text


def _tables(engine: sa.Engine, build: Callable[[sa.Engine], AppData]) -> tuple[TableInfo, ...]:
    build(engine)
    return inspect_tables(engine)


def test_a_rails_membership_change_reaches_the_user_through_related(
    sqlite_url: str, tmp_path: Path, receiver: Any
) -> None:
    """Where the account comes from the membership table, init writes a `related:` entry on
    it: after a sync, a new membership that changes a user's account (and not the user's
    own updated_at) shows up in `diff` as that user's changed account_id."""
    engine = sa.create_engine(sqlite_url)
    build_rails(engine)
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    assert run_cli(["init", "--out", env["ETL_MAPPINGS"]], env).exit_code == 0
    users = (Path(env["ETL_MAPPINGS"]) / "users.yml").read_text()
    assert "related:  # account_id comes from memberships" in users
    assert run_cli(["sync"], env).exit_code == 3  # the three users with blank names
    add_membership(engine, RAILS, user=4, workspace=1, role="member")
    engine.dispose()
    diffed = run_cli(["diff", "--format", "json"], env)
    stream = next(s for s in json.loads(diffed.stdout)["streams"] if s["stream"] == "users")
    changed = [r for r in stream["records"] if r["kind"] == "changed"]
    assert [(r["key"], r["changes"]) for r in changed] == [
        ("4", {"account_id": {"old": "4", "new": "1"}})
    ]


def test_init_never_overwrites_without_force(sqlite_url: str, tmp_path: Path) -> None:
    """An existing, different mapping file stops init before it writes anything (exit 2);
    --force overwrites it."""
    engine = sa.create_engine(sqlite_url)
    build_rails(engine)
    engine.dispose()
    out = tmp_path / "m"
    out.mkdir()
    (out / "users.yml").write_text("# mine\n")
    refused = run_cli(["init", "--source", sqlite_url, "--out", str(out)], {})
    assert refused.exit_code == 2
    assert "users.yml: already exists — pass --force" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["users.yml"]
    assert (out / "users.yml").read_text() == "# mine\n"
    forced = run_cli(["init", "--source", sqlite_url, "--out", str(out), "--force"], {})
    assert forced.exit_code == 0
    assert "event_type: user_identify" in (out / "users.yml").read_text()


def test_what_cannot_be_guessed_is_marked_to_fill_in(tmp_path: Path) -> None:
    """A users table without e-mail, name or creation time gets FILL_IN values that
    `validate --check-source` reports with the table's columns; init lists them as to-dos."""
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, handle_x TEXT)"))
    engine.dispose()
    out = tmp_path / "m"
    made = run_cli(["init", "--source", url, "--out", str(out)], {})
    assert made.exit_code == 0
    assert "to do: users: traits.email: no e-mail column found" in made.stdout
    assert "to do: users: account_id: no workspace table or column found" in made.stdout
    checked = run_cli(["validate", "--check-source", "--source", url, "--mappings", str(out)], {})
    assert checked.exit_code == 2
    assert FILL_IN in checked.stderr
    assert "handle_x" in checked.stderr  # the columns to choose from


def test_no_users_table_is_a_clear_error(tmp_path: Path) -> None:
    """A database without anything like a users table says so, listing its tables."""
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    result = run_cli(["init", "--source", url, "--out", str(tmp_path / "m")], {})
    assert result.exit_code == 2
    assert "no table looks like the users table (tables: invoices)" in result.stderr
    assert not (tmp_path / "m").exists()


def test_the_users_table_is_found_by_its_model_name() -> None:
    """Django's custom `accounts_user` wins over an empty `auth_user`; `user_accounts`
    (an oauth table referring to users) is not taken for the workspaces."""

    def table(name: str, *columns: str) -> TableInfo:
        cols = tuple(ColumnInfo(c, "text", True) for c in ("id", *columns))
        return TableInfo(name, cols, ("id",), ())

    tables = (
        table("auth_user", "email", "password", "username"),
        table("accounts_user", "email", "password", "username"),
        table("user_accounts", "user_id", "provider"),
        table("teams_team", "name"),
    )
    drafts = {d.filename: d.table for d in draft_mappings(tables, dialect="postgresql")}
    assert drafts == {"users.yml": "accounts_user", "workspaces.yml": "teams_team"}
