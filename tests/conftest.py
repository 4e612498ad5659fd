"""Shared fixtures: a fresh database per test on the real servers, and the real
local receiver on 127.0.0.1.

Each PostgreSQL/MariaDB test gets a database with a unique name, dropped
afterwards, so parallel and repeated runs never collide.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
TEST_TOKEN = "tok-3f9c2a7be1d04c55"  # a fake token; tests grep outputs for it


def _unique_name() -> str:
    return f"etl_t_{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def _pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database with a unique name, dropped on exit."""
    name = _unique_name()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to an empty PostgreSQL database created for this test alone."""
    with _pg_database() as url:
        yield url


@pytest.fixture
def pg_state() -> Iterator[str]:
    """A second empty PostgreSQL database for this test alone (a PostgreSQL state store)."""
    with _pg_database() as url:
        yield url


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A URL to an empty MariaDB database created for this test alone."""
    name = _unique_name()
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A URL to a new SQLite file in this test's temporary directory."""
    return f"sqlite:///{tmp_path / 'source.db'}"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[object]:
    """The real local receiver on 127.0.0.1 (a free port), accepting TEST_TOKEN."""
    from etl.receiver.server import start_receiver

    with start_receiver(store=tmp_path / "received.db", tokens={TEST_TOKEN}) as running:
        yield running
