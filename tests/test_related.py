"""Real application schemas end to end (SPEC §9, issue 12): traits from related tables,
full reads that `full_every` triggers, records that disappear, empty names.

The Django-like and Rails-like schemas of tests/apps.py, the mapping files shipped
in docs/examples/, the real CLI and the real receiver. Each test names what would
stay wrong in Hyperengage without the behaviour it checks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from apps import (
    DJANGO,
    RAILS,
    AppData,
    build_django,
    build_rails,
    change_role,
    remove_membership,
    restore_user,
    set_names_quietly,
    soft_delete_user,
    update_user,
)
from click.testing import Result
from support import REPO, cli_env, run_cli

from etl.mapping.parse import load_mappings
from etl.receiver.server import RunningReceiver
from etl.run.sample import uncovered_tables

EXAMPLES = REPO / "docs" / "examples"


@dataclass
class App:
    """A seeded app database, its mappings, the receiver and the job's environment."""

    tmp: Path
    engine: sa.Engine
    data: AppData
    receiver: RunningReceiver
    env: dict[str, str]

    def run(self, *args: str) -> Result:
        return run_cli(list(args), self.env)

    def users_sent(self) -> list[dict[str, Any]]:
        return [e for e in self.receiver.events() if e["event_type"] == "user_identify"]

    def sent_for(self, user: int) -> list[dict[str, Any]]:
        return [e for e in self.users_sent() if e["user_id"] == str(user)]

    def age_full_read_clock(self, days: int = 2) -> None:
        """As if the last full read (or first run) was `days` ago: full_every is due."""
        state = sa.create_engine(self.env["ETL_STATE_URL"])
        with state.begin() as conn:
            for column in ("first_run_at", "full_read_at"):
                rows = conn.execute(sa.text(f"SELECT stream, {column} FROM etl_streams")).all()
                for stream, value in rows:
                    if value is None:
                        continue
                    older = sa.text(
                        f"UPDATE etl_streams SET {column} = :v WHERE stream = :s"
                    ).bindparams(v=_days_before(value, days), s=stream)
                    conn.execute(older)
        state.dispose()


def _days_before(value: Any, days: int) -> str:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return (moment - dt.timedelta(days=days)).isoformat(sep=" ")


def done(result: Result) -> dict[str, dict[str, Any]]:
    """The `stream.done` summary lines of a run, by stream."""
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return {e["stream"]: e for e in lines if e.get("event") == "stream.done"}


@pytest.fixture
def django_pg(tmp_path: Path, pg_url: str, receiver: RunningReceiver) -> Iterator[App]:
    """The Django-like app on PostgreSQL with docs/examples/django as the mappings."""
    engine = sa.create_engine(pg_url)
    data = build_django(engine)
    shutil.copytree(EXAMPLES / "django", tmp_path / "mappings")
    yield App(tmp_path, engine, data, receiver, cli_env(tmp_path, pg_url, receiver.url))
    engine.dispose()


@pytest.mark.postgres
def test_a_role_change_in_the_membership_table_reaches_hyperengage_with_the_next_sync(
    django_pg: App,
) -> None:
    """Changing a membership's role moves no user cursor; `related:` re-reads that user
    by key and the next sync sends the new role (and only that user)."""
    app = django_pg
    first = app.run("sync")
    assert first.exit_code == 3, first.stderr  # the users with empty names
    user = 6
    home = app.data.home_workspace(user)
    assert [e["traits"]["role"] for e in app.sent_for(user)] != ["billing"]
    change_role(app.engine, DJANGO, user=user, workspace=home, role="billing")
    again = app.run("sync")
    assert again.exit_code == 3, again.stderr
    sent = app.sent_for(user)
    assert len(sent) == 2
    assert sent[-1]["traits"]["role"] == "billing"
    users = done(again)["users"]
    assert (users["changed"], users["sent"]) == (1, 1)
    # the workspace's member count did not change: re-read, not sent
    assert done(again)["workspaces"]["sent"] == 0


