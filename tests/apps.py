"""Realistic application schemas for tests: a Django-like app and a Rails-like app.

Both are written with SQLAlchemy Core and built in the database of the engine
you pass (SQLite, PostgreSQL or MariaDB), with a few dozen deterministic rows
that carry the shapes real apps have and that trip a naive sync:

* users whose `first_name`/`last_name` are empty strings (Django's default), so
  `first_name || ' ' || last_name` is a whitespace-only name;
* users in two workspaces (a join of users and memberships repeats their key);
* a role kept in the membership table, whose changes do not move the user's
  own `updated_at`;
* soft deletes (`deleted_at` in Django, `discarded_at` in Rails, as the
  discard gem names it);
* a JSON column (`jsonb` on PostgreSQL) holding an object.

Usage::

    engine = sa.create_engine(url)
    data = build_django(engine)             # or build_rails(engine)
    change_role(engine, DJANGO, user=3, workspace=2, role="admin")
    remove_membership(engine, DJANGO, user=data.two_workspace_users[0], workspace=...)
    soft_delete_user(engine, DJANGO, user=5)

Every id is an integer (Django's BigAutoField, Rails' bigint ids). Seeded
timestamps lie in the past (around `T0`); the mutation helpers stamp the
current time (as Django's `auto_now` and Rails' `touch` would), so the next
incremental sync sees the change through the right table's cursor and only
there. All builders are deterministic: the same arguments give the same rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

T0 = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
ROLES = ("owner", "admin", "member", "viewer")
PLANS = ("free", "pro", "team")

# Django (USE_TZ=True) uses timestamptz on PostgreSQL and datetime(6) on MySQL;
# Rails uses `timestamp(6) without time zone` / datetime(6), holding UTC.
_TZ_TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


@dataclass(frozen=True)
class App:
    """One application schema: its tables and the names that differ between apps."""

    name: str
    metadata: sa.MetaData
    users: sa.Table
    workspaces: sa.Table
    memberships: sa.Table
    workspace_column: str  # the membership's workspace/account column
    deleted_column: str  # the user's soft-delete timestamp


@dataclass(frozen=True)
class AppData:
    """What a builder wrote, so tests can name rows without repeating the rules."""

    users: int  # ids 1..users
    workspaces: int  # ids 1..workspaces
    memberships: int
    two_workspace_users: tuple[int, ...]  # users with a second membership
    blank_name_users: tuple[int, ...]  # users whose first and last names are ""
    inactive_users: tuple[int, ...]  # is_active false (Django only; empty for Rails)

    def home_workspace(self, user: int) -> int:
        """The workspace of the user's first membership (also `default_workspace_id`)."""
        return (user - 1) % self.workspaces + 1

    def second_workspace(self, user: int) -> int:
        """The workspace of a two-workspace user's second membership."""
        return user % self.workspaces + 1


# --------------------------------------------------------------------------- Django

