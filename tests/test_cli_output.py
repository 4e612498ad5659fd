"""Output that fits cron and people: --quiet, each error once, the summary on stdout,
logs on stderr; database URLs as people write them; the receiver's start-up line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import cli_env, copy_mappings, run_cli, seed

from etl.dburl import with_driver


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, str]:
    """A small SQLite source, the example mappings and the real receiver."""
    seed(sqlite_url, n_users=5)
    copy_mappings(tmp_path / "mappings")
    return cli_env(tmp_path, sqlite_url, receiver.url)


def test_quiet_prints_the_summary_on_stdout_and_nothing_on_stderr(env: dict[str, str]) -> None:
    """`sync --quiet` prints its summary to stdout and no log line; without it the
    `stream.done` lines go to stderr, never to stdout."""
    loud = run_cli(["sync"], env)
    assert loud.exit_code == 0
    assert '"event": "stream.done"' in loud.stderr
    assert "stream.done" not in loud.stdout
    assert loud.stdout.startswith("etl sync, run ")
    quiet = run_cli(["sync", "--quiet"], env)
    assert quiet.exit_code == 0
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("etl sync, run ")
    assert run_cli(["sync"], {**env, "ETL_QUIET": "1"}).stderr == ""


@pytest.mark.parametrize(
    ("log_format", "records"), [("console", 0), ("json", 1)], ids=["console", "json"]
)
def test_an_error_is_printed_once(env: dict[str, str], log_format: str, records: int) -> None:
    """A failed run prints its message once as `error:`; JSON logs add one `run.failed`
    record for machines, console logs do not repeat it."""
    missing = str(Path(env["ETL_MAPPINGS"]).parent / "nowhere")
    result = run_cli(["sync", "--log-format", log_format, "--mappings", missing], env)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "mappings directory does not exist" in errors[0]
    assert result.stderr.count("run.failed") == records


def test_quiet_failure_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    """With --quiet, an endpoint nobody listens on gives exactly one line: the error that
    names the host and HYPERENGAGE_ENDPOINT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/api/v1/s2s/event"
    result = run_cli(["sync", "--quiet"], {**env, "HYPERENGAGE_ENDPOINT": endpoint})
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot reach 127.0.0.1 — check HYPERENGAGE_ENDPOINT")


def test_bare_schemes_get_the_installed_drivers() -> None:
    """postgres://, postgresql://, mysql:// and mariadb:// name psycopg and PyMySQL; a
    URL that names its driver, and sqlite, stay as written."""
    assert with_driver("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert with_driver("postgresql://h/db") == "postgresql+psycopg://h/db"
    assert with_driver("mysql://root@h:3306/db") == "mysql+pymysql://root@h:3306/db"
    assert with_driver("mariadb://root@h/db") == "mariadb+pymysql://root@h/db"
    assert with_driver("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert with_driver("sqlite:///app.db") == "sqlite:///app.db"


@pytest.mark.postgres
def test_postgres_urls_work_for_the_source_and_the_state(tmp_path: Path, pg_url: str) -> None:
    """`postgres://` works as --source (validate --check-source) and as --state."""
    seed(pg_url, n_users=3)
    mappings = copy_mappings(tmp_path / "mappings", dialect="postgresql")
    bare = "postgres://" + pg_url.split("://", 1)[1]
    checked = run_cli(
        ["validate", "--check-source", "--source", bare, "--mappings", str(mappings)], {}
    )
    assert checked.exit_code == 0, checked.output
    shown = run_cli(["state", "show", "--state", bare], {})
    assert shown.exit_code == 0, shown.output


@pytest.mark.mariadb
def test_mysql_urls_work_for_the_source(tmp_path: Path, mariadb_url: str) -> None:
    """`mysql://` works as --source (validate --check-source)."""
    seed(mariadb_url, n_users=3)
    mappings = copy_mappings(tmp_path / "mappings", dialect="mariadb")
    bare = "mysql://" + mariadb_url.split("://", 1)[1]
    checked = run_cli(
        ["validate", "--check-source", "--source", bare, "--mappings", str(mappings)], {}
    )
    assert checked.exit_code == 0, checked.output


def test_the_receiver_prints_the_endpoint_line_to_paste(tmp_path: Path) -> None:
    """`etl receiver` prints `export HYPERENGAGE_ENDPOINT=URL` for the port it listens on
    (its /health answers there), and says that any keys are accepted locally."""
    command = [sys.executable, "-m", "etl", "receiver", "--port", "0", "--store", "rx.db", "-q"]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HYPERENGAGE_TOKEN": "local-token"},
    ) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(4)]
            exports = [line.strip() for line in lines if "HYPERENGAGE_ENDPOINT=" in line]
            assert len(exports) == 1
            url = exports[0].removeprefix("export HYPERENGAGE_ENDPOINT=")
            assert url.startswith("http://127.0.0.1:")
            health = url.removesuffix("/api/v1/s2s/event") + "/health"
            with urllib.request.urlopen(health, timeout=10) as answer:  # noqa: S310 - loopback
                assert answer.status == 200
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert url.endswith("/api/v1/s2s/event")
    assert any("Any HYPERENGAGE_API_KEY and HYPERENGAGE_WORKSPACE_KEY" in line for line in lines)