@pytest.mark.postgres
def test_a_removed_membership_reaches_hyperengage_at_the_full_read_full_every_triggers(
    django_pg: App,
) -> None:
    """A deleted membership row moves no cursor anywhere: the next sync sends nothing;
    once `full_every` is due, the sync is a full read that sends the user's new
    workspaces, and `state show`/`runs` show when it was."""
    app = django_pg
    assert app.run("sync").exit_code == 3
    user = app.data.two_workspace_users[0]
    both = sorted([str(app.data.home_workspace(user)), str(app.data.second_workspace(user))])
    assert app.sent_for(user)[-1]["traits"]["workspaces"] == both
    remove_membership(app.engine, DJANGO, user=user, workspace=app.data.second_workspace(user))
    quiet = app.run("sync")
    assert len(app.sent_for(user)) == 1
    assert done(quiet)["users"]["mode"] == "incremental"
    app.age_full_read_clock()
    full = app.run("sync")
    assert done(full)["users"]["mode"] == "full"
    assert app.sent_for(user)[-1]["traits"]["workspaces"] == [str(app.data.home_workspace(user))]
    shown = app.run("state", "show", "--format", "json")
    streams = {s["stream"]: s for s in json.loads(shown.stdout)["streams"]}
    assert streams["users"]["last_full_read"] is not None
    runs = app.run("runs")
    assert "(full read)" in runs.stdout.splitlines()[2]  # the newest run
    # the clock restarted: the next sync is incremental again
    assert done(app.run("sync"))["users"]["mode"] == "incremental"


@pytest.mark.postgres
def test_a_soft_deleted_user_gets_the_on_gone_traits_once_and_a_return_is_a_change(
    django_pg: App,
) -> None:
    """A soft-deleted user leaves the stream's `where:`; the next full read sends its
    last-sent payload with `deleted: true` once; a later full read sends nothing more;
    when the user is restored it is sent again without the flag."""
    app = django_pg
    assert app.run("sync").exit_code == 3
    user = 8
    last = app.sent_for(user)[-1]
    soft_delete_user(app.engine, DJANGO, user=user)
    assert app.run("sync").exit_code == 3
    assert len(app.sent_for(user)) == 1  # incremental reads never see it go
    full = app.run("sync", "--full")
    gone = app.sent_for(user)
    assert len(gone) == 2
    assert gone[-1]["traits"] == {**last["traits"], "deleted": True}
    assert (gone[-1]["user_id"], gone[-1]["account_id"]) == (last["user_id"], last["account_id"])
    assert done(full)["users"]["gone"] == 1
    again = app.run("sync", "--full")
    assert len(app.sent_for(user)) == 2  # once per gone key
    assert done(again)["users"]["gone"] == 1
    restore_user(app.engine, DJANGO, user=user)
    app.run("sync")
    back = app.sent_for(user)
    assert len(back) == 3
    assert "deleted" not in back[-1]["traits"]
    # three sends of the key, three event ids: the return is a new event (SPEC §2)
    assert len({e["event_id"] for e in back}) == 3


@pytest.mark.postgres
def test_a_whitespace_name_is_invalid_remembered_and_sent_once_fixed_without_a_cursor_move(
    django_pg: App,
) -> None:
    """Users whose names are Django's empty strings get the name ' ': invalid, listed by
    `state show`, counted by every run while they stay so; a fix written by a bulk
    UPDATE that skips updated_at is still seen (re-read by key) and sent."""
    app = django_pg
    first = app.run("sync")
    assert first.exit_code == 3
    blank = app.data.blank_name_users
    assert not any(app.sent_for(u) for u in blank)
    assert "required trait 'name' is only whitespace (' ')" in first.stdout
    shown = app.run("state", "show")
    assert shown.stdout.count("only whitespace") == len(blank)
    second = app.run("sync")
    assert second.exit_code == 3
    assert done(second)["users"]["invalid"] == len(blank)
    set_names_quietly(app.engine, DJANGO, user=blank[0], first="Grace", last="Hopper")
    third = app.run("sync")
    assert [e["traits"]["name"] for e in app.sent_for(blank[0])] == ["Grace Hopper"]
    assert done(third)["users"]["invalid"] == len(blank) - 1
    assert app.run("state", "show").stdout.count("only whitespace") == len(blank) - 1