_django = sa.MetaData()
DJANGO = App(
    name="django",
    metadata=_django,
    workspaces=sa.Table(
        "workspaces_workspace",
        _django,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("slug", sa.String(50), nullable=False, unique=True),
        sa.Column("plan", sa.String(20), nullable=False),
        sa.Column("owner_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", _TZ_TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TZ_TIMESTAMP, nullable=False),
    ),
    users=sa.Table(
        "accounts_user",
        _django,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("password", sa.String(128), nullable=False),
        sa.Column("last_login", _TZ_TIMESTAMP),
        sa.Column("is_superuser", sa.Boolean, nullable=False),
        sa.Column("username", sa.String(150), nullable=False, unique=True),
        # Django's CharField(blank=True) stores "" rather than NULL
        sa.Column("first_name", sa.String(150), nullable=False),
        sa.Column("last_name", sa.String(150), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("is_staff", sa.Boolean, nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False),
        sa.Column("date_joined", _TZ_TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TZ_TIMESTAMP, nullable=False),  # auto_now=True
        sa.Column("deleted_at", _TZ_TIMESTAMP),  # soft delete
        sa.Column("default_workspace_id", sa.BigInteger),  # the user's home workspace
        sa.Column("profile", _JSON),  # JSONField: jsonb on PostgreSQL
    ),
    memberships=sa.Table(
        "workspaces_membership",
        _django,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("user_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("workspace_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("joined_at", _TZ_TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TZ_TIMESTAMP, nullable=False, index=True),  # auto_now=True
        sa.UniqueConstraint("user_id", "workspace_id"),
    ),
    workspace_column="workspace_id",
    deleted_column="deleted_at",
)

# --------------------------------------------------------------------------- Rails

_rails = sa.MetaData()
RAILS = App(
    name="rails",
    metadata=_rails,
    workspaces=sa.Table(
        "accounts",
        _rails,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(255)),
        sa.Column("plan", sa.String(255)),
        sa.Column("owner_id", sa.BigInteger),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
    ),
    users=sa.Table(
        "users",
        _rails,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(255), nullable=False, unique=True),
        sa.Column("first_name", sa.String(255)),
        sa.Column("last_name", sa.String(255)),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.Column("discarded_at", _TIMESTAMP),  # the discard gem's soft delete
        sa.Column("preferences", _JSON),
    ),
    memberships=sa.Table(
        "memberships",
        _rails,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("user_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("account_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("role", sa.String(255), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False, index=True),
        sa.UniqueConstraint("user_id", "account_id"),
    ),
    workspace_column="account_id",
    deleted_column="discarded_at",
)


# --------------------------------------------------------------------------- builders


def _plan(users: int, workspaces: int) -> AppData:
    """The shared shape of both apps' data (which users are special)."""
    two = tuple(u for u in range(1, users + 1) if u % 4 == 0)
    blank = tuple(u for u in range(1, users + 1) if u % 9 == 5)
    return AppData(
        users=users,
        workspaces=workspaces,
        memberships=users + len(two),
        two_workspace_users=two,
        blank_name_users=blank,
        inactive_users=(),
    )


def _role(user: int, workspace: int) -> str:
    return ROLES[(user + workspace) % len(ROLES)]


def _membership_rows(data: AppData, workspace_column: str, stamp: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for user in range(1, data.users + 1):
        homes = [data.home_workspace(user)]
        if user in data.two_workspace_users:
            homes.append(data.second_workspace(user))
        for workspace in homes:
            joined = T0 - dt.timedelta(days=20, hours=user)
            rows.append(
                {
                    "id": len(rows) + 1,
                    "user_id": user,
                    workspace_column: workspace,
                    "role": "owner" if user == workspace else _role(user, workspace),
                    stamp: joined,
                    "updated_at": joined,
                }
            )
    return rows


def _names(user: int, data: AppData) -> tuple[str, str]:
    if user in data.blank_name_users:
        return "", ""
    return f"Ada{user}", f"Lovelace{user}"


def build_django(engine: sa.Engine, *, users: int = 30, workspaces: int = 5) -> AppData:
    """Create the Django-like schema in `engine`'s database and fill it.

    Users 1..`workspaces` own workspaces of the same id; every fourth user is
    also a member of a second workspace; users 5, 14, 23 have empty names;
    every seventh user is inactive (`is_active` false); `profile` is a JSON
    object. Returns what was written.
    """
    data = _plan(users, workspaces)
    data = replace(data, inactive_users=tuple(u for u in range(1, users + 1) if u % 7 == 0))
    app = DJANGO
    app.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            app.workspaces.insert(),
            [
                {
                    "id": w,
                    "name": f"Workspace {w}",
                    "slug": f"ws-{w}",
                    "plan": PLANS[w % len(PLANS)],
                    "owner_id": w,
                    "created_at": T0 - dt.timedelta(days=60 - w),
                    "updated_at": T0 - dt.timedelta(days=1),
                }
                for w in range(1, workspaces + 1)
            ],
        )
        conn.execute(
            app.users.insert(),
            [
                {
                    "id": u,
                    "password": "!",  # an unusable password, as Django writes it
                    "last_login": None if u % 3 == 0 else T0 - dt.timedelta(hours=u),
                    "is_superuser": u == 1,
                    "username": f"user{u}",
                    "first_name": _names(u, data)[0],
                    "last_name": _names(u, data)[1],
                    "email": f"user{u}@example.com",
                    "is_staff": u == 1,
                    "is_active": u not in data.inactive_users,
                    "date_joined": T0 - dt.timedelta(days=30, hours=u),
                    "updated_at": T0 - dt.timedelta(minutes=u),
                    "deleted_at": None,
                    "default_workspace_id": data.home_workspace(u),
                    "profile": {"locale": "en", "theme": "dark" if u % 2 else "light"},
                }
                for u in range(1, users + 1)
            ],
        )
        conn.execute(app.memberships.insert(), _membership_rows(data, "workspace_id", "joined_at"))
    return data


def build_rails(engine: sa.Engine, *, users: int = 30, workspaces: int = 5) -> AppData:
    """Create the Rails-like schema (`users`, `accounts`, `memberships`) and fill it.

    The same shape as `build_django` (owners, two-account users, empty names),
    with Rails' conventions: `created_at`/`updated_at` everywhere, naive UTC
    timestamps, `discarded_at` for soft deletes, `preferences` as JSON.
    """
    data = _plan(users, workspaces)
    app = RAILS
    app.metadata.create_all(engine)
    naive = T0.replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(
            app.workspaces.insert(),
            [
                {
                    "id": w,
                    "name": f"Account {w}",
                    "plan": PLANS[w % len(PLANS)],
                    "owner_id": w,
                    "created_at": naive - dt.timedelta(days=60 - w),
                    "updated_at": naive - dt.timedelta(days=1),
                }
                for w in range(1, workspaces + 1)
            ],
        )
        conn.execute(
            app.users.insert(),
            [
                {
                    "id": u,
                    "email": f"user{u}@example.com",
                    "first_name": _names(u, data)[0],
                    "last_name": _names(u, data)[1],
                    "created_at": naive - dt.timedelta(days=30, hours=u),
                    "updated_at": naive - dt.timedelta(minutes=u),
                    "discarded_at": None,
                    "preferences": {"digest": "weekly"},
                }
                for u in range(1, users + 1)
            ],
        )
        rows = _membership_rows(data, "account_id", "created_at")
        for row in rows:
            row["created_at"] = row["created_at"].replace(tzinfo=None)
            row["updated_at"] = row["updated_at"].replace(tzinfo=None)
        conn.execute(app.memberships.insert(), rows)
    return data


# --------------------------------------------------------------------------- mutations


def now_for(app: App) -> dt.datetime:
    """The current time as the app stores it (aware for Django, naive UTC for Rails)."""
    now = dt.datetime.now(dt.UTC)
    return now if app is DJANGO else now.replace(tzinfo=None)


def change_role(engine: sa.Engine, app: App, *, user: int, workspace: int, role: str) -> None:
    """Change one membership's role; only the membership's `updated_at` moves."""
    m = app.memberships
    with engine.begin() as conn:
        done = conn.execute(
            m.update()
            .where(m.c.user_id == user, m.c[app.workspace_column] == workspace)
            .values(role=role, updated_at=now_for(app))
        )
    if done.rowcount != 1:
        raise LookupError(f"no membership of user {user} in workspace {workspace}")


def add_membership(engine: sa.Engine, app: App, *, user: int, workspace: int, role: str) -> None:
    """Add a membership (a new row in the membership table, stamped now)."""
    m = app.memberships
    now = now_for(app)
    stamp = "joined_at" if app is DJANGO else "created_at"
    with engine.begin() as conn:
        next_id = conn.execute(sa.select(sa.func.coalesce(sa.func.max(m.c.id), 0) + 1)).scalar()
        conn.execute(
            m.insert().values(
                {
                    "id": next_id,
                    "user_id": user,
                    app.workspace_column: workspace,
                    "role": role,
                    stamp: now,
                    "updated_at": now,
                }
            )
        )


def remove_membership(engine: sa.Engine, app: App, *, user: int, workspace: int) -> None:
    """Delete one membership row: no cursor anywhere moves (only a full read sees it)."""
    m = app.memberships
    with engine.begin() as conn:
        done = conn.execute(
            m.delete().where(m.c.user_id == user, m.c[app.workspace_column] == workspace)
        )
    if done.rowcount != 1:
        raise LookupError(f"no membership of user {user} in workspace {workspace}")


def soft_delete_user(engine: sa.Engine, app: App, *, user: int) -> None:
    """Soft-delete a user: set its deleted_at/discarded_at and updated_at to now."""
    u = app.users
    now = now_for(app)
    with engine.begin() as conn:
        conn.execute(
            u.update().where(u.c.id == user).values({app.deleted_column: now, "updated_at": now})
        )


def restore_user(engine: sa.Engine, app: App, *, user: int) -> None:
    """Undo a soft delete (the user comes back), touching updated_at."""
    u = app.users
    with engine.begin() as conn:
        conn.execute(
            u.update()
            .where(u.c.id == user)
            .values({app.deleted_column: None, "updated_at": now_for(app)})
        )


def update_user(engine: sa.Engine, app: App, *, user: int, **values: Any) -> None:
    """Update a user's columns as the ORM would: `updated_at` moves to now."""
    u = app.users
    with engine.begin() as conn:
        conn.execute(u.update().where(u.c.id == user).values(updated_at=now_for(app), **values))


def set_names_quietly(engine: sa.Engine, app: App, *, user: int, first: str, last: str) -> None:
    """Fix a user's names with a bulk SQL update that skips `updated_at` (no cursor moves)."""
    u = app.users
    with engine.begin() as conn:
        conn.execute(u.update().where(u.c.id == user).values(first_name=first, last_name=last))
