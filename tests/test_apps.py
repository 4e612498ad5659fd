"""The realistic app schemas of tests/apps.py build and mutate on every dialect."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from apps import (
    DJANGO,
    RAILS,
    App,
    AppData,
    build_django,
    build_rails,
    change_role,
    remove_membership,
    soft_delete_user,
)

SOURCES = [
    "sqlite_url",
    pytest.param("pg_url", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=SOURCES)
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An engine on a fresh database of each dialect."""
    engine = sa.create_engine(str(request.getfixturevalue(request.param)))
    yield engine
    engine.dispose()


def _count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


@pytest.mark.parametrize(("app", "build"), [(DJANGO, build_django), (RAILS, build_rails)])
def test_builders_write_the_documented_shape_and_helpers_mutate_it(
    engine: sa.Engine, app: App, build: object
) -> None:
    """Each app builds with users in two workspaces, blank names, and working mutations."""
    data: AppData = build(engine)  # type: ignore[operator]
    assert (_count(engine, app.users), _count(engine, app.workspaces)) == (30, 5)
    assert _count(engine, app.memberships) == data.memberships == 30 + 7
    assert data.blank_name_users == (5, 14, 23)
    m, u = app.memberships, app.users
    with engine.connect() as conn:
        first, last = conn.execute(
            sa.select(u.c.first_name, u.c.last_name).where(u.c.id == 5)
        ).one()
    assert (first, last) == ("", "")

    user = data.two_workspace_users[0]
    home, second = data.home_workspace(user), data.second_workspace(user)
    change_role(engine, app, user=user, workspace=home, role="billing")
    remove_membership(engine, app, user=user, workspace=second)
    soft_delete_user(engine, app, user=7)
    with engine.connect() as conn:
        roles = conn.execute(sa.select(m.c.role).where(m.c.user_id == user)).scalars().all()
        deleted = conn.execute(sa.select(u.c[app.deleted_column]).where(u.c.id == 7)).scalar_one()
        user_stamp = conn.execute(sa.select(u.c.updated_at).where(u.c.id == user)).scalar_one()
    assert roles == ["billing"]
    assert deleted is not None
    # the role change did not touch the user's own cursor: that is the point
    assert user_stamp.replace(tzinfo=None) < deleted.replace(tzinfo=None)
    with pytest.raises(LookupError):
        remove_membership(engine, app, user=user, workspace=second)