@pytest.mark.postgres
def test_a_plan_that_returns_to_an_earlier_value_is_a_new_event(django_pg: App) -> None:
    """free -> pro -> free sends three events with three ids: the third chains the
    second's id, so no downstream de-duplication can drop it (SPEC §2)."""
    app = django_pg
    app.run("sync")
    workspaces = DJANGO.workspaces
    first_plan = None
    for plan in ("enterprise", "free-again", None):
        with app.engine.begin() as conn:
            if first_plan is None:
                first_plan = conn.execute(
                    sa.select(workspaces.c.plan).where(workspaces.c.id == 1)
                ).scalar_one()
            conn.execute(
                workspaces.update()
                .where(workspaces.c.id == 1)
                .values(plan=plan or first_plan, updated_at=sa.func.now())
            )
        app.run("sync")
    sent = [
        e
        for e in app.receiver.events()
        if e["event_type"] == "account_identify" and e["account_id"] == "1"
    ]
    assert [e["traits"]["plan_name"] for e in sent] == [
        first_plan,
        "enterprise",
        "free-again",
        first_plan,
    ]
    assert len({e["event_id"] for e in sent}) == 4


# ---------------------------------------------------------------- MariaDB and SQLite

PORTABLE_USERS = """\
event_type: user_identify
source: {table: accounts_user, where: "deleted_at IS NULL"}
key: id
cursor: updated_at
user_id: id
account_id: default_workspace_id
traits:
  email: email
  name: username
  created_at: {column: date_joined, type: datetime}
  role:
    sql: >-
      (SELECT m.role FROM workspaces_membership m WHERE m.user_id = accounts_user.id
       AND m.workspace_id = accounts_user.default_workspace_id)
related:
  - {table: workspaces_membership, key: user_id, cursor: updated_at}
on_gone:
  traits: {deleted: true}
"""

SOURCES = [
    "sqlite_url",
    pytest.param("mariadb_url", marks=pytest.mark.mariadb),
]


@pytest.mark.parametrize("source", SOURCES)
def test_related_reads_and_on_gone_work_on_mariadb_and_sqlite(
    tmp_path: Path, source: str, receiver: RunningReceiver, request: pytest.FixtureRequest
) -> None:
    """On MariaDB and SQLite too: a role change reaches Hyperengage by `related:`, and a
    soft-deleted user gets its on_gone traits at the next full read."""
    url = str(request.getfixturevalue(source))
    engine = sa.create_engine(url)
    try:
        build_django(engine)
        (tmp_path / "mappings").mkdir()
        (tmp_path / "mappings" / "users.yml").write_text(PORTABLE_USERS)
        app = App(tmp_path, engine, AppData(0, 0, 0, (), (), ()), receiver, {})
        app.env = cli_env(tmp_path, url, receiver.url)
        assert app.run("sync").exit_code == 0
        change_role(engine, DJANGO, user=3, workspace=3, role="billing")
        update_user(engine, DJANGO, user=4, email="new4@example.com")
        soft_delete_user(engine, DJANGO, user=9)
        again = app.run("sync")
        assert again.exit_code == 0, again.stderr
        assert app.sent_for(3)[-1]["traits"]["role"] == "billing"
        assert app.sent_for(4)[-1]["traits"]["email"] == "new4@example.com"
        assert done(again)["users"]["sent"] == 2
        app.run("sync", "--full")
        assert app.sent_for(9)[-1]["traits"]["deleted"] is True
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_query_stream_is_re_read_through_a_related_query(
    tmp_path: Path, pg_url: str, receiver: RunningReceiver
) -> None:
    """Rails, one event per membership from a `query:` source: a user's name change is
    a change of the users table, which a related query maps to each of its memberships."""
    engine = sa.create_engine(pg_url)
    try:
        data = build_rails(engine)
        shutil.copytree(EXAMPLES / "rails", tmp_path / "mappings")
        env = cli_env(tmp_path, pg_url, receiver.url)
        first = run_cli(["sync"], env)
        assert first.exit_code == 3, first.stderr  # empty names
        user = data.two_workspace_users[0]
        with engine.begin() as conn:
            conn.execute(
                RAILS.users.update()
                .where(RAILS.users.c.id == user)
                .values(first_name="Renamed", updated_at=sa.func.now())
            )
        again = run_cli(["sync"], env)
        renamed = [
            e
            for e in receiver.events()
            if e["event_type"] == "user_identify" and e["traits"]["name"].startswith("Renamed")
        ]
        assert sorted(e["account_id"] for e in renamed) == sorted(
            [str(data.home_workspace(user)), str(data.second_workspace(user))]
        )
        assert done(again)["memberships"]["sent"] == 2
    finally:
        engine.dispose()


def test_the_example_mappings_load() -> None:
    """docs/examples/django and docs/examples/rails are valid mapping directories."""
    for app in ("django", "rails"):
        assert load_mappings(EXAMPLES / app)


