"""Test helpers: a small source schema on any dialect, and the CLI run in-process."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner, Result

from etl.cli import main

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tok-3f9c2a7be1d04c55"
T0 = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.UTC)

metadata = sa.MetaData()
workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.String(24), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("domain", sa.String(200)),
    sa.Column("plan", sa.String(50)),
    sa.Column("seats", sa.Integer),
    sa.Column("owner_id", sa.String(24)),
    sa.Column("tags", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
)
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(24), primary_key=True),
    sa.Column("workspace_id", sa.String(24)),
    sa.Column("email", sa.String(200)),
    sa.Column("first_name", sa.String(100)),
    sa.Column("last_name", sa.String(100)),
    sa.Column("role", sa.String(50)),
    sa.Column("is_admin", sa.Boolean),
    sa.Column("last_login_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)


def ws_id(i: int) -> str:
    return f"{i:024x}"


def user_id(i: int) -> str:
    return f"{0xABC000000 + i:024x}"


def seed(url: str, *, n_workspaces: int = 3, n_users: int = 10) -> None:
    """Create the demo schema in `url` with a few rows, all stamped T0."""
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            workspaces.insert(),
            [
                {
                    "id": ws_id(i),
                    "name": f"Workspace {i}",
                    "domain": f"ws{i}.example.com",
                    "plan": "growth" if i % 2 else None,
                    "seats": 10 + i,
                    "owner_id": user_id(i),
                    "tags": '["b2b", "eu"]',
                    "created_at": T0 - dt.timedelta(days=30),
                    "updated_at": T0,
                    "deleted_at": None,
                }
                for i in range(n_workspaces)
            ],
        )
        conn.execute(
            users.insert(),
            [user_row(i, n_workspaces) for i in range(n_users)],
        )
    engine.dispose()


def user_row(i: int, n_workspaces: int = 3, **overrides: Any) -> dict[str, Any]:
    row = {
        "id": user_id(i),
        "workspace_id": ws_id(i % n_workspaces),
        "email": f"user{i}@example.com",
        "first_name": "Ada",
        "last_name": f"Lovelace{i}",
        "role": "member",
        "is_admin": i == 0,
        "last_login_at": None,
        "created_at": T0 - dt.timedelta(days=10),
        "updated_at": T0,
    }
    row.update(overrides)
    return row


def copy_mappings(target: Path, *, dialect: str = "sqlite") -> Path:
    """The repository's example mappings, adapted to the dialect's SQL."""
    target.mkdir(parents=True, exist_ok=True)
    for path in (REPO / "mappings").glob("*.yml"):
        shutil.copy(path, target / path.name)
    if dialect in ("mysql", "mariadb"):
        for path in target.glob("*.yml"):
            text = path.read_text()
            text = text.replace("\"'https://' || domain\"", "\"CONCAT('https://', domain)\"")
            text = text.replace(
                "\"first_name || ' ' || last_name\"", "\"CONCAT(first_name, ' ', last_name)\""
            )
            path.write_text(text)
    return target


def cli_env(tmp_path: Path, source_url: str, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment a scheduled run would have."""
    return {
        "ETL_SOURCE_URL": source_url,
        "ETL_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "ETL_MAPPINGS": str(tmp_path / "mappings"),
        "ETL_LOG_FORMAT": "json",
        "HYPERENGAGE_ENDPOINT": endpoint,
        "HYPERENGAGE_TOKEN": TOKEN,
        "HYPERENGAGE_API_KEY": "api-key-1",
        "HYPERENGAGE_WORKSPACE_KEY": "ws-key-1",
        **extra,
    }


def run_cli(args: Sequence[str], env: Mapping[str, str]) -> Result:
    """`etl ARGS` in-process, with stdout and stderr kept apart."""
    runner = CliRunner()
    return runner.invoke(main, list(args), env=dict(env), catch_exceptions=False)


def etl_process(args: Sequence[str], env: Mapping[str, str], tmp_path: Path, name: str) -> Any:
    """`python -m etl ARGS` as a real process, its output in files NAME.out and NAME.err."""
    out = (tmp_path / f"{name}.out").open("wb")
    err = (tmp_path / f"{name}.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", *args], env={**os.environ, **env}, stdout=out, stderr=err
    )
    out.close()
    err.close()
    return proc