@pytest.mark.postgres
@pytest.mark.parametrize(("app", "build"), [("django", build_django), ("rails", build_rails)])
def test_the_example_mappings_pass_check_source_on_their_schemas(
    tmp_path: Path, pg_url: str, app: str, build: Any
) -> None:
    """`validate --check-source` accepts each example against the schema it is for."""
    engine = sa.create_engine(pg_url)
    try:
        build(engine)
    finally:
        engine.dispose()
    env = {"ETL_SOURCE_URL": pg_url, "ETL_MAPPINGS": str(EXAMPLES / app)}
    result = run_cli(["validate", "--check-source"], env)
    assert result.exit_code == 0, result.stderr + result.stdout


BROKEN_USERS = """\
event_type: user_identify
source:
  query: >
    SELECT u.id, u.email, u.first_name, u.last_name, u.date_joined, u.updated_at,
           u.profile, m.workspace_id, m.role
    FROM accounts_user u JOIN workspaces_membership m ON m.user_id = u.id
key: id
cursor: updated_at
user_id: id
account_id: workspace_id
traits:
  email: email
  name: {sql: "first_name || ' ' || last_name"}
  created_at: {column: date_joined, type: datetime}
  role: role
  profile: profile
"""


@pytest.mark.postgres
def test_check_source_names_the_jsonb_trait_and_the_repeated_key_before_any_run(
    tmp_path: Path, pg_url: str, receiver: RunningReceiver
) -> None:
    """A jsonb object mapped as a trait and a join that repeats users in two workspaces:
    `validate --check-source` reads a sample, exits 2 naming both (and the membership
    table no cursor covers), before anything is read by a run or sent."""
    engine = sa.create_engine(pg_url)
    try:
        data = build_django(engine)
    finally:
        engine.dispose()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "users.yml").write_text(BROKEN_USERS)
    env = cli_env(tmp_path, pg_url, receiver.url)
    result = run_cli(["validate", "--check-source"], env)
    assert result.exit_code == 2, result.stdout
    assert "users.yml: traits.profile: every sampled row is invalid: profile: nested object" in (
        result.stderr
    )
    repeated = len(data.two_workspace_users)
    assert f"users.yml: key: {repeated} of {data.users} sampled key(s) come from more than" in (
        result.stderr
    )
    assert "reads table 'workspaces_membership', whose changes move neither" in result.stderr
    assert receiver.requests() == []
    assert not (tmp_path / "state.db").exists()


def test_check_source_reports_the_share_of_whitespace_names(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Three users of thirty with empty names: a note with the share and the reason,
    exit 0 (bad rows, not a bad mapping)."""
    engine = sa.create_engine(sqlite_url)
    try:
        build_django(engine)
    finally:
        engine.dispose()
    (tmp_path / "mappings").mkdir()
    users = PORTABLE_USERS.replace(
        "name: username", "name: {sql: \"first_name || ' ' || last_name\"}"
    )
    (tmp_path / "mappings" / "users.yml").write_text(users)
    result = run_cli(["validate", "--check-source"], cli_env(tmp_path, sqlite_url, ""))
    assert result.exit_code == 0, result.stderr
    assert (
        "users.yml: traits.name: 3 of 30 sampled row(s) (10%) invalid, e.g. required trait "
        "'name' is only whitespace" in result.stdout
    )
    assert "0 repeated key(s)" in result.stdout


def test_the_modelling_guide_shows_the_example_files_as_they_are() -> None:
    """docs/modelling.md quotes each file of docs/examples verbatim, so the guide shows
    what the tests run."""
    guide = (REPO / "docs" / "modelling.md").read_text()
    for path in sorted(EXAMPLES.glob("*/*.yml")):
        assert path.read_text().rstrip() in guide, path


def test_tables_a_query_reads_that_no_cursor_or_related_entry_covers_are_named() -> None:
    """The Rails membership query reads `users` and `memberships`; its cursor is the
    membership's, so `users` is uncovered until the related query covers it."""
    with_related = load_mappings(EXAMPLES / "rails", streams=["memberships"])[0]
    without = dataclasses.replace(with_related, related=())
    assert uncovered_tables(without, dialect="postgresql") == ["users"]
    assert uncovered_tables(without, dialect="mysql") == ["users"]
    assert uncovered_tables(with_related, dialect="postgresql") == []
